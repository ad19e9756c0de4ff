"""Evaluation reports: fit and evaluate a detector per category, then write results.md,
results.csv, results.json, ROC and PRO plots and heatmap grids to one folder. The example
scripts and ``knnad evaluate`` are thin wrappers around :func:`evaluate_and_report`."""
from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import plots
from .datasets import BTAD, BTAD_ARCHIVE_FOLDER, ImageDataset, MVTecAD
from .detector import Detector
from .evaluation import evaluate

logger = logging.getLogger(__name__)

DatasetPair = Tuple[str, ImageDataset, ImageDataset]  # (name, train, test)
COLUMNS = ("category", "image_auroc", "pixel_auroc", "aupro", "image_f1_max", "train_images",
           "test_images", "memory_bank", "fit_seconds", "images_per_second")


def discover_categories(kind: str, root: Path) -> List[str]:
    """Category folders under ``root`` (those holding ``train/`` and ``test/``), sorted."""
    root = Path(root)
    if kind == "btad" and (root / BTAD_ARCHIVE_FOLDER).is_dir():
        root = root / BTAD_ARCHIVE_FOLDER
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist")
    found = sorted(p.name for p in root.iterdir() if (p / "train").is_dir() and (p / "test").is_dir())
    if not found:
        raise ValueError(f"no category folders (with train/ and test/) under {root}")
    return found


def dataset_pairs(kind: str, root: Path, categories: Optional[Sequence[str]] = None) -> List[DatasetPair]:
    """``(name, train, test)`` for each category of an MVTec AD (``kind="mvtec"``) or BTAD
    (``"btad"``) root; all categories found when ``categories`` is None."""
    loaders = {"mvtec": MVTecAD, "btad": BTAD}
    if kind not in loaders:
        raise ValueError(f"dataset kind {kind!r}; choose one of {sorted(loaders)}")
    names = list(categories) if categories else discover_categories(kind, root)
    return [(name, loaders[kind](root, name, "train"), loaders[kind](root, name, "test")) for name in names]


def _heatmaps(name: str, test: ImageDataset, prediction, masks, detector: Detector, out: Path,
              count: int) -> Optional[Path]:
    """A grid of the highest-scoring defect images and the highest-scoring good image."""
    labels, ranked = test.labels, np.argsort(-prediction.image_scores)
    defect_rows = [int(i) for i in ranked if labels[i] == 1][: max(0, count - 1)]
    good_rows = [int(i) for i in ranked if labels[i] == 0][:1]
    rows = defect_rows + good_rows
    if not rows:
        return None
    images = [plots.denormalise(detector.preprocessor(test.samples[i].path).numpy()) for i in rows]
    titles = [f"{test.samples[i].defect} {prediction.image_scores[i]:.2f}" for i in rows]
    return plots.heatmap_grid(images, prediction.anomaly_maps[rows], out / f"heatmaps_{name}.png",
                              masks=None if masks is None else masks[rows],
                              threshold=detector.pixel_threshold_, titles=titles)


def evaluate_and_report(pairs: Sequence[DatasetPair], detector_params: Dict[str, Any], out: Path,
                        heatmaps: int = 4, title: str = "knnad", save_models: bool = False
                        ) -> List[Dict[str, Any]]:
    """Fit a ``Detector(**detector_params)`` on each train set, evaluate it on the test set and
    write the report to ``out`` (and ``model_<name>.npz`` with ``save_models``). Returns one row
    of figures per category (and a mean row when there are several)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, details = [], {}
    image_curves, pixel_curves = {}, {}
    for name, train, test in pairs:
        logger.info("%s: fitting on %d images", name, len(train))
        detector = Detector(**detector_params)
        start = time.perf_counter()
        detector.fit(train)
        fit_seconds = time.perf_counter() - start
        results, prediction, masks = evaluate(detector, test, return_prediction=True)
        details[name] = results
        rows.append({"category": name, "image_auroc": results["image_auroc"],
                     "pixel_auroc": results["pixel_auroc"], "aupro": results["aupro"],
                     "image_f1_max": results["image_f1_max"], "train_images": len(train),
                     "test_images": len(test), "memory_bank": len(detector.index_),
                     "fit_seconds": fit_seconds, "images_per_second": results["images_per_second"]})
        image_curves[name] = (test.labels, prediction.image_scores)
        if masks is not None:
            pixel_curves[name] = (masks, prediction.anomaly_maps)
        if save_models:
            detector.save(out / f"model_{name}.npz")
        if heatmaps:
            _heatmaps(name, test, prediction, masks, detector, out, heatmaps)
    if len(rows) > 1:
        mean = {"category": "mean"}
        for column in COLUMNS[1:]:
            values = [row[column] for row in rows if row[column] is not None]
            mean[column] = float(np.mean(values)) if values else None
        rows.append(mean)
    plots.roc_plot(image_curves, out / "roc_image.png", title=f"{title}: image ROC")
    if pixel_curves:
        plots.roc_plot(pixel_curves, out / "roc_pixel.png", title=f"{title}: pixel ROC")
        plots.pro_plot(pixel_curves, out / "pro.png", title=f"{title}: PRO")
    _write_tables(rows, details, detector_params, out, title)
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _write_tables(rows, details, params, out: Path, title: str) -> None:
    shown = {k: (v if isinstance(v, (str, int, float, bool, type(None), list, tuple)) else str(v))
             for k, v in params.items()}
    lines = [f"# {title}", "", f"Detector: `{json.dumps(shown)}`", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in COLUMNS) + " |" for row in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.json").write_text(json.dumps({"detector": shown, "rows": rows,
                                                  "details": details}, indent=2))
