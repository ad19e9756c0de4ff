"""Figures as PNG files: ROC curves, PRO curves and heatmap grids.

Uses matplotlib's object API with the Agg canvas, so it never touches pyplot's global state or
needs a display.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence, Tuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ._types import PathLike
from .metrics import aupro, image_auroc, pixel_auroc, pro_curve, roc_curve

Curves = Mapping[str, Tuple[np.ndarray, np.ndarray]]


def _save(figure: Figure, path: PathLike) -> Path:
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"folder {path.parent} for the plot does not exist")
    FigureCanvasAgg(figure)
    figure.savefig(path, format="png")
    return path


def roc_plot(curves: Curves, path: PathLike, title: str = "ROC") -> Path:
    """One ROC curve per entry of ``curves`` ({label: (labels or masks, scores or maps)}),
    AUROC in the legend, written as a 6×6 inch PNG at 100 dpi (600×600 px). Returns the path."""
    if not curves:
        raise ValueError("roc_plot needs at least one curve")
    figure = Figure(figsize=(6, 6), dpi=100)
    axes = figure.add_subplot()
    for label, (truth, scores) in curves.items():
        fpr, tpr, _ = roc_curve(truth, scores)
        auroc = pixel_auroc(truth, scores) if np.ndim(truth) > 1 else image_auroc(truth, scores)
        axes.plot(fpr, tpr, label=f"{label} (AUROC {auroc:.3f})")
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axes.set(xlabel="false positive rate", ylabel="true positive rate", title=title,
             xlim=(0, 1), ylim=(0, 1.01))
    axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    return _save(figure, path)


def pro_plot(curves: Curves, path: PathLike, fpr_limit: float = 0.3, title: str = "PRO") -> Path:
    """Per-region-overlap curves ({label: (masks, maps)}) up to ``fpr_limit``, AUPRO in the
    legend; 600×600 px PNG. Returns the path."""
    if not curves:
        raise ValueError("pro_plot needs at least one curve")
    figure = Figure(figsize=(6, 6), dpi=100)
    axes = figure.add_subplot()
    for label, (masks, maps) in curves.items():
        fpr, pro = pro_curve(masks, maps)
        axes.plot(fpr, pro,
                  label=f"{label} (AUPRO@{fpr_limit:g} {aupro(masks, maps, fpr_limit):.3f})")
    axes.axvline(fpr_limit, color="grey", linestyle=":", linewidth=1)
    axes.set(xlabel="false positive rate", ylabel="per-region overlap", title=title,
             xlim=(0, 1), ylim=(0, 1.01))
    axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    return _save(figure, path)


def heatmap_grid(images: Sequence[np.ndarray], maps: np.ndarray, path: PathLike,
                 masks: Optional[np.ndarray] = None, threshold: Optional[float] = None,
                 titles: Optional[Sequence[str]] = None, vmax: Optional[float] = None) -> Path:
    """One row per image: the image, the image with the ground-truth contour (if ``masks``),
    the anomaly map over the image, and the map thresholded at ``threshold`` (if given).

    ``images``: RGB ``[H, W, 3]`` in [0, 1] (see :func:`denormalise`); ``maps``: ``[N, H, W]``;
    the colour scale is shared (0 to ``vmax``, default the largest map value). Each panel is
    2.5 inches at 100 dpi. Returns the path.
    """
    count = len(images)
    if count == 0 or len(maps) != count or (masks is not None and len(masks) != count):
        raise ValueError("heatmap_grid needs as many "
                         f"maps{' and masks' if masks is not None else ''} as images (>= 1), got "
                         f"{count} images and {len(maps)} maps")
    columns = ["image"] + (["ground truth"] if masks is not None else []) + ["anomaly map"] \
        + (["above threshold"] if threshold is not None else [])
    figure = Figure(figsize=(2.5 * len(columns), 2.5 * count), dpi=100)
    grid = figure.subplots(count, len(columns), squeeze=False)
    top = float(vmax if vmax is not None else np.max(maps))
    for row in range(count):
        panels = iter(grid[row])
        axes = next(panels)
        axes.imshow(images[row])
        axes.set_ylabel(titles[row] if titles else f"#{row}", fontsize="small")
        if masks is not None:
            axes = next(panels)
            axes.imshow(images[row])
            if masks[row].any():
                axes.contour(masks[row], levels=[0.5], colors="lime", linewidths=1)
        axes = next(panels)
        axes.imshow(images[row])
        axes.imshow(maps[row], cmap="jet", alpha=0.5, vmin=0, vmax=top)
        if threshold is not None:
            axes = next(panels)
            axes.imshow(maps[row] > threshold, cmap="gray", vmin=0, vmax=1)
        for axes, name in zip(grid[row], columns):
            axes.set_xticks([])
            axes.set_yticks([])
            if row == 0:
                axes.set_title(name, fontsize="small")
    figure.tight_layout()
    return _save(figure, path)
