"""The HTML inspection report (issue #24): one self-contained file whose table, counters and
pictures say what the prediction says; knnad predict, evaluate and demo write it; and, in the
system's chromium, its sorting, slider and full-size view work."""
import base64
import csv
import io
import json
import re
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from knnad import Detector, Prediction, Thresholds
from knnad.cli import demo_root, main
from knnad.datasets import MVTecAD, load_masks
from knnad.evaluation import score_prediction
from knnad.html_report import FULL_SIZE, GAP, THUMBNAIL_SIZE, HtmlReport
from knnad.report import display_images, evaluate_and_report, html_name, write_html

from conftest import FAST, skip_or_fail

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = ROOT / "docs" / "images" / "report.png"
#: File names that break HTML unless escaped.
NAMES = ["<img src=x onerror=alert(1)>.png", "a&b \"quoted\" 'single'.png", "plain.png",
         "&lt;b&gt; <b>bold.png", "five.png", "six.png"]
SCORES = np.array([0.5, 2.25, 1.0, 3.125, 0.75, 0.25], np.float32)  # exact in float32
LABELS = np.array([0, 1, 0, 1, 1, 0])
DEFECTS = ["good", "crack", "good", "crack", "hole", "good"]
METRICS = ("image_auroc", "image_f1_max", "pixel_auroc", "aupro")


class Page(HTMLParser):
    """What a report holds: every tag with its attributes, the image table's rows (their
    attributes and cells' text) and the text of each element with an id."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags, self.rows, self.ids, self.open, self.in_row = [], [], {}, [], False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "tr" and "data-index" in attrs:
            self.rows.append({"attrs": attrs, "cells": []})
            self.in_row = True
        elif tag == "td" and self.in_row:
            self.rows[-1]["cells"].append("")
        if tag not in ("img", "input", "meta", "br"):
            self.open.append((tag, attrs.get("id")))
            if attrs.get("id"):
                self.ids[attrs["id"]] = ""

    def handle_endtag(self, tag):
        while self.open and self.open.pop()[0] != tag:
            pass
        if tag == "tr":
            self.in_row = False

    def handle_data(self, data):
        for _, element in self.open:
            if element:
                self.ids[element] += data
        if self.in_row and self.rows[-1]["cells"]:
            self.rows[-1]["cells"][-1] += data

    def cells(self, column: int):
        return [row["cells"][column].strip() for row in self.rows]


def defect_rows(text: str):
    """The per-defect table's cells after the type, by type."""
    return {defect: re.findall(r'<td class="num">(?:<span[^>]*>)?([^<]*)', cells)
            for defect, cells in re.findall(r"<tr><td>(\w+)</td>(.*?)</tr>", text)}


def jpeg(data: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    assert image.format == "JPEG"
    return image


def thumbnails(text: str):
    """Base64 of each row's thumbnail, by the row's index."""
    return {int(index): data for index, data in re.findall(
        r'<tr data-index="(\d+)".*?src="data:image/jpeg;base64,([^"]+)"', text)}


def fulls(page: Page):
    return {int(key[len("full-"):]): value for key, value in page.ids.items()
            if key.startswith("full-")}


def green(picture: np.ndarray) -> np.ndarray:
    """Pixels of the ground-truth contour's colour (after JPEG)."""
    red, green_, blue = np.moveaxis(picture.astype(int), -1, 0)
    return (green_ > 180) & (red < 90) & (blue < 90)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Six 48x64 images with awkward names, their maps and masks (defect images only)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for number, name in enumerate(NAMES):
        path = folder / name
        Image.fromarray(np.full((48, 64, 3), 40 * number, np.uint8)).save(path)
        paths.append(str(path))
    maps = ndimage.gaussian_filter(rng.random((6, 48, 64)), (0, 4, 4)).astype(np.float32) * 4
    masks = np.zeros((6, 48, 64), bool)
    for row in np.flatnonzero(LABELS):
        masks[row, 10:30, 20:50] = True
    return Prediction(SCORES, maps, paths), masks


def rgb(path):
    return np.asarray(Image.open(path).convert("RGB"), np.float32) / 255


def test_report_is_self_contained_and_shows_every_image_escaped(synthetic, tmp_path):
    prediction, masks = synthetic
    path = write_html(prediction, tmp_path / "report.html", rgb, labels=LABELS, defects=DEFECTS,
                      masks=masks, title="<b>line</b> 3 & co")
    text = path.read_text()
    page = Page(text)
    # Nothing from outside: no web address, no linked file, no stylesheet or script from a file.
    assert "http://" not in text and "https://" not in text and "url(" not in text
    assert "@import" not in text and not list(tmp_path.glob("*.partial"))
    for tag, attrs in page.tags:
        assert tag not in ("link", "iframe", "object", "embed"), tag
        for name in ("src", "href", "srcset", "action", "poster"):
            if name in attrs:
                assert attrs[name].startswith("data:"), (tag, name, attrs[name][:40])
    assert page.ids["config"] and json.loads(page.ids["config"])["masks"] is True
    # Every image, highest score first, its score with four decimals, names as they are.
    order = np.argsort(-SCORES, kind="stable")
    assert [int(row["attrs"]["data-index"]) for row in page.rows] == order.tolist()
    assert page.cells(3) == ["3.1250", "2.2500", "1.0000", "0.7500", "0.5000", "0.2500"]
    assert page.cells(2) == [NAMES[i] for i in order]
    assert page.cells(4) == ["defect" if LABELS[i] else "good" for i in order]
    assert page.cells(5) == [DEFECTS[i] for i in order]
    for name in NAMES[:2] + NAMES[3:4]:  # never as markup
        assert name not in text
    assert "<b>line</b>" not in text and page.ids.get("config") is not None
    assert re.search(r"<h1>&lt;b&gt;line&lt;/b&gt; 3 &amp; co</h1>", text)
    assert [float(row["attrs"]["data-score"]) for row in page.rows] == SCORES[order].tolist()


def test_counts_flags_and_defect_table_at_the_threshold(synthetic, tmp_path):
    prediction, masks = synthetic
    # Not calibrated: the slider starts at the highest good score, 1.0: 3.125 and 2.25 are
    # flagged, the defect at 0.75 is missed, no good image is flagged.
    page = Page(write_html(prediction, tmp_path / "a.html", rgb, labels=LABELS, defects=DEFECTS,
                           masks=masks).read_text())
    assert (page.ids["flagged"], page.ids["missed"], page.ids["false-alarms"]) == ("2", "1", "0")
    assert page.cells(6) == ["yes", "yes", "no", "no", "no", "no"]
    # Calibrated at 0.6: 3.125, 2.25, 1.0 (good: a false alarm) and 0.75 flagged, none missed.
    thresholds = Thresholds(image=0.6, pixel=0.5, quantile=0.99)
    text = write_html(prediction, tmp_path / "b.html", rgb, labels=LABELS, defects=DEFECTS,
                      masks=masks, thresholds=thresholds).read_text()
    page = Page(text)
    assert (page.ids["flagged"], page.ids["missed"], page.ids["false-alarms"]) == ("4", "0", "1")
    assert page.cells(6) == ["yes", "yes", "yes", "yes", "no", "no"]
    assert 'id="threshold" type="number" step="any" value="0.6"' in text
    assert "calibrated image threshold 0.6000 (quantile 0.99" in text
    assert "heatmap 0 <span" in text and "</span> 1</span>" in text  # twice the pixel threshold
    assert defect_rows(text) == {  # images, flagged, image AUROC, F1-max, pixel AUROC, AUPRO
        "all": ["6", "4"] + defect_rows(text)["all"][2:],
        "good": ["3", "1", "–", "–", "–", "–"],
        "crack": ["2", "2", "1.0000", "1.0000"] + defect_rows(text)["crack"][4:],
        "hole": ["1", "1", "0.6667", "0.6667"] + defect_rows(text)["hole"][4:]}
    # The metrics are evaluation.score_prediction's, with four decimals.
    figures = score_prediction(prediction, LABELS, DEFECTS, masks)
    for defect, block in [("all", figures), *figures["per_defect"].items()]:
        assert defect_rows(text)[defect][2:] == [f"{block[name]:.4f}" for name in METRICS]
    assert text.count('alt="curve" src="data:image/png;base64,') == 3  # ROC, pixel ROC, PRO


def test_unlabelled_report_counts_flagged_only(synthetic, tmp_path):
    prediction, _ = synthetic
    text = write_html(prediction, tmp_path / "r.html", rgb).read_text()
    page = Page(text)
    # No threshold: the slider starts at the highest score; nothing is flagged.
    assert page.ids["flagged"] == "0" and "missed" not in page.ids
    assert "false-alarms" not in page.ids and 'id="defects"' not in text
    assert "alt=\"curve\"" not in text and "starts above every score" in text
    assert [len(row["cells"]) for row in page.rows] == [5] * 6  # #, image, file, score, flagged
    assert page.cells(4) == ["no"] * 6 and "missed defects" not in text
    # The slider spans every score, with a margin on both sides.
    config = json.loads(page.ids["config"])
    assert config["low"] < 0.25 and config["high"] > 3.125 and config["threshold"] == 3.125


def test_pictures_thumbnail_full_view_and_contours(synthetic, tmp_path):
    prediction, masks = synthetic
    text = write_html(prediction, tmp_path / "r.html", rgb, labels=LABELS, masks=masks).read_text()
    page = Page(text)
    thumbs, views = thumbnails(text), fulls(page)
    assert sorted(thumbs) == sorted(views) == list(range(6))
    for index in range(6):
        thumb, view = jpeg(thumbs[index]), np.asarray(jpeg(views[index]))
        assert thumb.size == (64, 48)  # small images are not enlarged
        assert view.shape == (48, 2 * 64 + GAP, 3)  # the image | the heatmap over it
        left = view[:, :64]
        # The contour of the mask's 30x20 rectangle, 2 pixels wide, on defect images only.
        assert green(left).sum() == (pytest.approx(30 * 20 - 26 * 16, abs=8) if LABELS[index]
                                     else 0)
        # The left panel is the image itself (grey level 40 * index).
        assert np.median(left[~green(left)]) == pytest.approx(40 * index, abs=3)


def test_pictures_stay_small_for_large_images(bottle_root, tmp_path):
    """Genuine 900x900 MVTec images with maps of their own size (map_size='original'): the
    thumbnail is THUMBNAIL_SIZE, each panel of the full view FULL_SIZE, under 60 KB an image."""
    sample = bottle_root / "bottle"
    paths = sorted((sample / "test" / "broken_large").iterdir())[:3]
    maps = ndimage.gaussian_filter(np.random.default_rng(1).random((3, 900, 900)), (0, 30, 30))
    masks = np.asarray([np.asarray(Image.open(sample / "ground_truth" / "broken_large" /
                                              f"{path.stem}_mask.png")) > 0 for path in paths])
    text = write_html(Prediction(np.array([1, 2, 3], np.float32), maps.astype(np.float32),
                                 list(map(str, paths))),
                      tmp_path / "r.html", rgb, labels=[1, 1, 1], masks=masks).read_text()
    page = Page(text)
    for index, thumb in thumbnails(text).items():
        view = fulls(page)[index]
        assert jpeg(thumb).size == (THUMBNAIL_SIZE, THUMBNAIL_SIZE)
        assert jpeg(view).size == (2 * FULL_SIZE + GAP, FULL_SIZE)
        assert len(thumb) + len(view) < 60_000, len(thumb) + len(view)


def test_built_batch_by_batch_as_in_one_go(synthetic, tmp_path):
    prediction, masks = synthetic
    report = HtmlReport(rgb, vmax=float(prediction.anomaly_maps.max()))
    for rows in (slice(0, 4), slice(4, 6)):
        report.add(Prediction(SCORES[rows], prediction.anomaly_maps[rows], prediction.paths[rows],
                              skipped=["broken.png"] if rows.start else []))
    batched = report.write(tmp_path / "batched.html").read_text()
    whole = write_html(prediction, tmp_path / "whole.html", rgb).read_text()
    assert Page(batched).rows == Page(whole).rows
    assert thumbnails(batched) == thumbnails(whole)  # the same colour scale: 0 to the largest
    assert "<li>broken.png</li>" in batched and "6 images; 1 could not be read" in batched


def test_bad_inputs_are_refused(synthetic, tmp_path):
    prediction, _ = synthetic
    with pytest.raises(ValueError, match="no path"):
        write_html(Prediction(SCORES[:1], prediction.anomaly_maps[:1], [None]), tmp_path / "a", rgb)
    with pytest.raises(ValueError, match="defects need labels"):
        write_html(prediction, tmp_path / "a", rgb, defects=DEFECTS)
    with pytest.raises(ValueError, match="labels: 2 given for a prediction of 6"):
        write_html(prediction, tmp_path / "a", rgb, labels=[0, 1])
    with pytest.raises(ValueError, match="display image is 64x48, its map 32x24"):
        write_html(Prediction(SCORES, prediction.anomaly_maps[:, ::2, ::2], prediction.paths),
                   tmp_path / "a", rgb)
    report = HtmlReport(rgb)
    with pytest.raises(ValueError, match="no image"):
        report.write(tmp_path / "a")
    report.add(prediction, LABELS)
    with pytest.raises(ValueError, match="labels were given for some"):
        report.add(prediction)
    assert not list(tmp_path.iterdir())


def test_predict_writes_report_html(fast_model, tmp_path, capsys):
    images = demo_root() / "bottle" / "test" / "broken_small"
    out = tmp_path / "scores"
    assert main(["predict", str(fast_model), str(images), "--out", str(out), "--no-heatmaps",
                 "--no-progress", "--batch-size", "2"]) == 0
    assert f"-> {out / 'scores.csv'}, {out / 'report.html'}" in capsys.readouterr().out
    with open(out / "scores.csv") as handle:
        rows = {Path(row["path"]).name: row for row in csv.DictReader(handle)}
    page = Page((out / "report.html").read_text())
    assert sorted(page.cells(2)) == sorted(rows) and len(page.rows) == 3
    for name, score, flagged in zip(page.cells(2), page.cells(3), page.cells(4)):
        assert score == f"{float(rows[name]['score']):.4f}"
        assert flagged == ("yes" if rows[name]["anomalous"] == "1" else "no")
    threshold = Detector.load(fast_model).thresholds_.image
    assert re.search(rf'id="threshold" type="number" step="any" value="{threshold!r}"',
                     (out / "report.html").read_text())
    # Scoring options other than the calibration's: the thresholds do not apply.
    assert main(["predict", str(fast_model), str(images), "--out", str(out), "--no-heatmaps",
                 "--no-progress", "--upsampling", "nearest"]) == 0
    assert "no calibrated threshold" in (out / "report.html").read_text()
    assert main(["predict", str(fast_model), str(images), "--out", str(tmp_path / "none"),
                 "--no-heatmaps", "--no-report", "--no-progress"]) == 0
    assert sorted(path.name for path in (tmp_path / "none").iterdir()) == ["scores.csv"]


def test_several_categories_get_a_report_each_linked_from_report_html(tmp_path):
    train, test = (MVTecAD(demo_root(), "bottle", split) for split in ("train", "test"))
    params = dict(backbone="mobilenet_v2", weights=None, image_size=72, crop_size=64,
                  coreset=None, progress=False)
    out = tmp_path / "report"
    rows = evaluate_and_report([("first", train, test), ("<second>", train, test)], params, out,
                               heatmaps=0)
    assert sorted(p.name for p in out.glob("*.html")) == [
        "report.html", "report_<second>.html", "report_first.html"]
    index = (out / "report.html").read_text()
    page = Page(index)
    assert [attrs["href"] for tag, attrs in page.tags if tag == "a"] == [
        "report_first.html", "report_%3Csecond%3E.html"]  # file names as web addresses
    assert "<second>" not in index and "&lt;second&gt;" in index
    for row in rows[:2]:
        assert f"{row['pixel_auroc']:.4f}" in index and f"{row['aupro']:.4f}" in index
    assert len(Page((out / "report_first.html").read_text()).rows) == len(test)


def test_evaluate_writes_a_report_per_category(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["evaluate", "--dataset", "mvtec", "--root", str(demo_root()), "--category",
                 "bottle", "--out", str(out), "--coreset", "none", *FAST]) == 0
    page_path = out / html_name("bottle")
    assert page_path.name == "report.html"  # the only category's report
    assert f"open in a browser: {page_path}" in capsys.readouterr().out
    text = page_path.read_text()
    page = Page(text)
    assert len(page.rows) == 12 and sorted(set(page.cells(5))) == [
        "broken_large", "broken_small", "contamination", "good"]
    for figure in ("roc_image.png", "roc_pixel.png", "pro.png"):  # those evaluate drew
        assert base64.b64encode((out / figure).read_bytes()).decode() in text
    details = json.loads((out / "results.json").read_text())["details"]["bottle"]
    for defect, figures in [("all", details), *details["per_defect"].items()]:
        assert defect_rows(text)[defect][2:] == [f"{figures[name]:.4f}" for name in METRICS]


def need_browser():
    """Playwright's sync API, or skip (fail with KNNAD_REQUIRE_SHARED=1) without chromium."""
    if not CHROMIUM.exists():
        skip_or_fail(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        skip_or_fail("playwright is not installed (pip install -e '.[test]')")
    return sync_playwright


def test_in_chromium_sort_slide_and_open(seeded_torch_home, tmp_path):
    """The genuine demo model's report in the system's chromium: the table shows the prediction's
    scores, sorts on a click, the slider's counts are those computed here, a thumbnail opens the
    full-size view; the page's screenshot goes to docs/images/report.png."""
    sync_playwright = need_browser()
    detector = Detector("mobilenet_v2", weights="IMAGENET1K_V1", progress=False).fit(
        MVTecAD(demo_root(), "bottle", "train"))
    test = MVTecAD(demo_root(), "bottle", "test")
    prediction = detector.predict(test)
    path = write_html(prediction, tmp_path / "report.html", display_images(detector),
                      labels=test.labels, defects=test.defects,
                      masks=load_masks(test, detector.preprocessor_),
                      title="knnad demo, MVTec bottle sample: bottle")
    scores, labels = prediction.image_scores.astype(np.float64), test.labels
    shown = "rows => rows.map(row => [Number(row.dataset.index), row.cells[3].textContent])"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM))
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        start = time.perf_counter()
        page.goto(path.as_uri())
        assert time.perf_counter() - start < 10
        rows = page.eval_on_selector_all("#images tbody tr", shown)
        order = np.argsort(-scores, kind="stable")
        assert rows == [[int(i), f"{scores[i]:.4f}"] for i in order]
        # Sorting: score (high to low first), again (low to high), then by number.
        page.click("#images th[data-key=score]")
        rows = page.eval_on_selector_all("#images tbody tr", shown)
        assert [i for i, _ in rows] == np.argsort(scores, kind="stable").tolist()
        assert page.get_attribute("#images th[data-key=score]", "aria-sort") == "ascending"
        page.click("#images th[data-key=index]")
        assert [i for i, _ in page.eval_on_selector_all("#images tbody tr", shown)] == \
            list(range(len(scores)))
        # The slider and the number: the counts at the threshold shown are those of Python.
        for position in ("0", "150", "400", "1000", None):
            if position is None:
                page.fill("#threshold", f"{np.median(scores):.6g}")
            else:
                page.fill("#slider", position)
            threshold = float(page.input_value("#threshold"))
            flagged = scores > threshold
            counts = [int(page.text_content(f"#{name}")) for name in
                      ("flagged", "missed", "false-alarms")]
            assert counts == [flagged.sum(), (labels.astype(bool) & ~flagged).sum(),
                              (~labels.astype(bool) & flagged).sum()], position
            flags = page.eval_on_selector_all(
                "#images tbody tr", "rows => rows.map(row => row.cells[6].textContent)")
            assert flags == ["yes" if flagged[i] else "no" for i in range(len(scores))]
        assert page.text_content("#flagged") == str(len(scores) // 2)  # at the median
        page.select_option("#filter", "flagged")
        assert page.locator("#images tbody tr:visible").count() == len(scores) // 2
        page.close()
        # The report as it opens, down to its fourth image, for the documentation.
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(path.as_uri())
        last = page.locator("#images tbody tr").nth(3).bounding_box()  # scrolled to the top
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True, clip={
            "x": 0, "y": 0, "width": 1280, "height": last["y"] + last["height"] + 16})
        # A thumbnail opens the full-size view: the image and its heatmap, side by side.
        top = int(order[0])
        page.click(f"#images tr[data-index='{top}'] img.thumb")
        page.wait_for_function("() => { const img = document.querySelector('#viewer img');"
                               " return document.getElementById('viewer').open && img.complete"
                               " && img.naturalWidth > 0; }")
        natural = page.eval_on_selector("#viewer img",
                                        "img => [img.naturalWidth, img.naturalHeight]")
        assert natural == [2 * 224 + GAP, 224]
        assert page.is_visible("#viewer img")
        caption = page.text_content("#viewer figcaption")
        assert f"score {scores[top]:.4f}" in caption
        assert Path(test.samples[top].path).name in caption
        page.keyboard.press("ArrowRight")  # the next in the table's order: the second highest
        assert f"score {scores[order[1]]:.4f}" in page.text_content("#viewer figcaption")
        page.keyboard.press("Escape")
        assert not page.eval_on_selector("#viewer", "viewer => viewer.open")
        browser.close()
    with Image.open(SCREENSHOT) as screenshot:
        assert screenshot.size[0] == 1280 and screenshot.size[1] > 900
