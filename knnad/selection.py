"""Fit-time choices of a detector of several scales, from normal images alone: each scale's
normal statistics, and (``fusion="auto"``) the fusion weights.

Held-out normal images are training images scored against their scale's memory bank without
their own rows (leave one image out: ``search_among`` the other images' rows), so every
training image stays in the bank. Their patch scores give each scale's
:class:`~knnad.fusion.NormalScores`. With ``fusion="auto"``, synthetic defects pasted into the
same images (:func:`synthetic_defects`), scored the same way, choose the weights: the weight
vector of :func:`~knnad.fusion.weight_grid` whose fused maps rank the synthetic defects' pixels
highest (pixel AUROC). No test image is ever used. (``bench_accuracy.py`` measures how well the
synthetic defects stand for real ones: on MVTec bottle and transistor they did not pick the
weights the real defects favour, which is why ``"refine"``, with no weights, is the default.)
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .anomaly_map import anomaly_maps
from .embedding import patch_features
from .fusion import NormalScores, Scale, fused_maps, normal_scores, weight_grid
from .metrics import pixel_auroc
from .preprocessing import IMAGENET_MEAN, IMAGENET_STD
from .scoring import image_row_ranges

logger = logging.getLogger(__name__)

#: Training images held out (one at a time) for the normal statistics and synthetic defects.
HELD_OUT_IMAGES = 16
#: Synthetic defects made from each held-out image.
DEFECTS_PER_IMAGE = 2
#: Share of the image a synthetic defect covers, drawn uniformly in this range.
DEFECT_AREA = (0.005, 0.08)


def held_out_numbers(images: int) -> List[int]:
    """Which of ``images`` training images (numbered in reading order) are held out: up to
    :data:`HELD_OUT_IMAGES`, evenly spread."""
    count = min(HELD_OUT_IMAGES, images)
    return sorted({int(round(i * (images - 1) / max(1, count - 1))) for i in range(count)})


def synthetic_defects(images: torch.Tensor, per_image: int, seed: int
                      ) -> Tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Synthetic defects in prepared (normalised) images ``[M, 3, H, W]``: ``(defective
    [M·per_image, 3, H, W], masks bool [M·per_image, H, W], sources int64 [M·per_image])``,
    ``sources`` the image each was made from. Each defect is a smooth random blob (value noise
    at 2, 4 or 8 cells per side, thresholded to cover a share of :data:`DEFECT_AREA`) filled with
    another of the images, shifted at random, its contrast and colour changed (half of the
    defects) or not (the other half: normal content in the wrong place), blended at 50–100 %."""
    generator = torch.Generator().manual_seed(int(seed))
    count, _, height, width = images.shape
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape or (1,), generator=generator)

    defective, masks, sources = [], [], []
    for number in range(count * per_image):
        source = number % count
        cells = int(2 ** torch.randint(1, 4, (1,), generator=generator))
        noise = torch.randn(1, 1, cells + 1, cells + 1, generator=generator)
        smooth = F.interpolate(noise, size=(height, width), mode="bicubic",
                               align_corners=True)[0, 0]
        area = float(uniform(*DEFECT_AREA))
        mask = smooth > torch.quantile(smooth.flatten(), 1 - area)
        donor = images[(source + 1 + int(torch.randint(max(1, count - 1), (1,),
                                                       generator=generator))) % count]
        shift = (int(torch.randint(height, (1,), generator=generator)),
                 int(torch.randint(width, (1,), generator=generator)))
        donor = torch.roll(donor, shift, dims=(1, 2))
        if number % 2 == 0:  # another look: contrast and colour
            pixels = donor * std + mean
            pixels = ((pixels - 0.5) * uniform(0.6, 1.4) + 0.5
                      + uniform(-0.15, 0.15, 3, 1, 1)).clamp(0, 1)
            donor, blend = (pixels - mean) / std, float(uniform(0.5, 1.0))
        else:
            blend = 1.0
        weight = mask.float() * blend
        defective.append(images[source] * (1 - weight) + donor * weight)
        masks.append(mask.numpy())
        sources.append(source)
    return torch.stack(defective), np.stack(masks), np.asarray(sources, np.int64)


def _held_out_scores(scale: Scale, embedding: torch.Tensor, image: int, views: int, images: int,
                     k: int) -> Optional[torch.Tensor]:
    """Patch scores ``[h, w]`` of one image's ``embedding`` ``[h, w, D]`` against ``scale``'s bank
    without the rows of training image ``image`` and its ``views`` (``images``: how many images
    the bank's image ids count); None when the other images keep fewer than ``k`` rows."""
    offsets = image_row_ranges(scale.image_ids, images)
    start, stop = int(offsets[image]), int(offsets[image + views])
    if len(scale.index) - (stop - start) < k:
        return None
    ranges = [(first, last) for first, last in ((0, start), (stop, len(scale.index)))
              if last > first]
    height, width, dim = embedding.shape
    distances, _ = scale.index.search_among(embedding.reshape(-1, dim), k, ranges)
    return torch.from_numpy(distances.mean(axis=1)).reshape(height, width)


def calibrate_scales(scales: Sequence[Scale], kept: np.ndarray, kept_ids: np.ndarray, views: int,
                     extractor: Any, config: Dict[str, Any]) -> None:
    """Set each scale's ``normal`` and ``weight`` (equal, or with ``config["fusion"] == "auto"``
    chosen as the module docstring says) from the prepared held-out training images ``kept``
    ``[M, 3, H, W]`` (training image ids ``kept_ids``; each image has ``views`` consecutive ids).
    A ValueError when fewer than two images were kept."""
    if len(kept) < 2:
        raise ValueError(f"a detector of several scales needs at least 2 readable training images "
                         f"to measure its normal scores on, got {len(kept)}; add images or use one "
                         f"scale (layers='coarse')")
    images = int(max(scale.image_ids.max() for scale in scales)) + 1
    images = max(images, int(kept_ids.max()) + views)
    embedders = [scale.embedder for scale in scales]
    kept_images = torch.from_numpy(kept)

    def scores(batch: torch.Tensor, owners: Sequence[int]
               ) -> Tuple[List[List[torch.Tensor]], np.ndarray]:
        """Per scale, the held-out patch scores of the images of ``batch`` that every scale can
        score without their own rows, and which those are (bool ``[len(batch)]``)."""
        found: List[List[Optional[torch.Tensor]]] = [[] for _ in scales]
        for start in range(0, len(batch), config["batch_size"]):
            embeddings, _ = patch_features(extractor, embedders,
                                           batch[start:start + config["batch_size"]])
            for scale, per_scale, embedding in zip(scales, found, embeddings):
                per_scale += [_held_out_scores(scale, patches, int(kept_ids[owner]), views, images,
                                               config["k"])
                              for patches, owner in zip(embedding,
                                                        owners[start:start + len(embedding)])]
        scored = np.array([all(per_scale[image] is not None for per_scale in found)
                           for image in range(len(batch))])
        if scored.sum() < 2:
            raise ValueError(f"a detector of several scales measures each scale's normal scores on "
                             f"training images against the other images' patches, but its memory "
                             f"banks ({', '.join(str(len(scale.index)) for scale in scales)} rows) "
                             f"keep fewer than k={config['k']} rows of other images for all but "
                             f"{int(scored.sum())}; use a larger coreset, more images, or one "
                             f"scale (layers='coarse')")
        return [[image for image, keep in zip(per_scale, scored) if keep and image is not None]
                for per_scale in found], scored

    for scale, normal in zip(scales, scores(kept_images, range(len(kept)))[0]):
        scale.normal = NormalScores.of([image.numpy() for image in normal], config["k"])
        scale.weight = 1.0 / len(scales)
    if config["fusion"] != "auto":
        return
    defective, masks, sources = synthetic_defects(kept_images, DEFECTS_PER_IMAGE, config["seed"])
    defect_scores, scored = scores(defective, sources.tolist())
    masks = masks[scored]
    maps = [anomaly_maps(torch.stack(per_scale), tuple(kept.shape[-2:]), config["sigma"],
                         config["upsampling"])
            for per_scale in defect_scores]
    normals = normal_scores(scales)
    ranked = [(pixel_auroc(masks, fused_maps(maps, normals, weights).numpy()), weights)
              for weights in weight_grid(len(scales))]
    best_auroc, best = max(ranked, key=lambda pair: pair[0])  # the first of equals
    for scale, weight in zip(scales, best):
        scale.weight = weight
    logger.info("fusion weights %s (synthetic defects' pixel AUROC %.4f; tried %s) from %d "
                "held-out normal images", list(best), best_auroc,
                ", ".join(f"{list(weights)}: {auroc:.4f}" for auroc, weights in ranked), len(kept))
