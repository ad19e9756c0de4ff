"""Evaluation reports: fit and evaluate a detector per category, then write results.md,
results.csv, results.json, ROC and PRO plots, heatmap grids and an HTML inspection report per
category to one folder. The example scripts and ``knnad evaluate`` are thin wrappers around
:func:`evaluate_and_report`. :func:`write_html` (from :mod:`knnad.html_report`) writes the HTML
report of any prediction."""
from __future__ import annotations

import csv
import json
import logging
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from .datasets import DatasetPair, ImageDataset
from .detector import Detector
from .evaluation import evaluate
from .html_report import HtmlReport, write_html, write_index  # noqa: F401 (public)
from .plots import heatmap_grid, pro_plot, roc_plot
from .preprocessing import ImageInput

logger = logging.getLogger(__name__)

COLUMNS = ("category", "image_auroc", "pixel_auroc", "aupro", "image_f1_max", "train_images",
           "test_images", "memory_bank", "fit_seconds", "images_per_second")


def display_images(detector: Detector) -> Callable[[ImageInput], np.ndarray]:
    """The image under ``detector``'s maps, from its path: RGB float ``[H, W, 3]`` in [0, 1] as
    the model saw it (resized, cropped), or as given with ``map_size="original"``."""
    return partial(detector.preprocessor_.rgb, original=detector.map_size == "original")


#: The HTML report in :func:`evaluate_and_report`'s folder: the category's report where one
#: category was evaluated, else a page that links the categories' reports.
REPORT = "report.html"


def html_name(category: str, categories: int = 1) -> str:
    """File name of a category's HTML report in :func:`evaluate_and_report`'s folder, where
    ``categories`` were evaluated: :data:`REPORT` for the only one, ``report_<category>.html``
    for each of several."""
    return REPORT if categories == 1 else f"report_{category}.html"


def _heatmaps(name: str, test: ImageDataset, prediction, masks, detector: Detector, out: Path,
              count: int) -> Optional[Path]:
    """A grid of the highest-scoring defect images and the highest-scoring good image."""
    labels, ranked = test.labels, np.argsort(-prediction.image_scores)
    defect_rows = [int(i) for i in ranked if labels[i] == 1][: max(0, count - 1)]
    good_rows = [int(i) for i in ranked if labels[i] == 0][:1]
    rows = defect_rows + good_rows
    if not rows:
        return None
    rgb = display_images(detector)
    images = [rgb(test.samples[i].path) for i in rows]
    titles = [f"{test.samples[i].defect} {prediction.image_scores[i]:.2f}" for i in rows]
    threshold = detector.thresholds_.pixel if detector.thresholds_ else None
    return heatmap_grid(images, prediction.anomaly_maps[rows], out / f"heatmaps_{name}.png",
                        masks=None if masks is None else masks[rows], threshold=threshold,
                        titles=titles)


def evaluate_and_report(pairs: Sequence[DatasetPair], detector_params: Dict[str, Any], out: Path,
                        heatmaps: int = 4, title: str = "knnad", save_models: bool = False
                        ) -> List[Dict[str, Any]]:
    """Fit a ``Detector(**detector_params)`` on each train set, evaluate it on the test set and
    write the report to ``out``: results.md, .csv and .json, ROC and PRO plots, heatmaps_<name>.png
    (with ``heatmaps`` > 0), the HTML inspection report of each category (with the curves of
    all; :func:`html_name`; ``report.html`` links them where there are several) and, with
    ``save_models``, model_<name>.npz. Returns one row of figures per category (and a mean row
    when there are several)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, details, pages = [], {}, []
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
                     "test_images": len(test),
                     "memory_bank": sum(len(scale.index) for scale in detector.scales_),
                     "fit_seconds": fit_seconds, "images_per_second": results["images_per_second"]})
        image_curves[name] = (test.labels, prediction.image_scores)
        if masks is not None:
            pixel_curves[name] = (masks, prediction.anomaly_maps)
        if save_models:
            detector.save(out / f"model_{name}.npz")
        if heatmaps:
            _heatmaps(name, test, prediction, masks, detector, out, heatmaps)
        pages.append((name, test, prediction, masks, display_images(detector),
                      detector.thresholds_))
    if len(rows) > 1:
        mean: Dict[str, Any] = {"category": "mean"}
        for column in COLUMNS[1:]:
            values = [row[column] for row in rows if row[column] is not None]
            mean[column] = float(np.mean(values)) if values else None
        rows.append(mean)
    figures = [roc_plot(image_curves, out / "roc_image.png", title=f"{title}: image ROC")]
    if pixel_curves:
        figures += [roc_plot(pixel_curves, out / "roc_pixel.png", title=f"{title}: pixel ROC"),
                    pro_plot(pixel_curves, out / "pro.png", title=f"{title}: PRO")]
    for name, test, prediction, masks, rgb, thresholds in pages:  # the curves of every category
        write_html(prediction, out / html_name(name, len(pages)), rgb, labels=test.labels,
                   defects=test.defects, masks=masks, thresholds=thresholds,
                   title=f"{title}: {name}", metrics=details[name], figures=figures)
    if len(pages) > 1:
        write_index(out / REPORT, title, [(name, html_name(name, len(pages)), row)
                                          for name, row in zip(details, rows)])
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
