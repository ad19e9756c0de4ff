"""A detector's feature scales: their memory banks, built at fit (coreset and exact index of
each, and for several scales their normal statistics and fusion weights, see
:mod:`knnad.selection`), and at predict one anomaly map from them.

Memory banks of several scales: a share of ``coreset`` is a share of the coarsest scale's
patches (the scale of fewest patches); every other scale keeps as many rows as cost the same
to search per image
(fewer, as its patches are more and longer: at crop 224, mobilenet_v2's fine scale has 3,136
patches of 152 dims to the coarse scale's 784 of 128, so a fifth of its rows), selected from a
seeded random pool of as many of each image's patches as the coarsest scale has, drawn while the
images are embedded (:func:`~knnad.embedding.embed_images`), so that neither its memory at fit
nor its coreset costs much more than the first scale's. Predict then searches each scale in
about the same time.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ._checks import check_int
from .anomaly_map import anomaly_maps
from .backbones import FeatureExtractor
from .embedding import Embedded, PatchEmbedder, patch_features
from .fusion import Scale, fused_maps, normal_scores
from .index import FlatL2Index
from .sampling import CoresetSpec, keeps_every_row, subsample
from .scoring import patch_knn_scores, score_patches
from .selection import calibrate_scales

logger = logging.getLogger(__name__)


def index_placement(config: Dict[str, Any]) -> Dict[str, Any]:
    """The keyword arguments of :meth:`FlatL2Index.of` that a detector's settings give."""
    return {"backend": config["backend"], "device": config["device"], "rerank": config["rerank"]}


def scale_embedders(extractor: FeatureExtractor, config: Dict[str, Any]) -> List[PatchEmbedder]:
    """One patch embedder per scale of ``extractor``. With several scales, ``reduce_dim`` reduces
    only the scales that have more channels (a single scale is reduced to it as before)."""
    if len(extractor.scales) == 1:
        return [PatchEmbedder(config["aggregation_size"], config["reduce_dim"])]
    return [PatchEmbedder(config["aggregation_size"], config["reduce_dim"], layers)
            for layers in extractor.scales]


def pool_seed(config: Dict[str, Any]) -> Optional[int]:
    """The seed of the finer scales' per-image pools at fit (see
    :func:`~knnad.embedding.embed_images`); None when the coreset keeps every patch."""
    return None if keeps_every_row(config["coreset"]) else config["seed"]


def _kept_rows(patches: Sequence[int], banks: Sequence[np.ndarray], spec: CoresetSpec
               ) -> List[CoresetSpec]:
    """Each scale's coreset setting: ``spec`` for one scale, or for several when it keeps every
    row; else the coarsest scale's (the one of fewest patches) count of rows, scaled at each
    other scale by the ratio of the coarsest scale's patches per image times dimension to its
    own (the same search cost per image), at most its bank's rows. ``patches``: each scale's
    patches before pooling."""
    if len(banks) == 1 or keeps_every_row(spec):
        return [spec] * len(banks)
    coarsest = int(np.argmin(patches))
    count = max(1, int(len(banks[coarsest]) * spec)) if isinstance(spec, float) else spec
    # patches per image x dim, times images
    cost = [seen * bank.shape[1] for seen, bank in zip(patches, banks)]
    return [min(len(bank), max(1, round(count * cost[coarsest] / own)))
            for bank, own in zip(banks, cost)]


def fit_scales(found: Embedded, embedders: Sequence[PatchEmbedder], extractor: FeatureExtractor,
               config: Dict[str, Any]) -> List[Scale]:
    """The fitted scales of ``found`` (see the module docstring); for several scales, their
    normal statistics and fusion weights from ``found.kept``
    (:func:`~knnad.selection.calibrate_scales`). A ValueError when ``k`` exceeds a memory bank."""
    placement = index_placement(config)
    specs = _kept_rows(found.patches, found.banks, config["coreset"])
    scales = []
    for bank, image_ids, embedder, spec in zip(found.banks, found.image_ids, embedders, specs):
        picks = subsample(bank, spec, config["seed"], extractor.device, config["progress"])
        if len(picks) < len(bank):  # all rows kept: no copy
            bank, image_ids = bank[picks], image_ids[picks]
        check_int(config["k"], "k", 1, len(bank), f" (the {len(bank)} patches in the memory bank; "
                                                  f"use a smaller k or a larger coreset)")
        scales.append(Scale(embedder, FlatL2Index.of(bank, **placement), image_ids))
    if len(scales) > 1:
        calibrate_scales(scales, found.kept, found.kept_ids,
                         len(found.global_features) // len(found.paths), extractor, config)
    return scales


def check_scales(settings: Dict[str, Any], scales: Sequence[Scale]) -> Dict[str, Any]:
    """``settings`` if they can score with ``scales``: ``k`` at most every memory bank's rows; with
    several scales, ``image_score="max"`` and the ``k`` their normal scores were measured with.
    Else a ValueError that says what to change."""
    check_int(settings["k"], "k", 1, min(len(scale.index) for scale in scales),
              " (the patches in the memory bank)")
    if len(scales) == 1:
        return settings
    if settings["image_score"] != "max":
        raise ValueError(f"image_score={settings['image_score']!r} scores one scale; a detector of "
                         f"{len(scales)} scales takes the maximum of its fused map: set "
                         f"image_score='max', or fit one scale (layers='coarse')")
    fitted_k = normal_scores(scales)[0].k
    if settings["k"] != fitted_k:
        raise ValueError(f"k={settings['k']}: this detector's scales are fused in units of normal "
                         f"scores measured with k={fitted_k}; set k={fitted_k}, or fit again with "
                         f"k={settings['k']}")
    return settings


def score_images(extractor: FeatureExtractor, scales: Sequence[Scale], settings: Dict[str, Any],
                 spade: Tuple[FlatL2Index, np.ndarray], images: torch.Tensor
                 ) -> Tuple[np.ndarray, torch.Tensor]:
    """Image scores float32 ``[B]`` and anomaly maps float32 ``[B, H, W]`` of normalised images
    ``[B, 3, H, W]``: the patch embeddings of the scales of non-zero weight searched in their
    banks, each scale's map upsampled and smoothed, several scales fused; the image score per
    ``settings["image_score"]`` (SPADE's with the global index and bank row offsets ``spade``),
    else the map's maximum."""
    active = [scale for scale in scales if scale.weight != 0]
    embeddings, pooled = patch_features(extractor, [scale.embedder for scale in active], images)
    size = (int(images.shape[-2]), int(images.shape[-1]))
    if len(scales) == 1:
        patch_scores, image_scores = score_patches(settings, scales[0].index, *spade, embeddings[0],
                                                   pooled)
        maps = anomaly_maps(patch_scores, size, settings["sigma"], settings["upsampling"])
    else:
        scale_maps = [anomaly_maps(patch_knn_scores(scale.index, embedding, settings["k"]), size,
                                   settings["sigma"], settings["upsampling"])
                      for scale, embedding in zip(active, embeddings)]
        maps = fused_maps(scale_maps, normal_scores(active), [scale.weight for scale in active],
                          settings["fusion"], [size[0] / embedding.shape[1]
                                               for embedding in embeddings])
        image_scores = None
    scores = maps.amax(dim=(1, 2)).numpy() if image_scores is None else image_scores
    return scores.astype(np.float32, copy=False), maps
