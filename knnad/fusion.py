"""Several feature scales in one detector: each scale's scores in units of its own normal
scores, then one map.

Fine features (stride 4) find small defects and miss large ones and missing structure; coarse
features (strides 8 and 16) the reverse, and their raw distances are in units that cannot be
compared. Each scale's map is therefore shifted and scaled by the patch scores of normal images
that are not in its memory bank (:class:`NormalScores`: 0 at their median, 1 at their 99.9th
percentile), then fused (:func:`fused_maps`) by one of :data:`FUSIONS`: ``"max"`` (a pixel is
as anomalous as its most anomalous scale says: a defect that one scale sees is kept), ``"mean"``
(equal weights), or ``"auto"`` (weights of :func:`weight_grid` chosen per part at fit from
synthetic defects in held-out normal images, see :mod:`knnad.selection`). A fused score above 1
is above 99.9 % of normal patches.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .embedding import PatchEmbedder
from .index import ExactIndex

#: Fusion rules of several scales' normalised maps.
FUSIONS = ("max", "mean", "auto")
#: Share of normal patch scores below the spread's upper point (the scale's unit).
UPPER_QUANTILE = 0.999
#: Step of the fusion weights searched at fit (a weight is a multiple of it).
WEIGHT_STEP = 0.25


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


def fused_maps(maps: Sequence[torch.Tensor], normals: Sequence[NormalScores],
               weights: Sequence[float], fusion: str = "mean") -> torch.Tensor:
    """One map float32 ``[B, H, W]`` from one map ``[B, H, W]`` per scale (all of one size, in the
    scales' distance units), each normalised to ``(map − location) / spread``: their maximum
    (``fusion="max"``) or their sum weighted by ``weights`` (``"mean"``, ``"auto"``; a scale of
    weight 0 adds nothing)."""
    normalised = [(anomaly_map - normal.location) / normal.spread
                  for anomaly_map, normal in zip(maps, normals)]
    if fusion == "max":
        return torch.stack(normalised).amax(dim=0).float()
    weighted = [term * weight for term, weight in zip(normalised, weights)]
    return torch.stack(weighted).sum(dim=0).float()
