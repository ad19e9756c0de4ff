"""One self-contained HTML inspection report of a prediction: a sortable table of the images
with their scores and heatmap thumbnails, each image's full-size overlay on click, a threshold
slider that recounts flagged, missed and falsely flagged images in the browser, ROC and PRO
curves and per-defect metrics where the ground truth is known.

The file needs no server, network or build step: plain HTML, CSS and JavaScript from
``knnad/templates/report.html``, every picture embedded as a base64 data URI. Thumbnails are
small JPEGs decoded as they scroll into view (``loading="lazy"``); the full-size overlays are kept
as text in the page and decoded only when one is opened, so reports of thousands of images open
and scroll smoothly.
"""
from __future__ import annotations

import base64
import html
import io
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union
from urllib.parse import quote

import numpy as np
from matplotlib import colormaps
from PIL import Image
from scipy import ndimage

from ._types import PathLike
from ._version import __version__
from .evaluation import score_prediction
from .plots import pro_plot, roc_plot
from .prediction import Prediction
from .thresholds import Thresholds

logger = logging.getLogger(__name__)

#: Longer side in pixels of a table thumbnail (shown at 112 CSS pixels, sharp at 1.4x zoom).
THUMBNAIL_SIZE = 160
#: Largest longer side in pixels of each panel of the full-size view (smaller maps keep theirs).
FULL_SIZE = 384
#: JPEG quality of thumbnails and full-size views.
JPEG_QUALITY = 80
#: Opacity of the heatmap over the image (as in :func:`knnad.plots.heatmap_grid`).
ALPHA = 0.5
#: Colour map of the heatmaps (as in :func:`knnad.plots.heatmap_grid`).
COLOUR_MAP = "jet"
#: Colour of the ground-truth contour, RGB.
CONTOUR = (0, 255, 0)
#: Gap in pixels between the two panels of the full-size view.
GAP = 8

TEMPLATE = "report.html"
#: Ground-truth labels: 0/1 per image, 1 = defect.
Labels = Union[Sequence[int], np.ndarray]


def score_text(score: float) -> str:
    """How the report writes an image score: four decimals (``1.23456`` -> ``"1.2346"``)."""
    return f"{score:.4f}"


@dataclass(frozen=True)
class _Image:
    """One table row: the image's place in the prediction, its path, score, ground truth
    (``label`` 0/1, None where unknown; ``defect``, "" where unknown) and its pictures as base64
    JPEG."""

    index: int
    path: str
    score: float
    label: Optional[int]
    defect: str
    thumbnail: str
    full: str


def _jpeg(picture: np.ndarray) -> str:
    """Base64 JPEG of an RGB uint8 ``[H, W, 3]`` array."""
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _resized(picture: np.ndarray, size: int) -> np.ndarray:
    """``picture`` (``[H, W]`` or ``[H, W, 3]`` uint8) shrunk so that its longer side is at most
    ``size`` pixels (never enlarged); masks (2-D) with the nearest neighbour, images with
    Lanczos."""
    height, width = picture.shape[:2]
    scale = size / max(height, width)
    if scale >= 1:
        return picture
    target = (max(1, round(width * scale)), max(1, round(height * scale)))
    method = Image.Resampling.NEAREST if picture.ndim == 2 else Image.Resampling.LANCZOS
    return np.asarray(Image.fromarray(picture).resize(target, method))


def _contoured(picture: np.ndarray, mask: Optional[np.ndarray]) -> np.ndarray:
    """A copy of RGB uint8 ``picture`` with the outline of ``mask`` (bool, same or larger size:
    it is shrunk to the picture's) drawn in :data:`CONTOUR`, 1/150 of the picture wide and at
    least 2 pixels (so that JPEG's colour, stored at half resolution, keeps it green)."""
    if mask is None or not mask.any():
        return picture
    mask = _resized(mask.astype(np.uint8), max(picture.shape[:2])) > 0
    width = max(2, round(max(mask.shape) / 150))
    edge = mask & ~ndimage.binary_erosion(mask, iterations=width)
    picture = picture.copy()
    picture[edge] = CONTOUR
    return picture


def heatmap_vmax(thresholds: Optional[Thresholds]) -> Optional[float]:
    """Top of the heatmaps' colour scale the report uses by default: twice the pixel threshold
    with ``thresholds``, else None (each image's own largest value)."""
    return 2 * thresholds.pixel if thresholds else None


def heatmap_overlay(image: np.ndarray, anomaly_map: np.ndarray,
                    vmax: Optional[float] = None) -> np.ndarray:
    """RGB uint8 ``[H, W, 3]``: ``anomaly_map`` ``[H, W]`` coloured by :data:`COLOUR_MAP` from
    0 to ``vmax`` (None: the map's largest value) over ``image`` (RGB float ``[H, W, 3]`` in
    [0, 1]) at :data:`ALPHA`."""
    top = float(anomaly_map.max()) if vmax is None else vmax
    colours = colormaps[COLOUR_MAP](np.clip(anomaly_map / (top if top > 0 else 1.0), 0, 1))
    image = np.clip(image, 0, 1)
    return np.round(255 * ((1 - ALPHA) * image + ALPHA * colours[..., :3])).astype(np.uint8)


def _pictures(image: np.ndarray, anomaly_map: np.ndarray, mask: Optional[np.ndarray],
              vmax: Optional[float]) -> tuple:
    """``(thumbnail, full)`` base64 JPEGs of one image: the thumbnail is the heatmap over the
    image; the full-size view the image and the heatmap over it side by side, each at most
    :data:`FULL_SIZE` pixels. Both show the ground-truth contour of ``mask`` where it has one.

    ``image``: RGB float ``[H, W, 3]`` in [0, 1]; ``anomaly_map``: ``[H, W]``, coloured from 0
    to ``vmax`` (None: its largest value); ``mask``: bool ``[H, W]`` or None.
    """
    plain = np.round(255 * np.clip(image, 0, 1)).astype(np.uint8)
    overlay = heatmap_overlay(image, anomaly_map, vmax)
    thumbnail = _contoured(_resized(overlay, THUMBNAIL_SIZE), mask)
    left, right = (_contoured(_resized(panel, FULL_SIZE), mask) for panel in (plain, overlay))
    gap = np.full((left.shape[0], GAP, 3), 255, np.uint8)
    return _jpeg(thumbnail), _jpeg(np.concatenate([left, gap, right], axis=1))


def _display_names(paths: Sequence[str]) -> List[str]:
    """Paths relative to the deepest folder that holds them all (``good/000.png``,
    ``broken_large/000.png``): short, and still telling apart equal names in different folders."""
    base = os.path.commonpath([os.path.dirname(os.path.abspath(path)) for path in paths])
    return [os.path.relpath(os.path.abspath(path), base) for path in paths]


def flag_counts(scores: np.ndarray, threshold: float, labels: Optional[np.ndarray] = None
                ) -> Dict[str, int]:
    """What the report's counters show at ``threshold``: ``flagged`` (scores above it); with
    ``labels`` (0/1, 1 = defect) also ``missed`` (defects not flagged) and ``false_alarms``
    (good images flagged). Compared in float64, as the browser does."""
    flagged = np.asarray(scores, np.float64) > threshold
    counts = {"flagged": int(flagged.sum())}
    if labels is not None:
        labels = np.asarray(labels).astype(bool)
        counts.update(missed=int((labels & ~flagged).sum()),
                      false_alarms=int((~labels & flagged).sum()))
    return counts


def _kinds(labels: Optional[Labels], defects: Optional[Sequence[str]]
           ) -> Optional[List[str]]:
    """Each image's defect type: ``defects``, or from ``labels`` alone "defect" and "good";
    None without labels."""
    if labels is None:
        if defects is not None:
            raise ValueError("defects need labels (0/1 per image, 1 = defect)")
        return None
    return [str(kind) for kind in defects] if defects is not None else \
        ["defect" if label else "good" for label in labels]


def _script_json(value: Any) -> str:
    """JSON for a ``<script type="application/json">`` block: ``<``, ``>`` and ``&`` escaped, so
    that no text in it can close the block."""
    return (json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("&", "\\u0026"))


def _fill(template: str, parts: Dict[str, str]) -> str:
    """``template`` with each ``{{name}}`` replaced by ``parts[name]`` in one pass (what is put
    in is not searched again); KeyError for a name without a part."""
    return re.sub(r"\{\{(\w+)\}\}", lambda match: parts[match.group(1)], template)


def _number(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.4f}"


class HtmlReport:
    """An HTML inspection report, built one prediction (or batch of one) at a time, so that a
    long run need not keep its anomaly maps: each image is reduced to its score and its JPEG
    pictures (a few tens of KB) when it is added.

    Parameters
    ----------
    rgb
        The image under a map, from its path: RGB float ``[H, W, 3]`` in [0, 1] of the map's
        ``[H, W]``, such as ``detector.preprocessor_.rgb`` (see
        :func:`knnad.report.display_images`, which also handles ``map_size="original"``).
    thresholds
        The detector's ``thresholds_`` when they score as its current settings (its predictions
        then carry labels), else None. Their ``image`` threshold is where the slider starts.
    vmax
        Top of the heatmaps' colour scale (their bottom is 0), in the maps' units; default:
        twice the pixel threshold with ``thresholds``, else each image's own largest value.
    title
        The page's title and heading.
    """

    def __init__(self, rgb: Callable[[str], np.ndarray], *, thresholds: Optional[Thresholds] = None,
                 vmax: Optional[float] = None, title: str = "knnad inspection report"):
        self.rgb, self.thresholds, self.title = rgb, thresholds, title
        self.vmax = vmax if vmax is not None else heatmap_vmax(thresholds)
        self.images: List[_Image] = []
        self.skipped: List[Optional[str]] = []  # None: an image given as an array
        self.masked = False  # whether any image came with a ground-truth mask

    def add(self, prediction: Prediction, labels: Optional[Labels] = None,
            defects: Optional[Sequence[str]] = None, masks: Optional[np.ndarray] = None) -> None:
        """Add the images of ``prediction`` (from files: each needs its path) with their ground
        truth where known: ``labels`` 0/1 (1 = defect) ``[N]``, ``defects`` (defect type of each
        image, such as ``"good"``; default "defect" and "good" from the labels) ``[N]``,
        ``masks`` bool ``[N, H, W]`` like the maps. Either every added prediction has labels or
        none has."""
        count = len(prediction)
        for name, given in (("labels", labels), ("defects", defects), ("masks", masks)):
            if given is not None and len(given) != count:
                raise ValueError(f"{name}: {len(given)} given for a prediction of {count} images")
        paths = [str(path) for path in prediction.paths if path is not None]
        if len(paths) != count:
            raise ValueError("the report shows images from their files; this prediction holds "
                             "images given as arrays (no path)")
        if self.images and (labels is None) != (self.images[0].label is None):
            raise ValueError("labels were given for some predictions and not for others")
        defects = _kinds(labels, defects)
        self.skipped += prediction.skipped
        self.masked |= masks is not None and bool(np.any(masks))
        for row, path in enumerate(paths):
            anomaly_map = prediction.anomaly_maps[row]
            image = self.rgb(path)
            if image.shape[:2] != anomaly_map.shape:
                raise ValueError(f"{path}: the display image is {image.shape[1]}x{image.shape[0]}, "
                                 f"its map {anomaly_map.shape[1]}x{anomaly_map.shape[0]}; with "
                                 f"map_size='original' show the images as given "
                                 f"(knnad.report.display_images)")
            thumbnail, full = _pictures(image, anomaly_map, None if masks is None else masks[row],
                                        self.vmax)
            self.images.append(_Image(len(self.images), path, float(prediction.image_scores[row]),
                                      None if labels is None else int(labels[row]),
                                      "" if defects is None else defects[row], thumbnail, full))

    def write(self, path: PathLike, *, figures: Sequence[bytes] = (),
              metrics: Optional[Dict[str, Any]] = None) -> Path:
        """Write the report to ``path`` (in its place once complete) and return the path.

        ``figures``: PNG files' bytes to show (such as :mod:`knnad.plots`' ROC and PRO curves);
        ``metrics``: :func:`knnad.evaluation.score_prediction`'s figures, shown per defect type.
        """
        if not self.images:
            raise ValueError("the report has no image: add a prediction of at least one image")
        path = Path(path)
        template = resources.files("knnad").joinpath("templates", TEMPLATE).read_text("utf-8")
        text = _fill(template, self._parts(figures, metrics))
        _replace(path, text)
        logger.info("wrote %s: %d images, %.1f MiB", path, len(self.images), len(text) / 2**20)
        return path

    # The page's parts, each escaped where it holds text from outside.

    def _labelled(self) -> bool:
        return self.images[0].label is not None

    def _threshold(self, scores: np.ndarray, labels: Optional[np.ndarray]) -> tuple:
        """Where the slider starts, and the sentence that says why."""
        thresholds = self.thresholds
        if thresholds is not None:
            return float(thresholds.image), (f"calibrated image threshold {thresholds.image:.4f} "
                                      f"(quantile {thresholds.quantile:g} of normal images)")
        if labels is not None and not labels.all():
            return float(scores[labels == 0].max()), ("no calibrated threshold: the slider starts "
                                                      "at the highest score of a good image")
        return float(scores.max()), "no calibrated threshold: the slider starts above every score"

    def _parts(self, figures: Sequence[bytes], metrics: Optional[Dict[str, Any]]) -> Dict[str, str]:
        scores = np.array([image.score for image in self.images])
        labels = np.array([image.label for image in self.images]) if self._labelled() else None
        threshold, why = self._threshold(scores, labels)
        counts = flag_counts(scores, threshold, labels)
        # The slider runs from below every score (all flagged) to above every score (none).
        margin = float(scores.max() - scores.min()) / 100 or 0.01
        config = {"threshold": threshold, "low": min(threshold, float(scores.min()) - margin),
                  "high": max(threshold, float(scores.max()) + margin), "masks": self.masked}
        ranked = sorted(self.images, key=lambda image: -image.score)  # stable: ties by index
        names = dict(zip((image.index for image in self.images),
                         _display_names([image.path for image in self.images])))
        return {
            "title": html.escape(self.title), "version": html.escape(__version__),
            "summary": html.escape(self._summary(labels)), "why": html.escape(why),
            "threshold": repr(threshold), "counts": self._counts(counts, labels),
            "filters": self._filters(), "scale": self._scale(),
            "figures": "".join(f'<img alt="curve" src="data:image/png;base64,'
                               f'{base64.b64encode(png).decode("ascii")}">' for png in figures),
            "defects": self._defect_table(metrics, threshold),
            "head": self._head(), "labelled": ' class="labelled"' if self._labelled() else "",
            "rows": "\n".join(self._row(image, names[image.index], threshold) for image in ranked),
            "fulls": "\n".join(f'<script type="text/plain" id="full-{image.index}">'
                               f'{image.full}</script>' for image in self.images),
            "skipped": self._skipped(), "config": _script_json(config)}

    def _summary(self, labels: Optional[np.ndarray]) -> str:
        text = f"{len(self.images)} images"
        if labels is not None:
            text += f": {int(labels.sum())} defect, {int((labels == 0).sum())} good"
        return text + (f"; {len(self.skipped)} could not be read" if self.skipped else "")

    @staticmethod
    def _counts(counts: Dict[str, int], labels: Optional[np.ndarray]) -> str:
        parts = [f'<span class="count"><b id="flagged">{counts["flagged"]}</b> flagged</span>']
        if labels is not None:
            parts += [f'<span class="count"><b id="missed">{counts["missed"]}</b> of '
                      f'{int(labels.sum())} defects missed</span>',
                      f'<span class="count"><b id="false-alarms">{counts["false_alarms"]}</b> of '
                      f'{int((labels == 0).sum())} good flagged (false alarms)</span>']
        return " ".join(parts)

    def _filters(self) -> str:
        shown = [("all", "all images"), ("flagged", "flagged"), ("passed", "not flagged")]
        if self._labelled():
            shown += [("missed", "missed defects"), ("false-alarm", "false alarms")]
        return "".join(f'<option value="{value}">{text}</option>' for value, text in shown)

    def _scale(self) -> str:
        """The colour bar of the heatmaps: a CSS gradient of :data:`COLOUR_MAP`, its ends."""
        stops = ", ".join("rgb({}, {}, {})".format(*np.round(255 * colour[:3]).astype(int))
                          for colour in colormaps[COLOUR_MAP](np.linspace(0, 1, 9)))
        top = "each image's largest value" if self.vmax is None else f"{self.vmax:.4g}"
        return (f'<span class="scale">heatmap 0 <span class="bar" style="background: '
                f'linear-gradient(to right, {stops})"></span> {html.escape(top)}</span>')

    def _defect_table(self, metrics: Optional[Dict[str, Any]], threshold: float) -> str:
        """Per defect type: its images, flagged at the threshold, and the metrics of the good
        images with its images (``metrics["per_defect"]``; those of all images in "all")."""
        if not self._labelled():
            return ""
        defects = [image.defect for image in self.images]
        blocks = {"all": metrics, **metrics["per_defect"]} if metrics else {}
        rows = []
        for defect in ["all"] + sorted(set(defects), key=lambda name: (name != "good", name)):
            members = [image for image, kind in zip(self.images, defects)
                       if defect in ("all", kind)]
            flagged = sum(image.score > threshold for image in members)
            block = blocks.get(defect, {})
            cells = "".join(f'<td class="num">{_number(block.get(name))}</td>'
                            for name in ("image_auroc", "image_f1_max", "pixel_auroc", "aupro"))
            rows.append(f'<tr><td>{html.escape(defect)}</td><td class="num">{len(members)}</td>'
                        f'<td class="num"><span data-flagged-of="{html.escape(defect)}">{flagged}'
                        f'</span></td>{cells}</tr>')
        return ('<h2>By defect type</h2><table id="defects"><thead><tr><th>type</th>'
                '<th class="num">images</th><th class="num">flagged</th>'
                '<th class="num">image AUROC</th><th class="num">image F1-max</th>'
                '<th class="num">pixel AUROC</th><th class="num">AUPRO</th></tr></thead><tbody>'
                + "".join(rows) + "</tbody></table><p class=\"note\">Metrics of each type are "
                "those of its images with the good images; empty where they do not apply.</p>")

    def _head(self) -> str:
        columns = [("index", "number", "#"), (None, None, "image"), ("name", "text", "file"),
                   ("score", "number", "score")]
        if self._labelled():
            columns += [("label", "number", "truth"), ("defect", "text", "defect type")]
        columns.append(("flagged", "number", "flagged"))
        return "".join(f"<th>{text}</th>" if key is None else
                       f'<th data-key="{key}" data-type="{kind}"'
                       f'{" class=num" if key in ("index", "score") else ""}'
                       f'{" aria-sort=descending" if key == "score" else ""}>{text}</th>'
                       for key, kind, text in columns)

    @staticmethod
    def _row(image: _Image, name: str, threshold: float) -> str:
        flagged = image.score > threshold
        truth = "" if image.label is None else (
            f'<td>{"defect" if image.label else "good"}</td>'
            f'<td>{html.escape(image.defect)}</td>')
        return (f'<tr data-index="{image.index}" data-score="{image.score!r}" '
                f'data-label="{"" if image.label is None else image.label}" '
                f'data-defect="{html.escape(image.defect)}" data-name="{html.escape(name)}">'
                f'<td class="num">{image.index}</td>'
                f'<td><img class="thumb" loading="lazy" decoding="async" alt="heatmap of '
                f'{html.escape(name)}" src="data:image/jpeg;base64,{image.thumbnail}"></td>'
                f'<td class="name" title="{html.escape(image.path)}">{html.escape(name)}</td>'
                f'<td class="num score">{score_text(image.score)}</td>{truth}'
                f'<td class="flag">{"yes" if flagged else "no"}</td></tr>')

    def _skipped(self) -> str:
        if not self.skipped:
            return ""
        return (f"<h2>Not read</h2><p>{len(self.skipped)} images could not be read:</p><ul>"
                + "".join(f"<li>{html.escape(str(path))}</li>" for path in self.skipped) + "</ul>")


def _curves(prediction: Prediction, labels: np.ndarray, masks: Optional[np.ndarray], title: str,
            fpr_limit: float) -> List[bytes]:
    """PNG bytes of :mod:`knnad.plots`' image ROC and, with masks of defect and normal pixels,
    pixel ROC and PRO curves."""
    with tempfile.TemporaryDirectory() as folder:
        paths = [roc_plot({"images": (labels, prediction.image_scores)}, Path(folder, "roc.png"),
                          title=f"{title}: image ROC")]
        if masks is not None and masks.any() and not masks.all():
            pixels = {"pixels": (masks, prediction.anomaly_maps)}
            paths += [roc_plot(pixels, Path(folder, "pixel.png"), title=f"{title}: pixel ROC"),
                      pro_plot(pixels, Path(folder, "pro.png"), fpr_limit, title=f"{title}: PRO")]
        return [path.read_bytes() for path in paths]


def _replace(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, in its place only once complete."""
    partial = path.with_name(path.name + ".partial")
    try:
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


#: The columns of :func:`write_index`: (figure's key, header).
INDEX_COLUMNS = (("test_images", "test images"), ("image_auroc", "image AUROC"),
                 ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO"))


def write_index(path: PathLike, title: str, reports: Sequence[tuple]) -> Path:
    """Write one self-contained HTML page to ``path`` that links the categories' reports:
    ``reports`` holds ``(category, report file name in path's folder, figures)``, figures
    a dict with the keys of :data:`INDEX_COLUMNS` (None where not measured). Returns the path."""
    def cell(value: Any) -> str:
        return "–" if value is None else (f"{value:.4f}" if isinstance(value, float) else
                                          html.escape(str(value)))
    header = "".join(f"<th>{html.escape(name)}</th>" for _, name in INDEX_COLUMNS)
    rows = "".join(
        f'<tr><td><a href="{html.escape(quote(href))}">{html.escape(category)}</a></td>'
        + "".join(f"<td>{cell(figures.get(key))}</td>" for key, _ in INDEX_COLUMNS) + "</tr>"
        for category, href, figures in reports)
    text = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>'
            f"{html.escape(title)}</title><style>body{{font-family:system-ui,sans-serif;"
            f"margin:2em}}table{{border-collapse:collapse}}td,th{{padding:.35em .9em;"
            f"border-bottom:1px solid #ddd;text-align:right}}td:first-child,th:first-child"
            f"{{text-align:left}}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p>One inspection report per category; written by knnad {__version__}.</p>"
            f"<table><tr><th>category</th>{header}</tr>{rows}</table></body></html>\n")
    path = Path(path)
    _replace(path, text)
    return path


def write_html(prediction: Prediction, path: PathLike, rgb: Callable[[str], np.ndarray], *,
               labels: Optional[Labels] = None, defects: Optional[Sequence[str]] = None,
               masks: Optional[np.ndarray] = None, thresholds: Optional[Thresholds] = None,
               title: str = "knnad inspection report", fpr_limit: float = 0.3,
               metrics: Optional[Dict[str, Any]] = None,
               figures: Optional[Sequence[PathLike]] = None) -> Path:
    """Write one self-contained HTML inspection report of ``prediction`` to ``path``.

    Parameters
    ----------
    prediction
        What ``Detector.predict`` returned for image files (each needs its path).
    path
        The HTML file to write (replaced once complete).
    rgb
        The image under each map from its path: RGB float ``[H, W, 3]`` in [0, 1] of the map's
        size, e.g. ``knnad.report.display_images(detector)``.
    labels, defects, masks
        Ground truth where known: 0/1 per image (1 = defect), the defect type of each image
        (``"good"`` for good ones; needs labels), bool ``[N, H, W]`` like
        ``prediction.anomaly_maps``. With labels of both kinds the report shows per-defect
        metrics, the image ROC curve and counts of missed defects and false alarms; with masks
        also the pixel ROC and PRO curves (AUPRO up to ``fpr_limit``) and each mask's contour
        over its image.
    thresholds
        ``detector.thresholds_``, where they fit the detector's current scoring settings; the
        slider starts at their image threshold and the heatmaps' colour scale runs from 0 to
        twice their pixel threshold. Without them the slider starts at the highest good score
        (labels known) or above every score, and the colour scale ends at the largest map value.
    title
        The page's title and heading.
    metrics, figures
        What the report would compute from the ground truth, where it is already at hand (the
        pixel metrics of thousands of maps take minutes): the figures of
        :func:`knnad.evaluation.score_prediction` for these labels, defects and masks (such as
        :func:`knnad.evaluation.evaluate`'s results), and PNG files of the curves to show.

    Returns
    -------
    Path
        ``path``. Each image adds its thumbnail (about 6 KB as base64) and its full-size view
        (about 20 KB for a 224x224 map, 41 KB at most: each panel is shrunk to
        :data:`FULL_SIZE` pixels).
    """
    top = None if thresholds is not None else float(np.max(prediction.anomaly_maps, initial=0))
    report = HtmlReport(rgb, thresholds=thresholds, vmax=top, title=title)
    report.add(prediction, labels, defects, masks)
    pictures = [Path(figure).read_bytes() for figure in figures or ()]
    truth = None if labels is None else np.asarray(labels).astype(int)
    if truth is not None and 0 < truth.sum() < len(truth):
        if figures is None:
            pictures = _curves(prediction, truth, masks, title, fpr_limit)
        if metrics is None:
            metrics = score_prediction(prediction, truth, _kinds(truth, defects), masks,
                                       fpr_limit)
    return report.write(path, figures=pictures, metrics=metrics)
