"""Several feature scales in one detector: each scale's scores in units of its own normal
scores, then one map.

Fine features (stride 4) find small defects and miss large ones and missing structure; coarse
features (strides 8 and 16) the reverse, and their raw distances are in units that cannot be
compared. Each scale's map is therefore shifted and scaled by the patch scores of normal images
that are not in its memory bank (:class:`NormalScores`: 0 at their median, 1 at their 99.9th
percentile), then fused (:func:`fused_maps`) by one of :data:`FUSIONS`:

- ``"refine"`` (the default): the coarser map, cut to the finer map's outline where the finer
  scale sees a defect (:func:`refined_map`); elsewhere the larger of the two. The coarse scale
  keeps the large defects and missing parts the fine one misses; the fine scale removes the
  coarse map's halo around the defects it sees, which costs the coarse map its pixel accuracy
  on small defects.
- ``"max"``: a pixel is as anomalous as its most anomalous scale says.
- ``"mean"``: equal weights.
- ``"auto"``: weights of :func:`weight_grid` chosen per part at fit from synthetic defects in
  held-out normal images (see :mod:`knnad.selection`).

A fused score above 1 is above 99.9 % of normal patches.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .embedding import PatchEmbedder
from .index import ExactIndex

#: Fusion rules of several scales' normalised maps.
FUSIONS = ("refine", "max", "mean", "auto")
#: Share of normal patch scores below the spread's upper point (the scale's unit).
UPPER_QUANTILE = 0.999
#: Step of the fusion weights searched at fit (a weight is a multiple of it).
WEIGHT_STEP = 0.25
#: ``"refine"``: how far (in patches of the finer scale) around a patch that the finer scale
#: finds anomalous the coarser map takes the finer map's outline.
REFINE_RADIUS = 2


@dataclass(frozen=True)
class NormalScores:
    """Where one scale's patch scores lie on normal images it has not stored: ``location``
    (their median) and ``spread`` (their 99.9th percentile minus the median), in the scale's
    distance units, for patch scores over ``k`` neighbours; ``images`` and ``patches``: how many
    they were measured on."""

    location: float
    spread: float
    k: int
    images: int
    patches: int

    @classmethod
    def of(cls, scores: Sequence[np.ndarray], k: int) -> "NormalScores":
        """The statistics of ``scores``: one float array of patch scores (over ``k``
        neighbours) per normal image. A ValueError when they are constant (no spread to scale
        by)."""
        values = np.concatenate([np.asarray(image, np.float64).ravel() for image in scores])
        location = float(np.median(values))
        spread = float(np.quantile(values, UPPER_QUANTILE)) - location
        if not (math.isfinite(spread) and spread > 0):
            raise ValueError(f"the normal images' patch scores do not vary (99.9th percentile - "
                             f"median = {spread}); multi-scale scoring needs training images "
                             f"that differ: add more, or use one scale (layers='coarse')")
        return cls(location, spread, int(k), len(scores), int(values.size))


@dataclass
class Scale:
    """One fitted feature scale of a detector: its ``embedder`` (which hooked layers, how they
    become patches), the exact ``index`` of its normal patches, ``image_ids`` int64 ``[rows]``
    (each bank row's training image, sorted), and in a detector of several scales its
    ``normal`` scores and fusion ``weight`` (None and 1 for a detector of one scale, whose maps
    stay in distance units)."""

    embedder: PatchEmbedder
    index: ExactIndex
    image_ids: np.ndarray
    normal: Optional[NormalScores] = None
    weight: float = 1.0


def normal_scores(scales: Sequence[Scale]) -> List[NormalScores]:
    """The :class:`NormalScores` of each of ``scales`` (a detector of several scales measures
    them at fit); a ValueError for a scale without them."""
    found = []
    for number, scale in enumerate(scales):
        if scale.normal is None:
            raise ValueError(f"scale {number} of {len(scales)} has no normal scores, which fusing "
                             f"several scales needs; fit the detector again")
        found.append(scale.normal)
    return found


def weight_grid(scales: int, step: float = WEIGHT_STEP) -> List[Tuple[float, ...]]:
    """Every weight vector of ``scales`` non-negative multiples of ``step`` that sum to 1, the
    first scale's weight descending: ``[(1, 0), (0.75, 0.25), ..., (0, 1)]`` for two."""
    units = int(round(1 / step))
    grid = [tuple(part / units for part in parts)
            for parts in itertools.product(range(units, -1, -1), repeat=scales)
            if sum(parts) == units]
    return grid


def local_maximum(maps: torch.Tensor, radius: int) -> torch.Tensor:
    """float ``[B, H, W]``: each pixel's maximum of ``maps`` ``[B, H, W]`` over the square of
    ``2 · radius + 1`` pixels around it (within the map), as two one-dimensional passes."""
    window = 2 * radius + 1
    rows = F.max_pool2d(maps[:, None], (window, 1), 1, (radius, 0))
    return F.max_pool2d(rows, (1, window), 1, (0, radius))[:, 0]


def refined_map(coarse: torch.Tensor, fine: torch.Tensor, radius: int) -> torch.Tensor:
    """The ``"refine"`` fusion of two normalised maps ``[B, H, W]`` (1 = the 99.9th percentile
    of normal patch scores): ``max(fine, coarse · gate)`` with ``gate = 1 − found · (1 −
    outline)``, where ``local`` is the fine map's :func:`local_maximum` within ``radius`` pixels,
    ``found = clip(local − 1, 0, 1)`` (how clearly the fine scale sees a defect there) and
    ``outline = clip(fine / local, 0, 1)`` (the fine map's shape of it). Where the fine scale
    sees nothing nearby (``local ≤ 1``) this is ``max(coarse, fine)``."""
    local = local_maximum(fine, radius)
    outline = (fine / local.clamp_min(1.0)).clamp(0.0, 1.0)
    found = (local - 1.0).clamp(0.0, 1.0)
    return torch.maximum(fine, coarse * (1.0 - found * (1.0 - outline)))


def refine_steps(patch_sizes: Sequence[float]) -> Tuple[int, List[Tuple[int, int]]]:
    """How ``"refine"`` folds scales whose patches are ``patch_sizes`` map pixels wide: the
    coarsest scale's number (largest patches; equals in order), then ``(number, radius)`` of
    each finer one, coarse to fine, its radius :data:`REFINE_RADIUS` of its patches in map
    pixels (mobilenet_v2's stride-4 scale on a 224 crop: patches of 4, radius 8)."""
    order = sorted(range(len(patch_sizes)), key=lambda number: -patch_sizes[number])
    return order[0], [(number, max(1, int(round(REFINE_RADIUS * patch_sizes[number]))))
                      for number in order[1:]]


def fused_maps(maps: Sequence[torch.Tensor], normals: Sequence[NormalScores],
               weights: Sequence[float], fusion: str = "mean",
               patch_sizes: Sequence[float] = ()) -> torch.Tensor:
    """One map float32 ``[B, H, W]`` from one map ``[B, H, W]`` per scale (all of one size, in the
    scales' distance units), each normalised to ``(map − location) / spread``: their maximum
    (``fusion="max"``), their sum weighted by ``weights`` (``"mean"``, ``"auto"``; a scale of
    weight 0 adds nothing), or (``"refine"``) each finer map, from the coarsest scale to the
    finest, refining the fusion of the coarser ones (:func:`refined_map` within
    :data:`REFINE_RADIUS` patches of the finer scale; ``patch_sizes``: each scale's patch side
    in map pixels)."""
    normalised = [(anomaly_map - normal.location) / normal.spread
                  for anomaly_map, normal in zip(maps, normals)]
    if fusion == "refine":
        if len(patch_sizes) != len(normalised):
            raise ValueError(f"fusion='refine' needs each scale's patch size in map pixels, got "
                             f"{list(patch_sizes)} for {len(normalised)} scales")
        coarsest, steps = refine_steps(patch_sizes)
        fused = normalised[coarsest]
        for finer, radius in steps:
            fused = refined_map(fused, normalised[finer], radius)
        return fused.float()
    if fusion == "max":
        return torch.stack(normalised).amax(dim=0).float()
    weighted = [term * weight for term, weight in zip(normalised, weights)]
    return torch.stack(weighted).sum(dim=0).float()
