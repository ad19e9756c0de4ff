import csv
import json
import shutil

import pytest
from PIL import Image

from knnad import Detector
from knnad.cli import build_parser, demo_root, main

FAST = ["--backbone", "mobilenet_v2", "--weights", "none", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def sample():
    return demo_root() / "bottle"


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for command in ("fit", "predict", "evaluate", "demo", "info"):
        assert command in text
    assert "knnad demo" in text  # examples in the epilog
    fit_help = build_parser()._subparsers._group_actions[0].choices["fit"].format_help()
    assert "--coreset" in fit_help and "--calibrate" in fit_help


def test_fit_then_predict(tmp_path, sample, capsys):
    model = tmp_path / "model.npz"
    test_good = sorted((sample / "test" / "good").iterdir())
    assert main(["fit", str(sample / "train" / "good"), "--model", str(model), "--coreset", "0.5",
                 "--calibrate", *map(str, test_good[:2]), *FAST]) == 0
    assert "saved" in capsys.readouterr().out
    detector = Detector.load(model)
    assert len(detector.train_paths_) == 16 and len(detector.index_) == 16 * 28 * 28 // 2
    assert detector.image_threshold_ is not None
    out = tmp_path / "scores"
    broken = sample / "test" / "broken_large"
    assert main(["predict", str(model), str(broken), str(test_good[2]), "--out", str(out),
                 "--no-progress"]) == 0
    with open(out / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and rows[-1]["path"] == str(test_good[2])
    assert all(float(row["score"]) > 0 and row["anomalous"] in ("0", "1") for row in rows)
    heatmaps = sorted(out.glob("*.png"))
    assert len(heatmaps) == 4 and heatmaps[0].name.startswith("0000_")
    with Image.open(heatmaps[0]) as image:
        assert image.size == (750, 250)  # image, overlay, thresholded


def test_evaluate_mvtec_and_folder(tmp_path, sample, capsys):
    out = tmp_path / "report"
    assert main(["evaluate", "--dataset", "mvtec", "--root", str(sample.parent), "--category",
                 "bottle", "--out", str(out), "--coreset", "none", *FAST]) == 0
    results = json.loads((out / "results.json").read_text())
    row = results["rows"][0]
    assert row["category"] == "bottle" and row["test_images"] == 12 and row["memory_bank"] == 16 * 784
    assert 0.5 < row["pixel_auroc"] <= 1 and 0 <= row["aupro"] <= 1
    assert set(results["details"]["bottle"]["per_defect"]) == {"broken_large", "broken_small", "contamination"}
    for name in ("results.md", "results.csv", "roc_image.png", "roc_pixel.png", "pro.png",
                 "heatmaps_bottle.png"):
        assert (out / name).stat().st_size > 0
    assert "| bottle |" in capsys.readouterr().out
    # The same images as plain folders.
    folders = tmp_path / "folders"
    shutil.copytree(sample / "train" / "good", folders / "train")
    shutil.copytree(sample / "test" / "good", folders / "normal")
    (folders / "abnormal").mkdir()
    for defect in ("broken_large", "contamination"):
        for path in (sample / "test" / defect).iterdir():
            shutil.copy(path, folders / "abnormal" / f"{defect}_{path.name}")
    assert main(["evaluate", "--dataset", "folder", "--train", str(folders / "train"),
                 "--test-normal", str(folders / "normal"), "--test-abnormal",
                 str(folders / "abnormal"), "--out", str(tmp_path / "folder_report"),
                 "--coreset", "none", *FAST]) == 0
    folder_rows = json.loads((tmp_path / "folder_report" / "results.json").read_text())["rows"]
    assert folder_rows[0]["pixel_auroc"] is None  # no masks given
    assert folder_rows[0]["image_auroc"] is not None


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["fit", str(tmp_path / "nothing"), "--model", str(tmp_path / "m.npz"), *FAST]) == 2
    assert "neither an image file nor a folder" in capsys.readouterr().err
    assert main(["evaluate", "--dataset", "mvtec", *FAST]) == 2
    assert "needs --root" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "absent.npz"), str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "absent.npz" in capsys.readouterr().err


def test_info(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["faiss_distribution"] == "faiss-cpu" and "torch_cuda_gpus" in info


def test_demo_with_genuine_weights(seeded_torch_home, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--no-progress", "--device", "cpu"]) == 0
    out = tmp_path / "knnad-demo"
    row = json.loads((out / "results.json").read_text())["rows"][0]
    assert row["image_auroc"] == 1.0 and row["pixel_auroc"] > 0.97
    detector = Detector.load(out / "model_bottle.npz")
    assert detector.extractor.weights_id == "MobileNet_V2_Weights.IMAGENET1K_V1"
    assert "bottle" in capsys.readouterr().out
