import logging

import numpy as np
import pytest
from PIL import Image

from knnad.datasets import (
    BTAD,
    BTAD_ARCHIVE_FOLDER,
    MVTEC_CATEGORIES,
    ImageFolder,
    MVTecAD,
    Sample,
    load_masks,
)


def write_image(path, size=(40, 30), value=100, mode="RGB", suffix=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value,) * 3).save(path)
    return path


def write_mask(path, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros(size[::-1], np.uint8)
    pixels[5:10, 5:10] = 255
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def mvtec_root(tmp_path):
    root = tmp_path / "mvtec"
    for i in range(3):
        write_image(root / "bottle" / "train" / "good" / f"{i:03d}.png")
    write_image(root / "bottle" / "test" / "good" / "000.png")
    for defect in ("broken_large", "contamination"):
        for i in range(2):
            write_image(root / "bottle" / "test" / defect / f"{i:03d}.png")
            write_mask(root / "bottle" / "ground_truth" / defect / f"{i:03d}_mask.png")
    return root


@pytest.fixture
def btad_root(tmp_path):
    """BTAD's layout as its archive unpacks: bmp and png images, png and bmp masks."""
    root = tmp_path / "download" / BTAD_ARCHIVE_FOLDER
    for i in range(3):
        write_image(root / "01" / "train" / "ok" / f"{i:04d}.bmp")
    write_image(root / "01" / "test" / "ok" / "0000.bmp")
    write_image(root / "01" / "test" / "ko" / "0000.bmp")
    write_mask(root / "01" / "ground_truth" / "ko" / "0000.png")
    write_image(root / "01" / "test" / "ko" / "0001.png")
    write_mask(root / "01" / "ground_truth" / "ko" / "0001.bmp")
    for i in range(2):
        write_image(root / "02" / "train" / "ok" / f"{i:04d}.png")
    return root


def test_mvtec_layout(mvtec_root):
    train = MVTecAD(mvtec_root, "bottle", "train")
    assert len(train) == 3 and all(s.label == 0 and s.mask_path is None for s in train.samples)
    test = MVTecAD(mvtec_root, "bottle", "test")
    assert len(test) == 5
    assert list(test.labels) == [1, 1, 1, 1, 0]
    assert test.defects == ["broken_large"] * 2 + ["contamination"] * 2 + ["good"]
    first = test.samples[0]
    assert isinstance(first, Sample)
    ground_truth = mvtec_root / "bottle" / "ground_truth"
    assert first.mask_path == ground_truth / "broken_large" / "000_mask.png"
    assert "bottle" in MVTEC_CATEGORIES


def test_mvtec_errors(mvtec_root, tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match="nothere"):
        MVTecAD(tmp_path / "nothere", "bottle")
    with pytest.raises(ValueError, match=r"unknown MVTec AD category 'cable'.*\['bottle'\]"):
        MVTecAD(mvtec_root, "cable")
    with pytest.raises(ValueError, match="split="):
        MVTecAD(mvtec_root, "bottle", "val")
    (mvtec_root / "bottle" / "ground_truth" / "contamination" / "001_mask.png").unlink()
    with pytest.raises(ValueError, match="001.png has no mask.*allow_missing_masks"):
        MVTecAD(mvtec_root, "bottle", "test")
    with caplog.at_level(logging.WARNING):
        allowed = MVTecAD(mvtec_root, "bottle", "test", allow_missing_masks=True)
    assert allowed.samples[3].mask_path is None and "no mask" in caplog.text
    write_mask(mvtec_root / "bottle" / "ground_truth" / "contamination" / "001_mask.png",
               size=(20, 20))
    with pytest.raises(ValueError, match="is 20x20 but its image .* is 40x30"):
        MVTecAD(mvtec_root, "bottle", "test")


def test_not_images_are_skipped_with_a_warning(mvtec_root, caplog):
    good = mvtec_root / "bottle" / "train" / "good"
    (good / "notes.txt").write_text("hi")
    (good / "fake.png").write_text("not a png")
    with caplog.at_level(logging.WARNING):
        train = MVTecAD(mvtec_root, "bottle", "train")
    assert len(train) == 3
    assert "notes.txt" in caplog.text and "fake.png" in caplog.text
    assert sorted(p.name for p in train.not_images) == ["fake.png", "notes.txt"]


def test_empty_split(tmp_path):
    (tmp_path / "bottle" / "train" / "good").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images found"):
        MVTecAD(tmp_path, "bottle", "train")


def test_btad_layout(btad_root):
    parent = btad_root.parent
    for root in (btad_root, parent):  # the archive folder or the folder above it
        train = BTAD(root, "01", "train")
        assert [s.path.suffix for s in train.samples] == [".bmp"] * 3
    test = BTAD(parent, "01", "test")
    assert list(test.labels) == [0, 1, 1]
    assert [s.mask_path.name for s in test.samples if s.label] == ["0000.png", "0001.bmp"]
    assert test.defects == ["good", "ko", "ko"]
    assert len(BTAD(btad_root, "02", "train")) == 2
    with pytest.raises(ValueError, match=r"unknown BTAD category '03'.*\['01', '02'\]"):
        BTAD(btad_root, "03")
    (btad_root / "01" / "ground_truth" / "ko" / "0001.bmp").unlink()
    with pytest.raises(ValueError, match="0001.png has no mask"):
        BTAD(btad_root, "01", "test")


def test_image_folder(tmp_path):
    for i in range(2):
        write_image(tmp_path / "normal" / f"n{i}.png")
        write_image(tmp_path / "bad" / f"b{i}.jpg")
    write_mask(tmp_path / "masks" / "b0.png")
    write_mask(tmp_path / "masks" / "b1_mask.png")
    plain = ImageFolder(tmp_path / "normal")
    assert len(plain) == 2 and list(plain.labels) == [0, 0]
    unmasked = ImageFolder(tmp_path / "normal", tmp_path / "bad")
    assert list(unmasked.labels) == [0, 0, 1, 1] and unmasked.samples[2].mask_path is None
    masked = ImageFolder(tmp_path / "normal", tmp_path / "bad", tmp_path / "masks")
    assert [s.mask_path.name for s in masked.samples if s.label] == ["b0.png", "b1_mask.png"]
    with pytest.raises(FileNotFoundError, match="abnormal_dir"):
        ImageFolder(tmp_path / "normal", tmp_path / "missing")
    with pytest.raises(ValueError, match="without abnormal_dir"):
        ImageFolder(tmp_path / "normal", mask_dir=tmp_path / "masks")


def test_genuine_bottle(bottle_root):
    train = MVTecAD(bottle_root, "bottle", "train")
    test = MVTecAD(bottle_root, "bottle", "test")
    assert len(train) == 209
    assert len(test) == 83 and int(test.labels.sum()) == 63
    assert {d: test.defects.count(d) for d in set(test.defects)} == {
        "good": 20, "broken_large": 20, "broken_small": 22, "contamination": 21}
    assert all(s.mask_path is not None and s.mask_path.is_file() for s in test.samples if s.label)


def test_detector_takes_datasets_and_refuses_defects_in_fit(mvtec_root):
    import knnad
    detector = knnad.Detector("mobilenet_v2", weights=None, image_size=40, crop_size=32,
                              progress=False)
    detector.fit(MVTecAD(mvtec_root, "bottle", "train"))
    assert len(detector.train_paths_) == 3
    test = MVTecAD(mvtec_root, "bottle", "test")
    with pytest.raises(ValueError, match="4 defect images"):
        detector.fit(test)
    results = knnad.evaluate(detector, test)
    assert results["images"] == 5
    assert set(results["per_defect"]) == {"broken_large", "contamination"}
    prediction = detector.predict(test)
    masks = load_masks(test, detector.preprocessor_)
    assert masks.shape == (5, 32, 32) and masks[test.labels == 1].any(axis=(1, 2)).all()
    assert not masks[test.labels == 0].any()
    expected = knnad.metrics.pixel_auroc(masks, prediction.anomaly_maps)
    assert results["pixel_auroc"] == pytest.approx(expected)
    assert results["per_defect"]["contamination"]["images"] == int((test.labels == 0).sum()) + \
        test.defects.count("contamination")


def test_category_must_be_a_name(btad_root, mvtec_root):
    with pytest.raises(ValueError, match="BTAD category must be a folder name such as '01', got 1"):
        BTAD(btad_root, 1)
    with pytest.raises(ValueError, match="category must be a folder name"):
        MVTecAD(mvtec_root, None)


def test_image_folder_refuses_one_folder_in_two_roles(tmp_path):
    """The same folder as normal and abnormal images (or as masks) would label each image
    twice (issue #21); a folder inside another holds other images, and is accepted."""
    images = tmp_path / "images"
    for i in range(2):
        write_image(images / f"{i}.png")
    bad = tmp_path / "bad"
    write_image(bad / "b.png")
    (tmp_path / "link").symlink_to(images)
    for arguments, roles, folder in [((images, images), "normal_dir and abnormal_dir", images),
                                     ((str(images), tmp_path / "link" / "."),
                                      "normal_dir and abnormal_dir", images),
                                     ((images, bad, bad), "abnormal_dir and mask_dir", bad),
                                     ((images, bad, images), "normal_dir and mask_dir", images)]:
        with pytest.raises(ValueError,
                           match=rf"{roles} are the same folder {folder}.*separate folders"):
            ImageFolder(*arguments)
    write_image(images / "defects" / "d.png")
    nested = ImageFolder(images, images / "defects")
    assert list(nested.labels) == [0, 0, 1]


def test_a_broken_link_in_a_dataset_is_named(mvtec_root, tmp_path):
    """A symbolic link to a file that is gone is an error naming the link and its target, not
    an image quietly left out (issue #21)."""
    good = mvtec_root / "bottle" / "train" / "good"
    (good / "003.png").symlink_to(tmp_path / "moved" / "003.png")
    with pytest.raises(FileNotFoundError,
                       match=r"003.png is a broken symbolic link .*moved.*restore"):
        MVTecAD(mvtec_root, "bottle", "train")
    with pytest.raises(FileNotFoundError, match=r"003.png is a broken symbolic link"):
        ImageFolder(good)
    (good / "003.png").unlink()
    masks = mvtec_root / "bottle" / "ground_truth" / "contamination"
    (masks / "001_mask.png").rename(tmp_path / "001_mask.png")
    (masks / "001_mask.png").symlink_to(tmp_path / "moved" / "001_mask.png")
    with pytest.raises(FileNotFoundError, match=r"001_mask.png is a broken symbolic link"):
        MVTecAD(mvtec_root, "bottle", "test", allow_missing_masks=True)
