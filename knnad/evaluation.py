"""Evaluate a fitted detector on a labelled test set: every metric, overall and per defect."""
from __future__ import annotations

import logging
import time
from typing import Any, Dict, Optional

import numpy as np

from .datasets import ImageDataset, load_masks
from .detector import Detector
from .metrics import aupro, f1_max, image_auroc, pixel_auroc
from .prediction import Prediction

logger = logging.getLogger(__name__)


def score_prediction(prediction: Prediction, labels: np.ndarray, defects,
                     masks: Optional[np.ndarray], fpr_limit: float = 0.3) -> Dict[str, Any]:
    """Metrics of a prediction against ground truth: ``image_auroc``, ``image_f1_max``,
    ``pixel_auroc``, ``aupro`` (None without masks) and ``per_defect``: the same for the good
    images together with each defect type's images."""
    def block(rows: np.ndarray) -> Dict[str, Optional[float]]:
        result = {"images": int(len(rows)),
                  "image_auroc": image_auroc(labels[rows], prediction.image_scores[rows]),
                  "image_f1_max": f1_max(labels[rows], prediction.image_scores[rows]),
                  "pixel_auroc": None, "aupro": None}
        if masks is not None and masks[rows].any():
            result["pixel_auroc"] = pixel_auroc(masks[rows], prediction.anomaly_maps[rows])
            result["aupro"] = aupro(masks[rows], prediction.anomaly_maps[rows], fpr_limit)
        return result

    defects = np.asarray(defects)
    everything: Dict[str, Any] = block(np.arange(len(labels)))
    everything["per_defect"] = {
        defect: block(np.flatnonzero((defects == defect) | (labels == 0)))
        for defect in sorted(set(defects[labels == 1]))}
    return everything


def evaluate(detector: Detector, test_dataset: ImageDataset, *, fpr_limit: float = 0.3,
             return_prediction: bool = False):
    """Predict ``test_dataset`` (good and defect images) and compute every metric.

    Returns a dict: ``image_auroc``, ``image_f1_max``, ``pixel_auroc``, ``aupro`` (pixel metrics
    None when masks are missing; on the pixels of the maps: the crop, the whole resized frame
    with ``crop_size=None``, or every pixel of the images with ``map_size="original"``),
    ``per_defect`` {defect: same keys}, ``images``, ``predict_seconds`` and
    ``images_per_second``. With ``return_prediction=True`` returns ``(results, prediction,
    masks)``.
    """
    if not isinstance(test_dataset, ImageDataset):
        raise TypeError(f"test_dataset must be a knnad dataset (MVTecAD, BTAD, ImageFolder), "
                        f"got {type(test_dataset).__name__}")
    start = time.perf_counter()
    prediction = detector.predict(test_dataset)
    seconds = time.perf_counter() - start
    if prediction.skipped:
        raise ValueError(f"evaluate: {len(prediction.skipped)} test images could not be read: "
                         f"{prediction.skipped[:5]}; fix or remove them")
    masks = load_masks(test_dataset, detector.preprocessor_,
                       original=detector.map_size == "original")
    results = score_prediction(prediction, test_dataset.labels, test_dataset.defects, masks,
                               fpr_limit)
    results.update(predict_seconds=seconds, images_per_second=len(prediction) / seconds)
    return (results, prediction, masks) if return_prediction else results
