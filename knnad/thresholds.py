"""Deployment thresholds, set from defect-free images only, and the labels and masks they give."""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Mapping, Optional

import numpy as np

from ._checks import check_number

logger = logging.getLogger(__name__)


def check_quantile(quantile: Any) -> float:
    """``quantile`` as a float in (0, 1], else a ValueError naming it."""
    value = check_number(quantile, "quantile", 0.0)
    if not 0 < value <= 1:
        raise ValueError(f"quantile must be in (0, 1], got {quantile!r}")
    return value


@dataclass(frozen=True)
class Thresholds:
    """``image``: image scores above it are anomalous; ``pixel``: map values above it are;
    ``quantile``: the quantile of normal images' scores they were set at; ``scored_with``: the
    detector settings that shape the scores (k, maps, image score) when they were set, or None
    where that is unknown (models saved by knnad 0.1)."""

    image: float
    pixel: float
    quantile: float
    scored_with: Optional[Dict[str, Any]] = None

    @classmethod
    def from_normal(cls, image_scores: np.ndarray, anomaly_maps: np.ndarray, quantile: float,
                    scored_with: Optional[Dict[str, Any]] = None) -> "Thresholds":
        """The ``quantile`` of normal images' scores ``[N]`` and of their maps' maxima
        (``anomaly_maps`` ``[N, H, W]``), so that a normal image at that quantile has no
        flagged pixel."""
        quantile = check_quantile(quantile)
        maxima = anomaly_maps.reshape(len(anomaly_maps), -1).max(axis=1)
        return cls(float(np.quantile(image_scores, quantile)), float(np.quantile(maxima, quantile)),
                   quantile, None if scored_with is None else dict(scored_with))

    def changed(self, settings: Mapping[str, Any]) -> List[str]:
        """The scoring settings that differ from ``scored_with``, as ``"k=1 (now 3)"``."""
        return [f"{name}={before!r} (now {settings[name]!r})"
                for name, before in (self.scored_with or {}).items() if settings[name] != before]

    def usable(self, settings: Mapping[str, Any]) -> bool:
        """Whether ``settings`` score as those the thresholds were set with; if not, a warning
        says why (the thresholds would compare scores of another scale)."""
        changed = self.changed(settings)
        if changed:
            logger.warning("no labels or masks: the thresholds were calibrated with %s; call "
                           "calibrate() again", ", ".join(changed))
        return not changed

    def apply(self, prediction: Any) -> Any:
        """A copy of a :class:`~knnad.prediction.Prediction` with its ``labels`` and ``masks``."""
        return replace(prediction, labels=self.labels(prediction.image_scores),
                       masks=self.masks(prediction.anomaly_maps))

    def labels(self, image_scores: np.ndarray) -> np.ndarray:
        """bool ``[N]``: True for anomalous images."""
        return image_scores > self.image

    def masks(self, anomaly_maps: np.ndarray) -> np.ndarray:
        """bool ``[N, H, W]``: True for anomalous pixels."""
        return anomaly_maps > self.pixel
