"""Anomaly detection metrics: image and pixel ROC AUC (and their paired bootstrap), ROC curves,
F1-max and AUPRO.

Built on scikit-learn's ROC and precision–recall curves; pixel metrics work on flattened
arrays in one sort (O(P log P) time, O(P) memory for P pixels, no pairwise work).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score
from sklearn.metrics import roc_curve as _sklearn_roc_curve

from ._checks import check_int


def _binary_and_scores(labels, scores, what: str) -> Tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    scores = np.asarray(scores)
    if labels.shape != scores.shape:
        raise ValueError(f"{what}: labels/masks of shape {labels.shape} and scores/maps of shape "
                         f"{scores.shape} must match")
    if labels.size == 0:
        raise ValueError(f"{what}: no samples")
    if labels.dtype != np.bool_ and not (np.issubdtype(labels.dtype, np.number)
                                         and np.isin(labels, (0, 1)).all()):
        found = np.unique(labels)[:5].tolist()
        raise ValueError(f"{what}: labels/masks must be 0/1 or bool (1 = anomalous), got values "
                         f"such as {found}")
    if not np.issubdtype(scores.dtype, np.number) or np.iscomplexobj(scores):
        raise ValueError(f"{what}: scores/maps must be real numbers, got dtype {scores.dtype}")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{what}: scores hold {int((~np.isfinite(scores)).sum())} NaN/inf values")
    labels = labels.astype(bool).ravel()
    if labels.all() or not labels.any():
        raise ValueError(f"{what} needs both normal and anomalous samples; all are "
                         f"{'anomalous' if labels.all() else 'normal'}")
    return labels, scores.ravel()


def image_auroc(labels, scores) -> float:
    """Area under the ROC curve of image ``scores`` for ``labels`` (1 = defect)."""
    labels, scores = _binary_and_scores(labels, scores, "image_auroc")
    return float(roc_auc_score(labels, scores))


def pixel_auroc(masks, maps) -> float:
    """Area under the ROC curve over all pixels: ``masks`` bool ``[N, H, W]``, ``maps``
    float ``[N, H, W]``."""
    masks, maps = _binary_and_scores(masks, maps, "pixel_auroc")
    return float(roc_auc_score(masks, maps))


def roc_curve(labels, scores) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` for images or, flattened, for pixels (sklearn's points, with
    collinear points dropped, so pixel curves stay small)."""
    labels, scores = _binary_and_scores(labels, scores, "roc_curve")
    return _sklearn_roc_curve(labels, scores, drop_intermediate=True)


def f1_max(labels, scores) -> float:
    """Best F1 score over all thresholds."""
    labels, scores = _binary_and_scores(labels, scores, "f1_max")
    precision, recall, _ = precision_recall_curve(labels, scores)
    f1 = np.divide(2 * precision * recall, precision + recall,
                   out=np.zeros_like(precision), where=(precision + recall) > 0)
    return float(f1.max())


def pro_curve(masks, maps) -> Tuple[np.ndarray, np.ndarray]:
    """Per-region-overlap curve: ``(fpr, pro)``, both ascending from 0 to 1, one point per
    distinct score threshold.

    At a threshold, PRO is the mean over every ground-truth region (8-connected component of a
    mask) of the share of its pixels above the threshold, and FPR the share of normal pixels
    above it (MVTec AD paper, Bergmann et al. 2021).
    """
    masks, maps = np.asarray(masks).astype(bool), np.asarray(maps)
    if masks.ndim != 3 or masks.shape != maps.shape:
        raise ValueError(f"pro_curve needs masks and maps of equal shape [N, H, W], got "
                         f"{masks.shape} and {maps.shape}")
    _binary_and_scores(masks, maps, "pro_curve")
    region_share = np.zeros(masks.shape, dtype=np.float64)  # 1/|region| on region pixels
    regions = 0
    structure = np.ones((3, 3), dtype=bool)
    for image_mask, share in zip(masks, region_share):
        labelled, count = ndimage.label(image_mask, structure=structure)
        if count:
            sizes = np.bincount(labelled.ravel())
            sizes[0] = 1
            share[:] = np.where(labelled > 0, 1.0 / sizes[labelled], 0.0)
        regions += count
    normal_pixels = int((~masks).sum())
    order = np.argsort(maps.ravel(), kind="stable")[::-1]
    scores_sorted = maps.ravel()[order]
    fpr = np.cumsum((~masks).ravel()[order], dtype=np.float64) / normal_pixels
    pro = np.cumsum(region_share.ravel()[order]) / regions
    # One point per threshold: the last pixel of each run of equal scores.
    keep = np.append(np.diff(scores_sorted) != 0, True)
    return np.concatenate([[0.0], fpr[keep]]), np.concatenate([[0.0], pro[keep]])


def aupro(masks, maps, fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve for FPR in [0, ``fpr_limit``], divided by ``fpr_limit`` (1.0 is
    perfect). The curve is interpolated linearly at ``fpr_limit``."""
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    fpr, pro = pro_curve(masks, maps)
    end = np.searchsorted(fpr, fpr_limit, side="right")
    x = np.append(fpr[:end], fpr_limit)
    y = np.append(pro[:end], np.interp(fpr_limit, fpr, pro))
    return float(np.trapezoid(y, x) / fpr_limit)


def _ordered_pair_counts(masks: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """``[N, N]`` float64 of ``masks`` bool and ``maps`` ``[N, P]`` (each image's P pixels):
    entry ``[i, j]`` counts the (defect pixel of image i, normal pixel of image j) pairs that
    ``maps`` ranks correctly, ties counting one half. Summed over all i, j it is the
    Mann–Whitney numerator of the pixel AUROC."""
    counts = np.zeros((len(masks), len(masks)))
    defect_scores = maps[masks]
    defect_images = np.nonzero(masks)[0]
    for j, (mask, scores) in enumerate(zip(masks, maps)):
        normal = np.sort(scores[~mask])
        below = np.searchsorted(normal, defect_scores, side="left")
        not_above = np.searchsorted(normal, defect_scores, side="right")
        counts[:, j] = np.bincount(defect_images, weights=(below + not_above) / 2.0,
                                   minlength=len(masks))
    return counts


def pixel_auroc_bootstrap(masks, *maps, rounds: int = 2000, seed: int = 0) -> np.ndarray:
    """Pixel AUROC of each set of ``maps`` on ``rounds`` bootstrap resamples of the images.

    ``masks`` bool ``[N, H, W]``; each of ``maps`` float ``[N, H, W]``. Resample ``r`` takes
    each image as often as row ``r`` of ``numpy.random.default_rng(seed).multinomial(N,
    [1/N]*N, size=rounds)`` says, the same resamples for every map set, so differences between
    columns are paired. Returns float64 ``[rounds, len(maps)]``; NaN where a resample holds no
    defect pixel. Exact (equal to :func:`pixel_auroc` of the repeated images), and cheap: the
    pixels are ranked once per map set, then each resample is a weighted sum over image pairs.
    """
    return _paired_bootstrap(masks, maps, 3, "pixel_auroc_bootstrap", rounds, seed)


def image_auroc_bootstrap(labels, *scores, rounds: int = 2000, seed: int = 0) -> np.ndarray:
    """Image AUROC of each set of ``scores`` (float ``[N]``; ``labels`` ``[N]``, 1 = defect) on
    ``rounds`` bootstrap resamples of the images: float64 ``[rounds, len(scores)]``, NaN where
    a resample holds no defect (or no normal) image. The resamples are
    :func:`pixel_auroc_bootstrap`'s for the same ``N``, ``rounds`` and ``seed``, so image and
    pixel intervals of one run come from the same resampled test sets."""
    return _paired_bootstrap(labels, scores, 1, "image_auroc_bootstrap", rounds, seed)


def _paired_bootstrap(masks, maps, ndim: int, what: str, rounds: int, seed: int) -> np.ndarray:
    """AUROC of each of ``maps`` on bootstrap resamples of the images of ``masks`` (``ndim``
    dimensions: 1 for image labels, each image then a single "pixel"; 3 for pixel masks)."""
    masks = np.asarray(masks).astype(bool)
    masks_name, maps_name, shape = (("labels", "scores", "[N]") if ndim == 1
                                    else ("masks", "maps", "[N, H, W]"))
    if not maps:
        raise ValueError(f"{what} needs at least one set of {maps_name}")
    if masks.ndim != ndim:
        raise ValueError(f"{what}: {masks_name} must be {shape}, got shape {masks.shape}")
    check_int(rounds, "rounds", hint=" (bootstrap resamples)")
    pixels = masks.reshape(len(masks), -1)
    pair_counts = []
    for position, image_maps in enumerate(maps):
        image_maps = np.asarray(image_maps)
        if image_maps.shape != masks.shape:
            raise ValueError(f"{what}: {maps_name} #{position} has shape {image_maps.shape}, "
                             f"{masks_name} {masks.shape}")
        _binary_and_scores(masks, image_maps, what)
        pair_counts.append(_ordered_pair_counts(pixels, image_maps.reshape(len(masks), -1)))
    count = len(masks)
    weights = np.random.default_rng(seed).multinomial(count, [1.0 / count] * count, size=rounds)
    defect = pixels.sum(axis=1).astype(np.float64)
    normal = pixels.shape[1] - defect
    pairs = (weights @ defect) * (weights @ normal)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.stack([np.einsum("ri,ij,rj->r", weights, counts, weights) / pairs
                         for counts in pair_counts], axis=1)
