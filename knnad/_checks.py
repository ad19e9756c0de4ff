"""Argument checks shared by the modules: one wording for every integer parameter."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np


def check_int(value: Any, name: str, minimum: int = 1, maximum: Optional[int] = None,
              hint: str = "") -> int:
    """``value`` as an int if it is one (bools excluded) within [minimum, maximum]; else a
    ValueError naming ``name``, the allowed range and ``hint``."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) \
            and value >= minimum and (maximum is None or value <= maximum):
        return int(value)
    allowed = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
    raise ValueError(f"{name} must be an int {allowed}{hint}, got {value!r}")
