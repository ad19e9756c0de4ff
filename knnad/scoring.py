"""Scoring strategies: a batch's patch embeddings to patch scores, and image scores.

``"max"``: each patch's score is the mean Euclidean distance to its ``k`` nearest patches in the
whole memory bank; the image score is then the maximum of the anomaly map (taken by the
detector from the smoothed map). ``"spade"`` (SPADE): the image score is the mean distance of
the image's global feature to its ``image_k`` nearest training images, and each patch is
searched only among the patches of those images (:meth:`FlatL2Index.search_among`: the bank
rows of one training image are contiguous, so a gallery is a few row ranges).
``"reweighted"`` (PatchCore, eq. 7 of Roth et al. 2022): the image score is the largest patch
score ``s*``, of patch ``q*`` whose nearest bank patch is ``m*``, times
``1 − exp(|q* − m*|) / Σ_{m ∈ N_b(m*)} exp(|q* − m|)``, ``N_b(m*)`` being the ``reweight_k``
nearest bank patches of ``m*`` (``m*`` among them): a score is lowered where ``m*`` lies in a
dense region of the bank and kept where it is isolated. The maps are those of ``"max"``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from .index import ExactIndex, FlatL2Index

#: Image score modes.
IMAGE_SCORES = ("max", "spade", "reweighted")


def image_row_ranges(patch_image_ids: np.ndarray, n_images: int) -> np.ndarray:
    """``offsets`` int64 ``[n_images + 1]``: the bank rows of training image ``j`` are
    ``offsets[j]:offsets[j + 1]`` (``patch_image_ids`` must be sorted, as fit keeps it)."""
    return np.searchsorted(patch_image_ids, np.arange(n_images + 1)).astype(np.int64)


def patch_knn_scores(index: ExactIndex, embedding: torch.Tensor, k: int) -> torch.Tensor:
    """Patch scores float32 ``[B, h, w]``: the mean Euclidean distance of each patch of
    ``embedding`` ``[B, h, w, D]`` to its ``k`` nearest rows of ``index``."""
    batch, height, width, dim = embedding.shape
    distances, _ = index.search(embedding.reshape(-1, dim), k)
    return torch.from_numpy(distances.mean(axis=1)).reshape(batch, height, width)


def spade_scores(index: ExactIndex, global_index: FlatL2Index, offsets: np.ndarray,
                 embedding: torch.Tensor, pooled: torch.Tensor, k: int, image_k: int
                 ) -> Tuple[torch.Tensor, np.ndarray]:
    """SPADE: patch scores float32 ``[B, h, w]`` and image scores float32 ``[B]``.

    ``global_index`` holds the training images' global features (row j = image j),
    ``offsets`` their bank rows (:func:`image_row_ranges`), ``pooled`` ``[B, G]`` the test
    images' global features. Raises ValueError when an image's gallery holds fewer than ``k``
    patches (a small coreset with a small ``image_k``).
    """
    image_k = min(image_k, len(global_index))
    image_distances, neighbours = global_index.search(pooled, image_k)
    height, width, dim = embedding.shape[1:]
    scores: List[torch.Tensor] = []
    for patches, nearest in zip(embedding, neighbours):
        ranges = [(int(offsets[j]), int(offsets[j + 1])) for j in np.sort(nearest)
                  if offsets[j + 1] > offsets[j]]
        gallery = sum(stop - start for start, stop in ranges)
        if gallery < k:
            raise ValueError(f"SPADE: the {image_k} nearest training images keep only {gallery} "
                             f"patches (< k={k}); raise image_k or coreset")
        distances, _ = index.search_among(patches.reshape(-1, dim), k, ranges)
        scores.append(torch.from_numpy(distances.mean(axis=1)).reshape(height, width))
    return torch.stack(scores), image_distances.mean(axis=1)


def reweighted_scores(index: ExactIndex, embedding: torch.Tensor, k: int, reweight_k: int
                      ) -> Tuple[torch.Tensor, np.ndarray]:
    """PatchCore's re-weighted image scores (see the module docstring): patch scores float32
    ``[B, h, w]`` (as :func:`patch_knn_scores`) and image scores float32 ``[B]``. The weight's
    distances are exact (computed in float64 from the stored vectors)."""
    batch, height, width, dim = embedding.shape
    queries = embedding.reshape(-1, dim)
    distances, neighbours = index.search(queries, k)
    patch_scores = distances.mean(axis=1).reshape(batch, height * width)
    worst = patch_scores.argmax(axis=1) + np.arange(batch) * height * width  # q* of each image
    nearest = neighbours[worst, 0]  # m*
    centres = torch.stack([index.rows(int(row), int(row) + 1)[0] for row in nearest]).cpu()
    _, support = index.search(centres, min(reweight_k, len(index)))  # N_b(m*)
    weights = np.empty(batch)
    for image, (query, centre, rows) in enumerate(zip(queries[worst].double(), centres.double(),
                                                      support)):
        around = torch.stack([index.rows(int(row), int(row) + 1)[0] for row in rows]).cpu().double()
        spread = torch.linalg.vector_norm(around - query, dim=1)
        own = torch.linalg.vector_norm(centre - query)
        top = spread.max()  # exp of distances relative to the largest: no overflow
        weights[image] = 1.0 - float(torch.exp(own - top) / torch.exp(spread - top).sum())
    image_scores = (patch_scores.max(axis=1) * weights).astype(np.float32)
    return torch.from_numpy(patch_scores).reshape(batch, height, width), image_scores


def score_patches(settings: Dict[str, Any], index: ExactIndex, global_index: FlatL2Index,
                  offsets: np.ndarray, embedding: torch.Tensor, pooled: torch.Tensor
                  ) -> Tuple[torch.Tensor, Optional[np.ndarray]]:
    """Patch scores ``[B, h, w]`` by the strategy ``settings["image_score"]``, and the image
    scores ``[B]`` where the strategy gives them (SPADE, re-weighted), else None (``"max"``:
    the detector takes the maximum of the smoothed map)."""
    if settings["image_score"] == "spade":
        return spade_scores(index, global_index, offsets, embedding, pooled, settings["k"],
                            settings["image_k"])
    if settings["image_score"] == "reweighted":
        return reweighted_scores(index, embedding, settings["k"], settings["reweight_k"])
    return patch_knn_scores(index, embedding, settings["k"]), None
