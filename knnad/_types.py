"""Type aliases shared by the modules."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Union

import numpy as np

if TYPE_CHECKING:
    import torch

#: A file-system path: ``str`` or any ``os.PathLike`` (``pathlib.Path``).
PathLike = Union[str, os.PathLike]
#: A numeric matrix: a numpy array or a torch tensor.
ArrayLike = Union[np.ndarray, "torch.Tensor"]
