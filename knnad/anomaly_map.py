"""From patch scores to pixel anomaly maps: upsampling (bilinear, or nearest as anomalib) and
Gaussian smoothing (kept apart from the feature model, as in anomalib)."""
from __future__ import annotations

from functools import lru_cache
from typing import Tuple, Union

import torch
import torch.nn.functional as F

#: Upsampling of patch scores to pixels: ``"bilinear"`` (``align_corners=False``) or
#: ``"nearest"`` (each patch's score on its whole stride × stride cell, anomalib's maps).
UPSAMPLING = ("bilinear", "nearest")


def gaussian_kernel_size(sigma: float) -> int:
    """Odd kernel side covering ±4σ (the truncation scipy and anomalib use): 33 for σ = 4."""
    return 2 * int(4.0 * sigma + 0.5) + 1


def _gaussian_kernel(sigma: float, dtype: torch.dtype, device: Union[str, torch.device] = "cpu"
                     ) -> torch.Tensor:
    """Normalised 1-D Gaussian weights ``[size]`` over ±4σ (see :func:`gaussian_kernel_size`)."""
    half = gaussian_kernel_size(sigma) // 2
    offsets = torch.arange(-half, half + 1, dtype=dtype, device=device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of ``maps`` ``[B, 1, H, W]`` with reflect padding, as torchvision's
    ``gaussian_blur`` computes it, but as two 1-D passes."""
    kernel = _gaussian_kernel(sigma, maps.dtype, maps.device)
    half = len(kernel) // 2
    padded = F.pad(maps, (half, half, half, half), mode="reflect")
    blurred = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    return F.conv2d(blurred, kernel.view(1, 1, -1, 1))


def check_upsampling(upsampling: str) -> str:
    """``upsampling`` if it is one of :data:`UPSAMPLING`, else a ValueError naming the choices."""
    if upsampling not in UPSAMPLING:
        raise ValueError(f"upsampling={upsampling!r}; choose one of {UPSAMPLING}")
    return upsampling


@lru_cache(maxsize=32)
def _upsample_blur_matrix(patches: int, pixels: int, sigma: float, upsampling: str) -> torch.Tensor:
    """``[pixels, patches]`` matrix of 1-D upsampling followed by the Gaussian blur: both are
    linear and separable, so a map is ``A_h @ scores @ A_w.T``. Built by sending the unit
    vectors through :func:`F.interpolate` and the blur's 1-D pass, in float64."""
    basis = torch.eye(patches, dtype=torch.float64).reshape(patches, 1, patches, 1)
    corners = {"align_corners": False} if upsampling == "bilinear" else {}
    columns = F.interpolate(basis, size=(pixels, 1), mode=upsampling, **corners)
    if sigma > 0:
        kernel = _gaussian_kernel(sigma, torch.float64)
        half = len(kernel) // 2
        if half >= pixels:
            raise ValueError(f"sigma={sigma} needs maps larger than {half} pixels, got {pixels}")
        columns = F.conv2d(F.pad(columns, (0, 0, half, half), mode="reflect"),
                           kernel.view(1, 1, -1, 1))
    return columns.reshape(patches, pixels).T.float().contiguous()


def map_matrices(grid: Tuple[int, int], size: Union[int, Tuple[int, int]], sigma: float = 4.0,
                 upsampling: str = "bilinear") -> Tuple[torch.Tensor, torch.Tensor]:
    """``(rows, columns)``, float32 ``[H, h]`` and ``[W, w]``: the map of patch scores ``S``
    ``[h, w]`` (``grid``) at ``size`` ``(H, W)`` is ``rows @ S @ columns.T``."""
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0 pixels, got {sigma}")
    check_upsampling(upsampling)
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return (_upsample_blur_matrix(grid[0], height, float(sigma), upsampling),
            _upsample_blur_matrix(grid[1], width, float(sigma), upsampling))


def anomaly_maps(patch_scores: torch.Tensor, size: Union[int, Tuple[int, int]],
                 sigma: float = 4.0, upsampling: str = "bilinear") -> torch.Tensor:
    """Pixel maps ``Tensor[B, H, W]`` (float32, same units as the scores) from patch scores
    ``Tensor[B, h, w]``: upsampling to ``size`` (``"bilinear"`` with ``align_corners=False``, or
    ``"nearest"``), then a Gaussian blur of standard deviation ``sigma`` pixels with reflect
    padding (``sigma=0`` disables it). Computed as two small matrix products per map, equal to
    ``gaussian_blur(F.interpolate(...))`` up to float32 rounding."""
    if patch_scores.ndim != 3:
        raise ValueError(f"patch_scores must be [B, h, w], got {tuple(patch_scores.shape)}")
    grid = (patch_scores.shape[1], patch_scores.shape[2])
    rows, columns = map_matrices(grid, size, sigma, upsampling)
    rows, columns = rows.to(patch_scores.device), columns.to(patch_scores.device)
    return rows @ patch_scores.float() @ columns.T
