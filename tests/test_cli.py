import csv
import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from knnad import Detector, evaluate, runtime
from knnad.cli import demo_root, main
from knnad.datasets import MVTecAD
from knnad.metrics import image_auroc

FAST = ["--backbone", "mobilenet_v2", "--weights", "none", "--no-progress"]
ONE_SCALE = [*FAST, "--layers", "coarse"]


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
    for command in ("fit", "evaluate"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        for name in inspect.signature(Detector).parameters:  # every parameter is reachable
            assert f"--{name.replace('_', '-')}" in text, (command, name)
    assert "(default: 0.1)" in text and "share in (0, 1]" in text  # Detector's default and help


def test_fit_then_predict(tmp_path, sample, capsys):
    model = tmp_path / "model.npz"
    test_good = sorted((sample / "test" / "good").iterdir())
    assert main(["fit", str(sample / "train" / "good"), "--model", str(model), "--coreset", "300",
                 "--k", "2", "--sigma", "2", "--image-size", "128", "--crop-size", "112",
                 "--calibrate", *map(str, test_good[:2]), *FAST]) == 0
    assert "saved" in capsys.readouterr().out
    detector = Detector.load(model)
    assert len(detector.train_paths_) == 16 and len(detector.index_) == 300
    assert (detector.k, detector.sigma, detector.crop_size, detector.coreset) == (2, 2.0, 112, 300)
    assert detector.thresholds_ is not None
    out = tmp_path / "scores"
    broken = sample / "test" / "broken_large"
    assert main(["predict", str(model), str(broken), str(test_good[2]), "--out", str(out),
                 "--no-progress", "--batch-size", "3"]) == 0
    with open(out / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and rows[-1]["path"] == str(test_good[2])
    expected = detector.predict([row["path"] for row in rows])
    np.testing.assert_allclose([float(row["score"]) for row in rows], expected.image_scores,
                               atol=1e-6)
    assert [row["anomalous"] for row in rows] == [str(int(label)) for label in expected.labels]
    # Scoring options differ from the calibration's: scores, but no labels. (The default's two
    # scales keep their fit's k.)
    assert main(["predict", str(model), str(broken), "--out", str(out), "--no-heatmaps",
                 "--no-progress", "--upsampling", "nearest"]) == 0
    with open(out / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    expected = detector.set_params(upsampling="nearest").predict([row["path"] for row in rows])
    np.testing.assert_allclose([float(row["score"]) for row in rows], expected.image_scores,
                               atol=1e-6)
    assert expected.labels is None and {row["anomalous"] for row in rows} == {""}
    heatmaps = sorted(out.glob("*.png"))
    assert len(heatmaps) == 4 and heatmaps[0].name.startswith("0000_")
    with Image.open(heatmaps[0]) as image:
        assert image.size == (750, 250)  # image, overlay, thresholded


def test_evaluate_mvtec_and_folder(tmp_path, sample, capsys):
    out = tmp_path / "report"
    # One scale, every patch: the command, the API and the example script compute alike.
    assert main(["evaluate", "--dataset", "mvtec", "--root", str(sample.parent), "--category",
                 "bottle", "--out", str(out), "--coreset", "none", *ONE_SCALE]) == 0
    results = json.loads((out / "results.json").read_text())
    row = results["rows"][0]
    assert row["category"] == "bottle" and row["test_images"] == 12
    assert row["memory_bank"] == 16 * 784
    direct = Detector("mobilenet_v2", layers="coarse", weights=None, coreset=None,
                      progress=False).fit(
        MVTecAD(sample.parent, "bottle", "train"))
    mvtec_test = MVTecAD(sample.parent, "bottle", "test")
    figures, direct_prediction, _ = evaluate(direct, mvtec_test, return_prediction=True)
    for name in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max"):
        assert row[name] == pytest.approx(figures[name], abs=1e-9), name
    # The example script takes the same options and gives the same report.
    example = Path(__file__).resolve().parents[1] / "examples" / "evaluate_mvtec.py"
    # As many torch threads as here (one under pytest-xdist): the same float32 rounding.
    threads = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    subprocess.run([sys.executable, str(example), "--root", str(sample.parent), "--category",
                    "bottle", "--out", str(tmp_path / "example"), "--coreset", "none",
                    *ONE_SCALE],
                   check=True, capture_output=True, text=True, env=threads)
    example_row = json.loads((tmp_path / "example" / "results.json").read_text())["rows"][0]
    for name in ("image_auroc", "pixel_auroc", "aupro", "memory_bank"):
        assert example_row[name] == row[name], name
    assert set(results["details"]["bottle"]["per_defect"]) == {"broken_large", "broken_small",
                                                               "contamination"}
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
                 "--coreset", "none", *ONE_SCALE]) == 0
    folder_rows = json.loads((tmp_path / "folder_report" / "results.json").read_text())["rows"]
    assert folder_rows[0]["pixel_auroc"] is None  # no masks given
    kept = [i for i, defect in enumerate(mvtec_test.defects)
            if defect in ("good", "broken_large", "contamination")]
    assert folder_rows[0]["image_auroc"] == pytest.approx(image_auroc(
        mvtec_test.labels[kept], direct_prediction.image_scores[kept]), abs=1e-9)


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["fit", str(tmp_path / "nothing"), "--model", str(tmp_path / "m.npz"), *FAST]) == 2
    assert "neither an image file nor a folder" in capsys.readouterr().err
    assert main(["evaluate", "--dataset", "mvtec", *FAST]) == 2
    assert "needs --root" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "absent.npz"), str(tmp_path), "--out",
                 str(tmp_path)]) == 2
    assert "absent.npz" in capsys.readouterr().err
    for flag, value, message in [("--coreset", "1.5", "coreset must be none, a share"),
                                 ("--coreset", "abc", "got 'abc'"), ("--coreset", "0", "got '0'"),
                                 ("--k", "0", "k must be an int >= 1"),
                                 ("--upsampling", "cubic",
                                  "choose one of ('bilinear', 'nearest')")]:
        with pytest.raises(SystemExit) as exit_info:  # refused while parsing: before any work
            main(["fit", str(tmp_path), "--model", str(tmp_path / "m.npz"), flag, value])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, (flag, value)


def test_predict_skips_unreadable_files_and_says_so(tmp_path, sample, capsys):
    model = tmp_path / "model.npz"
    good = sorted((sample / "test" / "good").iterdir())[:3]
    assert main(["fit", str(sample / "train" / "good"), "--model", str(model), "--image-size", "72",
                 "--crop-size", "64", *FAST]) == 0
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    inputs = [str(good[0]), str(broken), str(good[1]), str(good[2])]
    assert main(["predict", str(model), str(good[0]), "--out", str(tmp_path / "raise"),
                 "--no-progress"]) == 0
    assert main(["predict", str(model), *inputs, "--out", str(tmp_path / "raise"), "--no-progress",
                 "--batch-size", "1"]) == 2
    error = capsys.readouterr().err
    assert "broken.png" in error and "scores.partial.csv" in error
    with open(tmp_path / "raise" / "scores.partial.csv") as handle:  # what was done is kept
        assert [row["path"] for row in csv.DictReader(handle)] == [str(good[0])]
    with open(tmp_path / "raise" / "scores.csv") as handle:  # the previous run's scores too
        assert [row["path"] for row in csv.DictReader(handle)] == [str(good[0])]
    out = tmp_path / "skip"
    assert main(["predict", str(model), *inputs, "--out", str(out), "--no-progress",
                 "--on-error", "skip", "--batch-size", "2"]) == 3  # some images skipped
    assert "skipped 1 that could not be read" in capsys.readouterr().out
    with open(out / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["path"], row["status"]) for row in rows] == [
        (str(good[0]), "scored"), (str(broken), "skipped"), (str(good[1]), "scored"),
        (str(good[2]), "scored")]
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:04d}_{good[i].stem}.png"
                                                         for i in range(3)]


def test_outputs_and_options_are_checked_before_any_work(tmp_path, capsys, monkeypatch):
    missing_images = str(tmp_path / "no-images-here")  # would fail second
    (tmp_path / "folder.npz").mkdir()
    (tmp_path / "a-file").write_text("x")
    for argv, message in [
            (["fit", missing_images, "--model", str(tmp_path / "m.pt")], "must end in .npz"),
            (["fit", missing_images, "--model", str(tmp_path / "folder.npz")], "is a folder"),
            (["fit", missing_images, "--model", str(tmp_path / "nowhere" / "m.npz")],
             "does not exist; create it"),
            (["predict", str(tmp_path / "m.npz"), missing_images, "--out",
              str(tmp_path / "a-file")],
             "a-file is a file, not a folder"),
            (["evaluate", "--dataset", "mvtec", "--root", missing_images, "--out",
              str(tmp_path / "a-file" / "report")], "a-file is a file, not a folder")]:
        assert main(argv) == 2
        assert message in capsys.readouterr().err, argv
    with pytest.raises(SystemExit):
        main(["fit", missing_images, "--model", str(tmp_path / "m.npz"), "--quantile", "2"])
    assert "quantile must be in (0, 1], got 2.0" in capsys.readouterr().err


def test_interrupt_is_one_line_and_exit_130(tmp_path, sample, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Detector, "fit", interrupted)
    assert main(["fit", str(sample / "train" / "good"), "--model", str(tmp_path / "m.npz"),
                 *FAST]) == 130
    assert capsys.readouterr().err == "knnad fit: interrupted\n"
    assert not list(tmp_path.iterdir())


def test_local_weight_files_end_to_end(tmp_path, sample, capsys, seeded_torch_home):
    import torch
    import torchvision
    genuine = tmp_path / "my-copy-of-mobilenet.pth"  # torchvision's published file, renamed
    shutil.copy(seeded_torch_home / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth", genuine)
    own = tmp_path / "own.pth"
    torch.save(torchvision.models.mobilenet_v2().state_dict(), own)
    good = sample / "train" / "good"
    small = ["--image-size", "72", "--crop-size", "64", "--coreset", "none", "--no-progress"]
    for weights, predict_needs_the_file in ((genuine, False), (own, True)):
        model = tmp_path / f"{weights.stem}.npz"
        assert main(["fit", str(good), "--model", str(model), "--backbone", "mobilenet_v2",
                     "--weights", str(weights), *small]) == 0
        out = tmp_path / f"out-{weights.stem}"
        code = main(["predict", str(model), str(good), "--out", str(out), "--no-heatmaps"])
        assert code == (2 if predict_needs_the_file else 0)
        if predict_needs_the_file:
            assert "--weights PATH" in capsys.readouterr().err
            assert main(["predict", str(model), str(good), "--out", str(out), "--no-heatmaps",
                         "--weights", str(weights)]) == 0
        assert (out / "scores.csv").is_file()
    assert Detector.load(tmp_path / f"{genuine.stem}.npz").extractor_.weights_id == \
        "MobileNet_V2_Weights.IMAGENET1K_V1"
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "--weights" in capsys.readouterr().out


def test_info(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["faiss_distribution"] == runtime.installed_faiss_distributions()[0]
    assert info["torch_cuda_gpus"] == runtime.backend_info()["torch_cuda_gpus"]


def test_demo_with_genuine_weights(seeded_torch_home, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--no-progress"]) == 0
    out = tmp_path / "knnad-demo"
    row = json.loads((out / "results.json").read_text())["rows"][0]
    assert row["image_auroc"] == 1.0 and row["pixel_auroc"] > 0.97
    detector = Detector.load(out / "model_bottle.npz")
    assert detector.extractor_.weights_id == "MobileNet_V2_Weights.IMAGENET1K_V1"
    assert "bottle" in capsys.readouterr().out
