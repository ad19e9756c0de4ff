"""What a detector's predict returns: :class:`Prediction` (numpy only, shared by
:class:`~knnad.Detector` and the torch-free :class:`~knnad.onnx_detector.OnnxDetector`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np


@dataclass
class Prediction:
    """What :meth:`Detector.predict` returns, one entry per scored image.

    ``image_scores``: float32 ``[N]``; ``anomaly_maps``: float32 ``[N, H, W]`` (the crop, or
    the whole resized image with ``crop_size=None``; the images' own size with
    ``map_size="original"``); ``paths``: the image paths (None for in-memory images);
    ``labels`` (bool ``[N]``, True = anomalous) and ``masks`` (bool ``[N, H, W]``) once the
    detector is calibrated; ``skipped``: paths that could not be decoded and were skipped
    (``on_error="skip"``; None for an in-memory image); ``image_sizes``: ``(height, width)`` of
    each image as given.
    """

    image_scores: np.ndarray
    anomaly_maps: np.ndarray
    paths: List[Optional[str]]
    labels: Optional[np.ndarray] = None
    masks: Optional[np.ndarray] = None
    skipped: List[Optional[str]] = field(default_factory=list)
    image_sizes: List[Tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.image_scores)

    @classmethod
    def empty(cls, size: Tuple[int, int], skipped: List[Optional[str]]) -> "Prediction":
        """A prediction of no image (its images were all ``skipped``), maps of ``size``."""
        return cls(np.empty(0, np.float32), np.empty((0, *size), np.float32), [], skipped=skipped)

    @classmethod
    def concatenate(cls, parts: List["Prediction"], action: str = "predict") -> "Prediction":
        """One prediction of ``parts`` in order (labels and masks where every part has them);
        ValueError for ``action`` when no image at all was scored."""
        skipped = [path for part in parts for path in part.skipped]
        parts = [part for part in parts if len(part)]  # those of skipped images only: no maps
        if not parts:
            raise ValueError(f"{action}: none of the {len(skipped)} images could be read "
                             f"(skipped: {skipped})")
        shapes = sorted({part.anomaly_maps.shape[1:] for part in parts})
        if len(shapes) > 1:
            raise ValueError(f"{action}: maps of different sizes "
                             f"({', '.join(f'{w}x{h}' for h, w in shapes)}) cannot share one "
                             "array; predict each image size in its own call, or use "
                             "predict_batches")
        labelled = all(part.labels is not None for part in parts)
        return cls(np.concatenate([part.image_scores for part in parts]),
                   np.concatenate([part.anomaly_maps for part in parts]),
                   [path for part in parts for path in part.paths],
                   np.concatenate([part.labels for part in parts]) if labelled else None,
                   np.concatenate([part.masks for part in parts]) if labelled else None, skipped,
                   [size for part in parts for size in part.image_sizes])
