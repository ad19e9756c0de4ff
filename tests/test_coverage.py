"""Issue #14: whole-image mode (crop_size=None, maps at the original size), memory-bank
augmentation (augment=) and the layer presets ("fine")."""
import numpy as np
import pytest
import torch
from PIL import Image

from knnad import Detector, ImageLoadError, ModelFileError, archive
from knnad.cli import main
from knnad.datasets import ImageFolder, load_masks
from knnad.embedding import VIEWS, check_augment
from knnad.evaluation import evaluate
from knnad.preprocessing import Preprocessor

WHOLE = dict(backbone="mobilenet_v2", layers="coarse", weights=None, image_size=72, crop_size=None,
             progress=False, coreset=None)
CROP = {**WHOLE, "crop_size": 64}
WIDTH, HEIGHT = 120, 90  # 4:3 images: whole frames of 96 x 72 pixels


def striped(count: int, seed: int, width: int = WIDTH, height: int = HEIGHT):
    """Normal images: vertical stripes with noise (PIL RGB)."""
    rng = np.random.default_rng(seed)
    xx = np.mgrid[0:height, 0:width][1]
    images = []
    for _ in range(count):
        base = 128 + 60 * np.sin(xx / 4.0 + rng.uniform(0, 0.3))[..., None] * np.ones(3)
        noisy = np.clip(base + rng.normal(0, 6, (height, width, 3)), 0, 255)
        images.append(Image.fromarray(noisy.astype(np.uint8)))
    return images


def with_border_defect(image: Image.Image) -> Image.Image:
    """A red defect in the 4 leftmost columns: outside the centre crop (the crop of a 96 x 72
    frame starts 16 px in, at 21 px of the image), inside the whole image."""
    pixels = np.array(image)
    pixels[30:60, 0:4] = [250, 20, 20]
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def normal():
    return striped(6, seed=0)


@pytest.fixture(scope="module")
def whole(normal):
    return Detector(**WHOLE).fit(normal)


def test_whole_image_mode_scores_a_border_defect_that_the_crop_cuts_off(normal, whole):
    clean = striped(3, seed=7)
    defect = with_border_defect(clean[0])
    cropped = Detector(**CROP).fit(normal)
    crop_scores = cropped.predict([clean[0], defect])
    # The crop never sees the defect: the two images score identically, map for map.
    np.testing.assert_array_equal(crop_scores.anomaly_maps[0], crop_scores.anomaly_maps[1])
    assert crop_scores.image_scores[0] == crop_scores.image_scores[1]
    scores = whole.predict(clean[1:] + [defect])
    assert scores.anomaly_maps.shape == (3, 72, 96)  # the whole image: shorter side 72, 4:3 kept
    assert scores.image_scores[2] > 3 * scores.image_scores[:2].max()
    row, column = np.unravel_index(scores.anomaly_maps[2].argmax(), (72, 96))
    # At the defect, 0-3 px x 0.6, rows 30-60 x 0.8
    assert column < 8 and 20 <= row <= 48, (row, column)


def test_maps_at_the_original_size_lie_over_the_image(whole):
    defect = with_border_defect(striped(1, seed=8)[0])
    whole.set_params(map_size="original")
    try:
        prediction = whole.predict([defect, striped(1, seed=9)[0]])
    finally:
        whole.set_params(map_size="processed")
    assert prediction.anomaly_maps.shape == (2, HEIGHT, WIDTH)
    assert prediction.image_sizes == [(HEIGHT, WIDTH)] * 2
    hot = prediction.anomaly_maps[0]
    row, column = np.unravel_index(hot.argmax(), hot.shape)
    assert column < 8 and 28 <= row <= 62, (row, column)  # the defect: rows 30-60, columns 0-3
    # Resizing does not change what the maps say: the image scores are those of the frames.
    processed = whole.predict([defect])
    assert prediction.image_scores[0] == processed.image_scores[0]
    assert abs(hot.max() - processed.anomaly_maps[0].max()) < 0.02 * hot.max()


def test_one_aspect_ratio_per_whole_image_model(normal, whole, tmp_path):
    with pytest.raises(ValueError, match="one aspect ratio"):
        Detector(**WHOLE).fit(normal[:2] + striped(1, seed=1, width=90, height=90))
    square = striped(1, seed=2, width=90, height=90)[0]
    with pytest.raises(ImageLoadError, match="resize to a 72x72 frame.*fit on 96x72 frames"):
        whole.predict([square])
    square.save(tmp_path / "square.png")
    normal[0].save(tmp_path / "wide.png")
    whole.set_params(on_error="skip")
    try:
        prediction = whole.predict([tmp_path / "square.png", tmp_path / "wide.png"])
    finally:
        whole.set_params(on_error="raise")
    assert prediction.skipped == [str(tmp_path / "square.png")] and len(prediction) == 1
    # Images of another size but the same aspect ratio are scored: their frames are alike.
    other_size = striped(1, seed=3, width=240, height=180)
    assert whole.predict(other_size).anomaly_maps.shape == (1, 72, 96)
    with pytest.raises(ValueError,
                       match="map_size='original' needs whole-image mode.*crop_size=None"):
        Detector(**CROP).set_params(map_size="original")
    with pytest.raises(ValueError,
                       match=r"sigma=20 is too large for maps of image_size=72 .*use sigma < "
                             r"17\.875"):
        Detector(**WHOLE, sigma=20).fit(tmp_path / "no-images-here")  # the maps' shorter side: 72
    whole.set_params(map_size="original")
    try:
        with pytest.raises(ValueError, match="images of different sizes.*240x180"):
            whole.predict(striped(1, seed=3) + striped(1, seed=3, width=240, height=180))
    finally:
        whole.set_params(map_size="processed")


def test_whole_image_model_save_load_round_trip(whole, tmp_path):
    whole.calibrate(striped(3, seed=11), quantile=1.0)
    tests = striped(2, seed=12) + [with_border_defect(striped(1, seed=13)[0])]
    path = whole.save(tmp_path / "whole.npz")
    loaded = Detector.load(path).set_params(map_size="original")
    assert loaded.crop_size is None and loaded.preprocessor_.frame == (72, 96)
    whole.set_params(map_size="original")
    try:
        expected = whole.predict(tests)
    finally:
        whole.set_params(map_size="processed")
    got = loaded.predict(tests)
    np.testing.assert_array_equal(got.anomaly_maps, expected.anomaly_maps)
    np.testing.assert_array_equal(got.image_scores, expected.image_scores)
    np.testing.assert_array_equal(got.labels, expected.labels)
    np.testing.assert_array_equal(got.masks, expected.masks)
    assert expected.labels[2] and expected.masks.shape == (3, HEIGHT, WIDTH)
    assert expected.masks[2, 30:60, :4].any()
    with pytest.raises(ImageLoadError, match="fit on 96x72 frames"):
        loaded.predict(striped(1, seed=2, width=90, height=90))
    # A whole-image model file without its frame is refused.
    meta, arrays, version = archive.read_archive(path, "Detector", 2)
    del meta["frame"]
    archive.write_archive(tmp_path / "no-frame.npz", "Detector", version, meta, arrays)
    with pytest.raises(ModelFileError, match="no-frame.npz.*without a valid frame"):
        Detector.load(tmp_path / "no-frame.npz")


def test_files_written_before_these_options_still_load(normal, tmp_path):
    detector = Detector(**CROP).fit(normal)
    meta, arrays, version = archive.read_archive(detector.save(tmp_path / "new.npz"), "Detector", 2)
    for name in ("augment", "map_size"):
        del meta["params"][name]
    del meta["frame"]
    archive.write_archive(tmp_path / "old.npz", "Detector", version, meta, arrays)
    loaded = Detector.load(tmp_path / "old.npz")
    assert (loaded.augment, loaded.map_size, loaded.crop_size) == (None, "processed", 64)
    tests = striped(2, seed=4)
    np.testing.assert_array_equal(loaded.predict(tests).anomaly_maps,
                                  detector.predict(tests).anomaly_maps)


def test_evaluation_masks_cover_the_whole_image(normal, whole, tmp_path):
    folders = {name: tmp_path / name for name in ("train", "good", "bad", "masks")}
    for folder in folders.values():
        folder.mkdir()
    for i, image in enumerate(striped(2, seed=20)):
        image.save(folders["good"] / f"{i}.png")
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[30:60, 0:4] = 255
    for i, image in enumerate(striped(2, seed=21)):
        with_border_defect(image).save(folders["bad"] / f"{i}.png")
        Image.fromarray(mask).save(folders["masks"] / f"{i}.png")
    test = ImageFolder(folders["good"], folders["bad"], folders["masks"])
    masks = load_masks(test, whole.preprocessor_)
    assert masks.shape == (4, 72, 96) and masks[2:, :, :3].any() and not masks[:2].any()
    assert load_masks(test, Preprocessor(72, 64)).shape == (4, 64, 64)
    assert not load_masks(test, Preprocessor(72, 64)).any()  # the crop cuts the defect off
    original = load_masks(test, whole.preprocessor_, original=True)
    np.testing.assert_array_equal(original[2], mask > 0)
    results = evaluate(whole, test)
    assert results["image_auroc"] == 1.0 and results["pixel_auroc"] > 0.95
    whole.set_params(map_size="original")
    try:
        assert evaluate(whole, test)["pixel_auroc"] > 0.95
    finally:
        whole.set_params(map_size="processed")


def test_cli_whole_image_model_and_heatmaps_over_the_original(normal, tmp_path, monkeypatch):
    for i, image in enumerate(normal):
        image.save(tmp_path / f"train{i}.png")
    (tmp_path / "new").mkdir()
    with_border_defect(striped(1, seed=30)[0]).save(tmp_path / "new" / "defect.png")
    model = tmp_path / "model.npz"
    assert main(["fit", *map(str, sorted(tmp_path.glob("train*.png"))), "--model", str(model),
                 "--backbone", "mobilenet_v2", "--weights", "none", "--image-size", "72",
                 "--crop-size", "none", "--coreset", "none", "--augment", "hflip+rot180",
                 "--no-progress"]) == 0
    loaded = Detector.load(model)
    assert loaded.crop_size is None and loaded.augment == ["hflip", "rot180"]
    assert len(loaded.index_) == 3 * 6 * 12 * 9  # three views of 6 images, a 12 x 9 patch grid
    shown = {}

    def capture(images, maps, path, **kwargs):
        shown.update(image=images[0].shape, map=maps.shape)
        path.write_bytes(b"")
        return path

    monkeypatch.setattr("knnad.plots.heatmap_grid", capture)
    assert main(["predict", str(model), str(tmp_path / "new"), "--out", str(tmp_path / "out"),
                 "--map-size", "original", "--no-progress"]) == 0
    assert shown == {"image": (HEIGHT, WIDTH, 3), "map": (1, HEIGHT, WIDTH)}
    assert main(["predict", str(model), str(tmp_path / "new"), "--out", str(tmp_path / "out2"),
                 "--no-progress"]) == 0
    assert shown == {"image": (72, 96, 3), "map": (1, 72, 96)}


def test_whole_image_export_scores_like_the_detector(whole, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from knnad import OnnxDetector

    tests = striped(2, seed=40) + [with_border_defect(striped(1, seed=41)[0])]
    path = whole.export_onnx(tmp_path / "whole.onnx")
    exported = OnnxDetector(path)
    assert exported.input_shape == (None, 3, 72, 96)
    # Readers of knnad-onnx/1 refuse it plainly
    assert exported.metadata["format"] == "knnad-onnx/2"
    for map_size in ("processed", "original"):
        whole.set_params(map_size=map_size)
        try:
            expected = whole.predict(tests)
        finally:
            whole.set_params(map_size="processed")
        got = exported.predict(tests, map_size=map_size)
        assert got.anomaly_maps.shape == expected.anomaly_maps.shape
        np.testing.assert_allclose(got.anomaly_maps, expected.anomaly_maps, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got.image_scores, expected.image_scores, rtol=1e-4)
    with pytest.raises(ImageLoadError, match="fit on 96x72 frames"):
        exported.predict(striped(1, seed=2, width=90, height=90))


# --- augmentation ------------------------------------------------------------------------------

def test_augment_values():
    assert check_augment(None) is None
    assert check_augment("flips") == ("hflip", "vflip")
    assert check_augment("rot180+hflip") == ("hflip", "rot180")
    assert check_augment(["rotations", "vflip"]) == ("vflip", "rot90", "rot180", "rot270")
    assert check_augment("dihedral") == tuple(VIEWS) and len(VIEWS) == 7
    for bad in ("rot45", "", "hflip+", [], 90, ["flips", 3]):
        with pytest.raises(ValueError, match="augment=.*choose None, views"):
            check_augment(bad)
    with pytest.raises(ValueError, match=r"augment='rot45': unknown \['rot45'\]"):
        Detector(augment="rot45").set_params(k=2)
    image = torch.arange(6.0).reshape(1, 1, 2, 3)  # each view is a symmetry of the square
    for name, expected in {"hflip": [[2, 1, 0], [5, 4, 3]], "vflip": [[3, 4, 5], [0, 1, 2]],
                           "rot90": [[2, 5], [1, 4], [0, 3]], "rot180": [[5, 4, 3], [2, 1, 0]],
                           "rot270": [[3, 0], [4, 1], [5, 2]],
                           "transpose": [[0, 3], [1, 4], [2, 5]],
                           "antitranspose": [[5, 2], [4, 1], [3, 0]]}.items():
        assert VIEWS[name](image)[0, 0].tolist() == expected, name


def test_a_rotated_normal_image_scores_like_an_upright_one_only_with_augmentation():
    upright = striped(3, seed=50, width=96, height=96)
    rotated = [image.transpose(Image.Transpose.ROTATE_90) for image in upright]
    ratios = {}
    for augment in (None, "rotations"):
        detector = Detector(**CROP, augment=augment).fit(striped(6, seed=0, width=96, height=96))
        ratios[augment] = (detector.predict(rotated).image_scores
                           / detector.predict(upright).image_scores)
    assert ratios[None].min() > 5, ratios  # stripes across: far from every normal patch
    assert ratios["rotations"].max() < 1.5, ratios


def test_the_augmented_bank_holds_each_view_and_is_searched_exactly(normal):
    detector = Detector(**CROP, augment="hflip+rot90", image_score="spade", image_k=4,
                        k=2).fit(normal[:3])
    preprocessor = detector.preprocessor_
    images = torch.from_numpy(np.stack([preprocessor(image) for image in normal[:3]]))
    bank = []
    for image in images:
        for view in (image, VIEWS["hflip"](image), VIEWS["rot90"](image)):
            bank.append(detector.embedder_(detector.extractor_(view[None]))[0].reshape(-1, 128))
    bank = torch.cat(bank)
    # The views of each image in turn (batched features: float32 rounding of the convolutions).
    np.testing.assert_allclose(detector.index_.vectors(), bank.numpy(), rtol=1e-4, atol=1e-7)
    assert detector.global_features_.shape == (9, 128)  # a view is a training image of its own
    np.testing.assert_array_equal(detector.scales_[0].image_ids, np.repeat(np.arange(9), 64))
    detector.set_params(image_score="max")
    tests = striped(2, seed=60)
    prediction = detector.predict(tests)
    queries = torch.from_numpy(np.stack([preprocessor(image) for image in tests]))
    embedding = detector.embedder_(detector.extractor_(queries)).double().reshape(-1, 128)
    nearest = torch.cdist(embedding, bank.double()).topk(2, largest=False).values
    patch = nearest.mean(1).reshape(2, 8, 8)
    from knnad.anomaly_map import anomaly_maps
    np.testing.assert_allclose(prediction.anomaly_maps, anomaly_maps(patch.float(), 64), rtol=1e-4,
                               atol=1e-5)


def test_whole_image_frames_of_any_aspect_ratio_rotate(normal):
    """Rotated views of a 4:3 frame are 3:4: their patches enter the same bank."""
    detector = Detector(**WHOLE, augment="rot90").fit(normal[:2])
    assert len(detector.index_) == 2 * 2 * 12 * 9
    assert detector.predict(striped(1, seed=70)).anomaly_maps.shape == (1, 72, 96)


# --- layer presets ------------------------------------------------------------------------------

def test_fine_layer_preset(normal, tmp_path):
    fine = Detector(**{**CROP, "layers": "fine"}).fit(normal[:2])
    assert fine.extractor_.layers == ("features.3", "features.6", "features.13")
    # Stride 4: 4x the patches
    assert fine.index_.dim == 24 + 32 + 96 and len(fine.index_) == 2 * 16 * 16
    reduced = Detector(**{**CROP, "layers": ["fine"]}, reduce_dim=128).fit(normal[:2])
    assert reduced.index_.dim == 128 and reduced.config_["layers"] == "fine"
    loaded = Detector.load(reduced.save(tmp_path / "fine.npz"))
    assert tuple(loaded.layers) == ("features.3", "features.6", "features.13")
    np.testing.assert_array_equal(loaded.predict(normal[2:3]).anomaly_maps,
                                  reduced.predict(normal[2:3]).anomaly_maps)
    default = Detector(**{**CROP, "layers": "default"}).fit(normal[:2])
    assert default.extractor_.scales == (("features.6", "features.13"),
                                         ("features.3", "features.6", "features.13"))
    with pytest.raises(ValueError,
                       match="no preset layers 'fine' for backbone 'alexnet'.*pass layers="):
        Detector(**{**CROP, "backbone": "alexnet", "layers": "fine"}).fit(normal[:1])
