"""Scoring strategies: a batch's patch embeddings to patch scores, and image scores.

``"max"``: each patch's score is the mean Euclidean distance to its ``k`` nearest patches in the
whole memory bank; the image score is then the maximum of the anomaly map (taken by the
detector from the smoothed map). ``"spade"`` (SPADE): the image score is the mean distance of
the image's global feature to its ``image_k`` nearest training images, and each patch is
searched only among the patches of those images (:meth:`FlatL2Index.search_among`: the bank
rows of one training image are contiguous, so a gallery is a few row ranges).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from .index import FlatL2Index

#: Image score modes.
IMAGE_SCORES = ("max", "spade")


@dataclass
class Prediction:
    """What :meth:`Detector.predict` returns, one entry per scored image.

    ``image_scores``: float32 ``[N]``; ``anomaly_maps``: float32 ``[N, H, W]`` (crop size);
    ``paths``: the image paths (None for in-memory images); ``labels`` (bool ``[N]``, True =
    anomalous) and ``masks`` (bool ``[N, H, W]``) once the detector is calibrated;
    ``skipped``: paths that could not be decoded and were skipped (``on_error="skip"``).
    """

    image_scores: np.ndarray
    anomaly_maps: np.ndarray
    paths: List[Optional[str]]
    labels: Optional[np.ndarray] = None
    masks: Optional[np.ndarray] = None
    skipped: List[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.image_scores)

    @classmethod
    def empty(cls, size: Tuple[int, int], skipped: List[str]) -> "Prediction":
        """A prediction of no image (its images were all ``skipped``), maps of ``size``."""
        return cls(np.empty(0, np.float32), np.empty((0, *size), np.float32), [], skipped=skipped)

    @classmethod
    def concatenate(cls, parts: List["Prediction"], action: str = "predict") -> "Prediction":
        """One prediction of ``parts`` in order (labels and masks where every part has them);
        ValueError for ``action`` when no image at all was scored."""
        skipped = [path for part in parts for path in part.skipped]
        if not any(len(part) for part in parts):
            raise ValueError(f"{action}: none of the {len(skipped)} images could be read "
                             f"(skipped: {skipped})")
        labelled = all(part.labels is not None for part in parts)
        return cls(np.concatenate([part.image_scores for part in parts]),
                   np.concatenate([part.anomaly_maps for part in parts]),
                   [path for part in parts for path in part.paths],
                   np.concatenate([part.labels for part in parts]) if labelled else None,
                   np.concatenate([part.masks for part in parts]) if labelled else None, skipped)


def image_row_ranges(patch_image_ids: np.ndarray, n_images: int) -> np.ndarray:
    """``offsets`` int64 ``[n_images + 1]``: the bank rows of training image ``j`` are
    ``offsets[j]:offsets[j + 1]`` (``patch_image_ids`` must be sorted, as fit keeps it)."""
    return np.searchsorted(patch_image_ids, np.arange(n_images + 1)).astype(np.int64)


def patch_knn_scores(index: FlatL2Index, embedding: torch.Tensor, k: int) -> torch.Tensor:
    """Patch scores float32 ``[B, h, w]``: the mean Euclidean distance of each patch of
    ``embedding`` ``[B, h, w, D]`` to its ``k`` nearest rows of ``index``."""
    batch, height, width, dim = embedding.shape
    distances, _ = index.search(embedding.reshape(-1, dim), k)
    return torch.from_numpy(distances.mean(axis=1)).reshape(batch, height, width)


def spade_scores(index: FlatL2Index, global_index: FlatL2Index, offsets: np.ndarray,
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


def score_patches(settings: Dict[str, Any], index: FlatL2Index, global_index: FlatL2Index,
                  offsets: np.ndarray, embedding: torch.Tensor, pooled: torch.Tensor
                  ) -> Tuple[torch.Tensor, Optional[np.ndarray]]:
    """Patch scores ``[B, h, w]`` by the strategy ``settings["image_score"]``, and the image
    scores ``[B]`` where the strategy gives them (SPADE), else None (``"max"``: the detector
    takes the maximum of the smoothed map)."""
    if settings["image_score"] == "spade":
        return spade_scores(index, global_index, offsets, embedding, pooled, settings["k"],
                            settings["image_k"])
    return patch_knn_scores(index, embedding, settings["k"]), None
