import inspect
import logging
import os
import socket
import stat
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.base import BaseEstimator, clone
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

from knnad import Detector, ImageLoadError, ModelFileError, archive
from knnad.anomaly_map import anomaly_maps
from knnad.preprocessing import Preprocessor

SMALL = dict(backbone="mobilenet_v2", layers="coarse", weights=None, image_size=72, crop_size=64,
             progress=False, coreset=None)


def textured_images(count: int, seed: int, size: int = 96):
    """Normal images: a smooth striped texture with noise; PIL RGB."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    images = []
    for _ in range(count):
        base = 128 + 60 * np.sin(xx / 4.0 + rng.uniform(0, 0.3))[..., None] * np.ones(3)
        noisy = base + rng.normal(0, 6, (size, size, 3))
        images.append(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)))
    return images


def with_defect(image: Image.Image) -> Image.Image:
    pixels = np.array(image)
    pixels[30:60, 30:60] = [250, 20, 20]
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def normal_images():
    return textured_images(6, seed=0)


@pytest.fixture(scope="module")
def fitted(normal_images):
    return Detector(**SMALL, k=3).fit(normal_images)


def reference_scores(detector, images, bank_ids=None):
    """Brute force with torch.cdist in float64 of the documented definitions."""
    batch = torch.from_numpy(np.stack([detector.preprocessor_(image) for image in images]))
    features = detector.extractor_(batch)
    embedding = detector.embedder_(features).double()
    bank = torch.from_numpy(detector.index_.vectors()).double()
    n, h, w, d = embedding.shape
    if detector.image_score in ("max", "reweighted"):
        dist = torch.cdist(embedding.reshape(-1, d), bank)
        patch = dist.topk(detector.k, largest=False).values.mean(1).reshape(n, h, w)
        maps = anomaly_maps(patch.float(), 64, detector.sigma, detector.upsampling)
        if detector.image_score == "max":
            return maps.amax(dim=(1, 2)).numpy(), maps.numpy()
        # PatchCore's eq. 7: s* = the largest patch score, of patch q* with nearest bank patch m*;
        # weight 1 - exp|q* - m*| / sum of exp|q* - m| over the reweight_k nearest m of m*.
        scores = []
        for image in range(n):
            worst = int(patch[image].reshape(-1).argmax())
            query = embedding[image].reshape(-1, d)[worst]
            centre = bank[int(dist[image * h * w + worst].argmin())]
            support = torch.cdist(centre[None], bank)[0].topk(detector.reweight_k,
                                                              largest=False).indices
            spread = torch.exp((bank[support] - query).norm(dim=1)).sum()
            weight = 1 - torch.exp((centre - query).norm()) / spread
            scores.append(float(patch[image].max() * weight))
        return np.array(scores), maps.numpy()
    pooled = detector.extractor_.global_features(features).double()
    train = torch.from_numpy(detector.global_features_).double()
    global_dist = torch.cdist(pooled, train)
    k_images = min(detector.image_k, len(train))
    nearest = global_dist.topk(k_images, largest=False)
    patch = []
    ids = torch.from_numpy(detector.scales_[0].image_ids)
    for image, neighbours in zip(embedding, nearest.indices):
        gallery = bank[torch.isin(ids, neighbours)]
        dist = torch.cdist(image.reshape(-1, d), gallery)
        patch.append(dist.topk(detector.k, largest=False).values.mean(1).reshape(h, w))
    maps = anomaly_maps(torch.stack(patch).float(), 64, detector.sigma, detector.upsampling)
    return nearest.values.mean(1).numpy(), maps.numpy()


@pytest.mark.parametrize("image_score, coreset, rerank, upsampling", [
    ("max", None, 0, "bilinear"), ("max", 0.5, 4, "nearest"), ("spade", None, 0, "bilinear"),
    ("spade", 150, 2, "nearest"), ("reweighted", None, 0, "bilinear"),
    ("reweighted", 0.5, 2, "nearest")])
def test_scores_match_brute_force_definition(normal_images, image_score, coreset, rerank,
                                             upsampling):
    detector = Detector(**{**SMALL, "coreset": coreset}, k=3, image_score=image_score, image_k=3,
                        reweight_k=5, rerank=rerank, upsampling=upsampling)
    detector.fit(normal_images)
    if coreset:
        assert len(detector.index_) == (150 if isinstance(coreset, int) else 6 * 64 // 2)
    tests = textured_images(2, seed=5) + [with_defect(textured_images(1, seed=6)[0])]
    prediction = detector.predict(tests)
    expected_scores, expected_maps = reference_scores(detector, tests)
    assert prediction.image_scores.dtype == np.float32 and prediction.image_scores.shape == (3,)
    assert prediction.anomaly_maps.shape == (3, 64, 64)
    np.testing.assert_allclose(prediction.anomaly_maps, expected_maps, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(prediction.image_scores, expected_scores, rtol=1e-4, atol=1e-4)
    assert prediction.image_scores[2] > prediction.image_scores[:2].max()


def test_defect_is_hotter_on_synthetic_images(fitted):
    defect = with_defect(textured_images(1, seed=9)[0])
    prediction = fitted.predict([defect])
    defect_mask = Preprocessor(72, 64).mask(Image.fromarray(
        (np.array(defect)[..., 1] < 40).astype(np.uint8) * 255))
    heat = prediction.anomaly_maps[0]
    assert heat[defect_mask].mean() > 2 * heat[~defect_mask].mean()


def test_save_load_round_trip(normal_images, tmp_path):
    for image_score in ("max", "spade", "reweighted"):
        detector = Detector(**{**SMALL, "coreset": 0.5}, k=2, image_score=image_score, image_k=4,
                            rerank=1, upsampling="nearest")
        detector.fit(normal_images).calibrate(textured_images(4, seed=3), quantile=0.9)
        tests = textured_images(2, seed=4) + [with_defect(normal_images[0])]
        before = detector.predict(tests)
        path = detector.save(tmp_path / f"{image_score}.npz")
        assert not list(tmp_path.glob(".*.knnad-partial"))
        loaded = Detector.load(path)
        after = loaded.predict(tests)
        np.testing.assert_array_equal(after.image_scores, before.image_scores)
        np.testing.assert_array_equal(after.anomaly_maps, before.anomaly_maps)
        np.testing.assert_array_equal(after.labels, before.labels)
        np.testing.assert_array_equal(after.masks, before.masks)
        assert loaded.thresholds_ == detector.thresholds_
        assert loaded.get_params()["k"] == 2 and loaded.image_score == image_score
        assert loaded.rerank == 1 and loaded.index_.rerank == 1 and loaded.upsampling == "nearest"
        assert loaded.train_paths_ == detector.train_paths_


def test_calibrate_sets_thresholds(fitted, caplog, tmp_path):
    held_out = textured_images(5, seed=11)
    fitted.calibrate(held_out, quantile=1.0)
    highest = float(fitted.predict(held_out).image_scores.max())
    assert fitted.thresholds_.image == pytest.approx(highest)
    prediction = fitted.predict(held_out + [with_defect(held_out[0])])
    assert prediction.labels.dtype == bool and list(prediction.labels) == [False] * 5 + [True]
    assert prediction.masks.shape == (6, 64, 64) and not prediction.masks[:5].any()
    assert prediction.masks[5].any()
    with pytest.raises(ValueError, match="quantile"):
        fitted.calibrate(held_out, quantile=1.5)
    paths = []
    for i, image in enumerate(textured_images(3, seed=0)):
        image.save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    detector = Detector(**SMALL).fit(paths)
    with caplog.at_level(logging.WARNING, logger="knnad.detector"):
        detector.calibrate(paths)
    assert "used in fit" in caplog.text


def test_inputs_of_every_kind(tmp_path, normal_images):
    folder = tmp_path / "good"
    folder.mkdir()
    modes = ["RGB", "L", "RGBA", "P", "RGB", "I;16"]
    sizes = [(96, 96), (120, 80), (64, 100), (96, 96), (200, 150), (96, 96)]
    for i, (image, mode, size) in enumerate(zip(normal_images, modes, sizes)):
        converted = image.resize(size)
        converted = (Image.fromarray(np.array(converted.convert("L"), np.uint16) * 257)
                     if mode == "I;16" else converted.convert(mode))
        converted.save(folder / f"{i}.png")
    from_folder = Detector(**SMALL).fit(folder)
    assert len(from_folder.train_paths_) == 6
    tensor = torch.from_numpy(np.stack([from_folder.preprocessor_(p)
                                        for p in sorted(folder.iterdir())]))
    from_tensor = Detector(**SMALL).fit(tensor)
    np.testing.assert_allclose(from_tensor.index_.vectors(), from_folder.index_.vectors(),
                               rtol=1e-5, atol=1e-5)
    prediction = from_folder.predict(folder / "1.png")
    assert prediction.paths == [str(folder / "1.png")]
    assert prediction.anomaly_maps.shape == (1, 64, 64)
    assert from_tensor.predict(tensor[:2]).paths == [None, None]


def test_undecodable_images(tmp_path, normal_images, caplog):
    for i, image in enumerate(normal_images[:3]):
        image.save(tmp_path / f"{i}.png")
    (tmp_path / "3.png").write_bytes(b"garbage")
    with pytest.raises(ImageLoadError, match="3.png"):
        Detector(**SMALL).fit(tmp_path)
    with caplog.at_level(logging.WARNING, logger="knnad.sources"):
        detector = Detector(**SMALL, on_error="skip").fit(tmp_path)
    assert "3.png" in caplog.text
    assert detector.skipped_ == [str(tmp_path / "3.png")] and len(detector.train_paths_) == 3
    prediction = detector.predict(sorted(tmp_path.iterdir()))
    assert prediction.skipped == [str(tmp_path / "3.png")] and len(prediction) == 3
    with pytest.raises(ValueError, match="none of the 1 images"):
        detector.predict([tmp_path / "3.png"])


def test_bad_inputs(tmp_path, fitted):
    with pytest.raises(ValueError, match="at least one normal image"):
        Detector(**SMALL).fit([])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="at least one normal image"):
        Detector(**SMALL).fit(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Detector(**SMALL).fit(tmp_path / "nowhere")
    with pytest.raises(NotFittedError, match="predict before fit"):
        Detector(**SMALL).predict([Image.new("RGB", (64, 64))])
    with pytest.raises(NotFittedError, match="save before fit"):
        Detector(**SMALL).save(tmp_path / "m.npz")
    with pytest.raises(TypeError, match="list items"):
        fitted.predict([1, 2])
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        fitted.predict(torch.zeros(2, 64, 64))
    with pytest.raises(ValueError,
                       match=r"k must be an int in \[1, 64\] \(the 64 patches in the memory bank"):
        Detector(**SMALL, k=5000).fit(textured_images(1, seed=0))


@pytest.mark.parametrize("kwargs, match", [
    ({"k": 0}, "k must"), ({"image_score": "mean"}, "image_score"), ({"coreset": 1.5}, "coreset"),
    ({"coreset": 0}, "coreset"), ({"coreset": -1}, "coreset"), ({"coreset": "abc"}, "coreset"),
    ({"coreset": float("inf")}, "coreset"), ({"coreset": True}, "coreset"),
    ({"on_error": "ignore"}, "on_error"), ({"sigma": -1}, "sigma"),
    ({"sigma": float("nan")}, "sigma"), ({"rerank": -1}, "rerank"),
    ({"upsampling": "cubic"}, "upsampling"),
    ({"crop_size": 300}, "crop_size=300 is larger than image_size=72"),
    ({"aggregation_size": 2}, "aggregation_size must be odd"), ({"reduce_dim": 0}, "reduce_dim"),
    ({"device": "tpu"}, "device='tpu'"), ({"backend": "annoy"}, "backend"),
    ({"layers": []}, "layers"), ({"progress": "yes"}, "progress"), ({"seed": -1}, "seed")])
def test_bad_parameters_are_refused_by_fit_and_set_params_before_any_work(kwargs, match, tmp_path):
    detector = Detector(**{**SMALL, **kwargs})  # __init__ only stores
    assert all(getattr(detector, name) is value for name, value in kwargs.items())
    with pytest.raises(ValueError, match=match):  # before the missing folder is looked at
        detector.fit(tmp_path / "does-not-exist")
    with pytest.raises(ValueError, match=match):
        Detector(**SMALL).set_params(**kwargs)


def test_model_files_refused(fitted, tmp_path):
    path = fitted.save(tmp_path / "model.npz")
    data = bytearray(path.read_bytes())
    (tmp_path / "cut.npz").write_bytes(bytes(data[: len(data) // 3]))
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)
    (tmp_path / "flipped.npz").write_bytes(bytes(data))
    for name in ("cut.npz", "flipped.npz"):
        with pytest.raises(ModelFileError, match=name):
            Detector.load(tmp_path / name)
    archive.write_archive(tmp_path / "future.npz", "Detector", 99, {}, {})
    with pytest.raises(ModelFileError, match="format version 99"):
        Detector.load(tmp_path / "future.npz")
    with pytest.raises(ModelFileError, match="FlatL2Index"):
        fitted.index_.save(tmp_path / "index.npz")
        Detector.load(tmp_path / "index.npz")
    with pytest.raises(ValueError, match="fit with backbone 'mobilenet_v2', not 'resnet18'"):
        Detector.load(path, backbone="resnet18")


def test_model_file_permissions_and_foreign_files(fitted, tmp_path):
    previous = os.umask(0o027)
    try:
        path = fitted.save(tmp_path / "model.npz")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # like any new file, not always 0600
    Image.new("RGB", (8, 8)).save(tmp_path / "picture.npz", format="PNG")
    with pytest.raises(ModelFileError,
                       match="picture.npz is not a knnad model file .not an .npz archive.$"):
        Detector.load(tmp_path / "picture.npz")
    (tmp_path / "cut.npz").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ModelFileError, match="cut.npz is truncated or corrupted"):
        Detector.load(tmp_path / "cut.npz")


def test_a_killed_save_leaves_a_partial_file_the_next_save_removes(fitted, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    host = socket.gethostname().replace(".", "_")
    stale = tmp_path / f".model.npz.{host}.{dead}-0a1b2c3d.knnad-partial"  # a SIGKILLed save's
    kept = [tmp_path / f".model.npz.{host}.{os.getpid()}-00000000.knnad-partial",  # running save
            tmp_path / f".model.npz.otherhost.{dead}-0a1b2c3d.knnad-partial",  # another machine's
            tmp_path / f".other.npz.{host}.{dead}-0a1b2c3d.knnad-partial",  # another model's
            tmp_path / f".model.npz.{dead}-my notes.knnad-partial"]  # not knnad's name
    for partial in (stale, *kept):
        partial.write_bytes(b"partial")
    fitted.save(tmp_path / "model.npz")
    assert not stale.exists() and all(path.exists() for path in kept)
    os.chmod(tmp_path / "model.npz", 0o600)
    fitted.save(tmp_path / "model.npz")  # replacing a model keeps its permissions
    assert stat.S_IMODE((tmp_path / "model.npz").stat().st_mode) == 0o600


def test_crafted_files_with_valid_checksums_are_refused_at_load(fitted, tmp_path):
    meta, arrays, _ = archive.read_archive(fitted.save(tmp_path / "good.npz"), "Detector", 2)

    def crafted(name, meta_changes=(), drop_array=None, **array_changes):
        changed = {key: value for key, value in arrays.items() if key != drop_array}
        changed.update(array_changes)
        new_meta = {**meta, "params": dict(meta["params"])}
        for key, value in meta_changes:
            if key.startswith("params."):
                new_meta["params"][key[7:]] = value
            else:
                new_meta.pop(key)
        return archive.write_archive(tmp_path / name, "Detector", 2, new_meta, changed)

    cases = [(crafted("no_bank.npz", drop_array="memory_bank"), r"\['memory_bank'\] missing"),
             (crafted("no_key.npz", [("weights_id", None)]), r"\['weights_id'\] missing"),
             (crafted("ids.npz", patch_image_ids=arrays["patch_image_ids"][::-1].copy()),
              "not a consistent"),
             (crafted("dtype.npz", memory_bank=arrays["memory_bank"].astype(np.float64)),
              "not a consistent"),
             (crafted("dims.npz", [("params.reduce_dim", 64)]), "128-d patches.*give 64"),
             (crafted("unknown.npz", [("params.colour", "red")]),
              r"settings \['colour'\] that this"),
             (crafted("no_backbone.npz", [("params.backbone", 5)]), "malformed settings")]
    meta["weights_id"] = 5
    cases.append((crafted("weights_id.npz"), "malformed settings"))
    for path, match in cases:
        with pytest.raises(ModelFileError, match=match):
            Detector.load(path)


def test_custom_backbone_and_weight_file(tmp_path, normal_images):
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4, padding=1), torch.nn.ReLU(),
                                 torch.nn.Conv2d(8, 8, 3, stride=2, padding=1))
    detector = Detector(**{**SMALL, "backbone": module, "layers": ["0", "2"]}).fit(normal_images)
    path = detector.save(tmp_path / "custom.npz")
    with pytest.raises(ValueError, match="custom backbone"):
        Detector.load(path)
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 8, 3, stride=2, padding=1))
    with pytest.raises(ValueError, match="scores would be wrong"):
        Detector.load(path, backbone=other)
    same = Detector.load(path, backbone=module)
    np.testing.assert_array_equal(same.predict(normal_images[:1]).anomaly_maps,
                                  detector.predict(normal_images[:1]).anomaly_maps)
    import torchvision
    weights = tmp_path / "mnv2.pth"
    torch.save(torchvision.models.mobilenet_v2().state_dict(), weights)
    detector = Detector(**{**SMALL, "weights": weights}).fit(normal_images)
    path = detector.save(tmp_path / "file_weights.npz")
    with pytest.raises(ValueError, match="weights=PATH"):
        Detector.load(path)
    loaded = Detector.load(path, weights=weights)
    assert loaded.extractor_.weights_id == detector.extractor_.weights_id


def test_genuine_bottle_defects_score_higher(seeded_torch_home, bottle_root):
    from knnad.datasets import MVTecAD
    train = MVTecAD(bottle_root, "bottle", "train")
    test = MVTecAD(bottle_root, "bottle", "test")
    good = [s for s in test.samples if s.label == 0][:4]
    defects = [s for s in test.samples if s.label == 1][::12][:5]
    detector = Detector("mobilenet_v2", weights="IMAGENET1K_V1", progress=False, coreset=None)
    detector.fit([s.path for s in train.samples[::10]])
    prediction = detector.predict([s.path for s in good + defects])
    scores = prediction.image_scores
    assert scores[4:].min() > scores[:4].max()
    for row, sample in enumerate(defects, start=4):
        mask = detector.preprocessor_.mask(sample.mask_path)
        heat = prediction.anomaly_maps[row]
        assert heat[mask].mean() > 1.5 * heat[~mask].mean(), sample.path


def test_scikit_learn_parameter_protocol(normal_images):
    detector = Detector(**SMALL, k=2)
    assert isinstance(detector, BaseEstimator)
    copy = clone(detector)
    assert copy is not detector and copy.get_params() == detector.get_params()
    assert list(Detector().get_params(deep=True)) == sorted(inspect.signature(Detector).parameters)
    assert repr(detector) == ("Detector(backbone='mobilenet_v2', layers='coarse', weights=None, "
                              "k=2, coreset=None, image_size=72, crop_size=64, progress=False)")
    assert detector.set_params(k=3, sigma=2.0) is detector
    assert (detector.k, detector.sigma) == (3, 2.0)
    with pytest.raises(ValueError, match="no parameter.*'kk'"):
        detector.set_params(kk=1)
    with pytest.raises(ValueError, match="k must"):
        detector.set_params(sigma=1.0, k=0)
    assert detector.sigma == 2.0  # nothing set when one value is refused
    fitted = clone(detector).fit(normal_images[:2])
    assert fitted.config_["k"] == 3 and fitted.is_fitted
    check_is_fitted(fitted)
    unfitted = clone(fitted)  # scikit-learn's clone: the parameters, no fitted state
    assert unfitted.get_params() == fitted.get_params() and not hasattr(unfitted, "index_")
    for estimator in (Detector(), unfitted):
        with pytest.raises(NotFittedError, match="Detector"):
            check_is_fitted(estimator)


def test_actions_before_fit_raise_not_fitted_error(tmp_path):
    """NotFittedError is scikit-learn's (a ValueError and an AttributeError), with the action
    and what to do in its message."""
    for name, action in [("predict", lambda d: d.predict(textured_images(1, seed=0))),
                         ("calibrate", lambda d: d.calibrate(textured_images(1, seed=0))),
                         ("save", lambda d: d.save(tmp_path / "m.npz")),
                         ("export", lambda d: d.export_onnx(tmp_path / "m.onnx"))]:
        with pytest.raises(NotFittedError, match=rf"^{name} before fit: call fit\(normal_images\) "
                                                 rf"or Detector.load\(path\) first$"):
            action(Detector(**SMALL))


def test_changed_parameters_never_give_a_saved_model_unlike_the_live_one(normal_images, tmp_path):
    detector = Detector(**SMALL, k=1).fit(normal_images)
    tests = textured_images(2, seed=21)
    detector.crop_size = 48  # shapes the memory bank: refused until the next fit
    for action in (lambda: detector.predict(tests), lambda: detector.save(tmp_path / "m.npz"),
                   lambda: detector.calibrate(tests)):
        with pytest.raises(RuntimeError,
                           match="refused: crop_size from 64 to 48 changed since fit.*call fit"):
            action()
    assert not (tmp_path / "m.npz").exists()
    detector.set_params(crop_size=64, k=3, sigma=2.0, upsampling="nearest")  # predict-time options
    live = detector.predict(tests)
    loaded = Detector.load(detector.save(tmp_path / "m.npz"))
    assert (loaded.k, loaded.sigma, loaded.upsampling) == (3, 2.0, "nearest")
    np.testing.assert_array_equal(loaded.predict(tests).anomaly_maps, live.anomaly_maps)
    assert not np.array_equal(live.anomaly_maps,
                              Detector(**SMALL).fit(normal_images).predict(tests).anomaly_maps)
    detector.set_params(crop_size=48).fit(normal_images)  # a new fit takes the new value
    assert detector.predict(tests).anomaly_maps.shape == (2, 48, 48)


def test_refit_removes_the_previous_hooks_of_a_custom_backbone(normal_images):
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=8, padding=1), torch.nn.ReLU())
    detector = Detector(**{**SMALL, "backbone": module, "layers": ["0"]})
    for _ in range(3):
        detector.fit(normal_images[:2])
        assert len(module[0]._forward_hooks) == 1
    detector.extractor_.close()
    assert not module[0]._forward_hooks


@pytest.mark.cuda
def test_detector_on_the_gpu_scores_like_the_cpu(normal_images):
    tests = textured_images(2, seed=31) + [with_defect(normal_images[0])]
    cpu = Detector(**SMALL, device="cpu").fit(normal_images).predict(tests)
    gpu_detector = Detector(**SMALL, device="cuda").fit(normal_images)
    assert gpu_detector.extractor_.device.type == "cuda" and gpu_detector.index_.device == "cuda:0"
    gpu = gpu_detector.predict(tests)
    np.testing.assert_allclose(gpu.anomaly_maps, cpu.anomaly_maps, rtol=1e-2, atol=1e-2)
    assert np.argmax(gpu.image_scores) == np.argmax(cpu.image_scores) == 2


def test_predict_batches_streams_what_predict_returns(fitted, tmp_path):
    tests = textured_images(5, seed=51)
    paths = []
    for i, image in enumerate(tests):
        image.save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    (tmp_path / "bad.png").write_bytes(b"x")
    fitted.set_params(batch_size=2, on_error="skip")
    try:
        parts = list(fitted.predict_batches(paths[:2] + [tmp_path / "bad.png"] + paths[2:]))
        whole = fitted.predict(paths)
    finally:
        fitted.set_params(batch_size=8, on_error="raise")
    assert [len(part) for part in parts] == [2, 1, 2]
    assert parts[1].skipped == [str(tmp_path / "bad.png")]
    np.testing.assert_array_equal(np.concatenate([p.anomaly_maps for p in parts]),
                                  whole.anomaly_maps)
    np.testing.assert_array_equal(np.concatenate([p.image_scores for p in parts]),
                                  whole.image_scores)


def test_a_failed_refit_leaves_no_model_to_save(normal_images, tmp_path):
    detector = Detector(**SMALL).fit(normal_images)
    detector.set_params(image_size=96, crop_size=80, layers=["features.66"])
    with pytest.raises(ValueError, match="unknown layer"):
        detector.fit(normal_images)
    for action in (lambda: detector.save(tmp_path / "m.npz"),
                   lambda: detector.predict(normal_images)):
        with pytest.raises(NotFittedError, match="before fit"):
            action()
    with pytest.raises(NotFittedError):
        check_is_fitted(detector)
    assert not (tmp_path / "m.npz").exists()


def test_thresholds_apply_only_to_the_scores_they_were_set_on(fitted, caplog, tmp_path):
    held_out = textured_images(4, seed=41)
    fitted.set_params(k=3).calibrate(held_out, quantile=1.0)
    assert fitted.thresholds_.scored_with["k"] == 3
    assert fitted.predict(held_out).labels is not None
    fitted.set_params(k=1, image_score="spade")
    with caplog.at_level(logging.WARNING, logger="knnad.thresholds"):
        prediction = fitted.predict(held_out)
    assert prediction.labels is None and prediction.masks is None
    assert "calibrated with k=3 (now 1), image_score='max' (now 'spade')" in caplog.text
    loaded = Detector.load(fitted.save(tmp_path / "m.npz"))
    assert loaded.predict(held_out).labels is None
    loaded.set_params(k=3, image_score="max")
    assert list(loaded.predict(held_out).labels) == [False] * 4
    fitted.set_params(k=3, image_score="max")


def test_files_of_format_version_1_still_load(fitted, tmp_path):
    """knnad 0.1 wrote a ``grid`` and thresholds without their scoring settings."""
    fitted.calibrate(textured_images(3, seed=42))
    meta, arrays, version = archive.read_archive(fitted.save(tmp_path / "new.npz"), "Detector", 2)
    assert version == 2
    meta["grid"] = [8, 8]
    del meta["calibration_settings"]
    archive.write_archive(tmp_path / "old.npz", "Detector", 1, meta, arrays)
    tests = textured_images(2, seed=43)
    loaded = Detector.load(tmp_path / "old.npz")
    assert loaded.thresholds_.scored_with is None
    expected = fitted.predict(tests)
    got = loaded.predict(tests)
    np.testing.assert_array_equal(got.anomaly_maps, expected.anomaly_maps)
    np.testing.assert_array_equal(got.labels, expected.labels)


@pytest.mark.parametrize("two, one, chosen", [(3.0, 1.0, 1), (1.0, 1.2, 2)])
def test_the_thread_tuner_runs_the_count_that_is_clearly_faster(monkeypatch, two, one, chosen):
    """A step that takes ``two`` time units on two threads and ``one`` on one (a fake clock):
    after one probe of each, the tuner runs one thread only when it is more than MARGIN faster."""
    from knnad import runtime
    clock = [0.0]
    monkeypatch.setattr(runtime.time, "perf_counter", lambda: clock[0])
    used = []
    with runtime.kept_cpu_threads():
        tuner = runtime.ThreadTuner(2, 1)
        for step in range(2 + tuner.EXPLOIT):
            tuner.tick(step)
            used.append(runtime.cpu_threads())
            clock[0] += two if torch.get_num_threads() == 2 else one
    assert used[:2] == [(2, 2), (1, 1)]  # the probes size both pools
    assert used[2:] == [(chosen, chosen)] * tuner.EXPLOIT


def test_fit_embeds_several_batches_at_once_as_one_batch_does():
    """fit of several batches (at once on a CPU of several threads, one thread each) stores the
    bank one batch at a time would: the same rows in the same order, to float32 rounding."""
    images = textured_images(6, seed=71)
    one = Detector("resnet18", weights=None, coreset=None, batch_size=8).fit(images)
    several = Detector("resnet18", weights=None, coreset=None, batch_size=2).fit(images)
    assert len(one.scales_) == 2  # the default
    for mine, theirs in zip(several.scales_, one.scales_):
        np.testing.assert_allclose(mine.index.vectors(), theirs.index.vectors(), rtol=1e-5,
                                   atol=1e-6)
    np.testing.assert_array_equal(several.image_rows_, one.image_rows_)


def test_predict_scores_several_batches_at_once_on_one_thread_each(fitted, monkeypatch):
    """On a CPU with torch on several threads, predict of several batches scores them at once on
    that many threads of one thread each (the caller's counts untouched, also for threads
    started later), in order, as one batch at a time does; one batch scores on the caller's
    thread with its counts."""
    from knnad import runtime, scales
    images = textured_images(8, seed=61)
    expected = fitted.predict(images)  # one batch of 8
    calls = []
    score_images = scales.score_images

    def spy(*args):
        calls.append((threading.get_ident(), runtime.cpu_threads()))
        return score_images(*args)

    monkeypatch.setattr("knnad.detector.score_images", spy)
    before = runtime.cpu_threads()
    fitted.set_params(batch_size=1)
    try:
        parts = []
        for part in fitted.predict_batches(images):
            assert runtime.cpu_threads() == before
            parts.append(part)
        laned = fitted.predict(images)
    finally:
        fitted.set_params(batch_size=8)
    later = []
    thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert runtime.cpu_threads() == before and later == [before[0]]
    assert [len(part) for part in parts] == [1] * 8
    np.testing.assert_allclose(laned.image_scores, expected.image_scores, rtol=1e-5)
    np.testing.assert_allclose(laned.anomaly_maps, expected.anomaly_maps, rtol=1e-5, atol=1e-6)
    if before[0] > 1:
        assert {counts for _, counts in calls} == {(1, 1)}
        assert threading.get_ident() not in {ident for ident, _ in calls}
        assert len({ident for ident, _ in calls}) > 1
    calls.clear()
    fitted.predict(images[:2])
    assert calls == [(threading.get_ident(), before)]
