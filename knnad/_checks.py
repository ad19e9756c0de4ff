"""Argument checks shared by the modules: one wording for every integer parameter."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence

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


def check_output_folder(path: Any, argument: str) -> Path:
    """``path`` as a Path if it is a folder, or can be created as one, in a writable place;
    else NotADirectoryError or PermissionError naming ``argument``. Run it before the work."""
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"{argument} {path}: {existing} is a file, not a folder; name a "
                                 "folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{argument} {path}: cannot write in {existing}: permission denied; "
                              f"choose another folder or fix its permissions")
    return path


def check_bool(value: Any, name: str) -> bool:
    """``value`` if it is True or False, else a ValueError naming ``name``."""
    if isinstance(value, bool):
        return value
    raise ValueError(f"{name} must be True or False, got {value!r}")


def check_choice(value: Any, name: str, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices``, else a ValueError naming ``name`` and the choices."""
    if isinstance(value, str) and value in choices:
        return value
    raise ValueError(f"{name}={value!r}; choose one of {tuple(choices)}")


def check_number(value: Any, name: str, minimum: float = 0.0, unit: str = "") -> float:
    """``value`` as a float if it is a finite real number >= ``minimum`` (bools excluded), else
    a ValueError naming ``name``."""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
            and math.isfinite(value) and value >= minimum:
        return float(value)
    raise ValueError(f"{name} must be a number{unit} >= {minimum:g}, got {value!r}")
