import numpy as np
import pytest
import torch
from PIL import Image

from knnad.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageLoadError,
    Preprocessor,
    denormalise,
    list_images,
)


def normalised(value: float) -> torch.Tensor:
    return (value - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)


@pytest.mark.parametrize("image, grey", [
    (Image.new("L", (300, 200), 128), 128 / 255),
    (Image.new("RGB", (300, 200), (128, 128, 128)), 128 / 255),
    (Image.new("RGBA", (300, 200), (128, 128, 128, 10)), 128 / 255),
    (Image.new("P", (300, 200), 0), 0.0),
    (Image.fromarray(np.full((200, 300), 65535, np.uint16)), 1.0),
    (Image.fromarray(np.full((200, 300), 32768, np.uint16)), 32768 / 65535),
])
def test_modes_give_rgb_normalised_tensor(image, grey):
    tensor = Preprocessor(256, 224)(image)
    assert tensor.shape == (3, 224, 224) and tensor.dtype == np.float32
    expected = normalised(grey)[:, None, None].expand(3, 224, 224).numpy()
    np.testing.assert_allclose(tensor, expected, atol=1e-3, rtol=0)


def test_geometry_of_images_and_masks_agree(tmp_path):
    # A 400x300 image: shorter side 300 -> 256, so the scale is 256/300; a bright square marks
    # the defect and its mask must land on the same crop pixels.
    pixels = np.zeros((300, 400, 3), np.uint8)
    pixels[100:160, 250:310] = 255
    mask = np.zeros((300, 400), np.uint8)
    mask[100:160, 250:310] = 255
    Image.fromarray(pixels).save(tmp_path / "image.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    preprocessor = Preprocessor(256, 224)
    image = preprocessor(tmp_path / "image.png")
    binary = preprocessor.mask(tmp_path / "mask.png")
    assert binary.shape == (224, 224) and binary.dtype == np.bool_
    bright = image[0] > 0.5 * float(normalised(1.0)[0])
    agreement = (bright == binary).mean()
    assert agreement > 0.995
    # Square 60 px * 256/300 = 51 px on a side.
    assert abs(int(binary.sum()) - 51 * 51) < 2 * 51 * 2


def test_path_and_pil_agree(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    preprocessor = Preprocessor(128, 112)
    torch.testing.assert_close(preprocessor(tmp_path / "a.png"),
                               preprocessor(Image.fromarray(pixels)))
    assert preprocessor(str(tmp_path / "a.png")).shape == (3, 112, 112)


def test_bad_inputs(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "notes.png").write_text("hello")
    preprocessor = Preprocessor()
    for name in ("broken.png", "notes.png", "missing.png"):
        with pytest.raises(ImageLoadError, match=name) as info:
            preprocessor(tmp_path / name)
        assert info.value.path.endswith(name)
    with pytest.raises(TypeError, match="image path or a PIL.Image"):
        preprocessor(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="crop_size=300 is larger"):
        Preprocessor(256, 300)
    with pytest.raises(ValueError, match="image_size"):
        Preprocessor(0, 0)


def test_truncated_png_is_refused(tmp_path):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 7).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="cut.png"):
        Preprocessor()(tmp_path / "cut.png")


def test_list_images(tmp_path):
    for name in ("b.PNG", "a.jpg", "c.txt", "d.bmp"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "d.bmp"]
    with pytest.raises(FileNotFoundError, match="nothere"):
        list_images(tmp_path / "nothere")


def test_denormalise_inverts_preprocessing():
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[:32, :, 2] = 200, 17, 255
    tensor = Preprocessor(64, 64)(Image.fromarray(rgb))
    restored = denormalise(tensor)
    assert restored.shape == (64, 64, 3)
    np.testing.assert_allclose(restored, rgb / 255.0, atol=1e-5)


def test_decompression_bombs_and_endless_strips_are_image_load_errors(tmp_path, monkeypatch):
    Image.new("L", (100, 100)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # PIL refuses above twice this
    with pytest.raises(ImageLoadError, match="bomb.png.*too many pixels"):
        Preprocessor(72, 64)(tmp_path / "bomb.png")
    monkeypatch.undo()
    Image.new("L", (1, 5000)).save(tmp_path / "strip.png")  # 104 bytes; 256 x 1.28 M resized
    with pytest.raises(ImageLoadError, match="strip.png.*1x5000 pixels is too elongated"):
        Preprocessor()(tmp_path / "strip.png")
    with pytest.raises(ImageLoadError, match="in-memory image"):
        Preprocessor()(Image.new("RGB", (5000, 1)))
    assert Preprocessor(72, 64)(Image.new("RGB", (2000, 100))).shape == (3, 64, 64)  # 20:1 is fine


def test_bit_depth_of_camera_images(tmp_path, caplog):
    rng = np.random.default_rng(3)
    eight = rng.integers(0, 256, (40, 60), dtype=np.uint8)
    twelve = np.round(eight.astype(np.float64) * 4095 / 255).astype(np.uint16)  # 12-bit data
    Image.fromarray(twelve).save(tmp_path / "twelve.png")  # a 16-bit PNG
    reference = Preprocessor(40, 32)(Image.fromarray(eight))
    with caplog.at_level("WARNING", logger="knnad.preprocessing"):
        dark = Preprocessor(40, 32)(tmp_path / "twelve.png")
    assert "set bit_depth" in caplog.text and float(dark.mean()) < float(reference.mean()) - 1
    torch.testing.assert_close(Preprocessor(40, 32, bit_depth=12)(tmp_path / "twelve.png"),
                               reference, atol=2e-3, rtol=0)
    Image.fromarray((twelve.astype(np.uint16) * 16)).save(tmp_path / "sixteen.png")  # up to 65520
    with pytest.raises(ImageLoadError, match=r"sixteen.png.*outside 0..4095; set bit_depth=16"):
        Preprocessor(40, 32, bit_depth=12)(tmp_path / "sixteen.png")
    as_float = Image.fromarray(twelve.astype(np.float32), mode="F")
    with pytest.raises(ImageLoadError, match=r"outside 0..1; set bit_depth=12"):
        Preprocessor(40, 32)(as_float)
    torch.testing.assert_close(Preprocessor(40, 32, bit_depth=12)(as_float), reference, atol=2e-3,
                               rtol=0)
    with pytest.raises(ValueError, match="bit_depth must be an int in"):
        Preprocessor(40, 32, bit_depth=17)


def test_odd_values_and_broken_exif(tmp_path):
    with pytest.raises(ImageLoadError, match="NaN or infinite"):
        Preprocessor(8, 8)(Image.fromarray(np.full((8, 8), np.inf, np.float32), mode="F"))
    rounding = Preprocessor(8, 8)(Image.fromarray(np.full((8, 8), 1.0000001, np.float32), mode="F"))
    torch.testing.assert_close(rounding,
                               Preprocessor(8, 8)(Image.new("RGB", (8, 8), (255, 255, 255))))
    with pytest.raises(ImageLoadError, match=r"outside 0..65535; scale them to \[0, 1\] first"):
        Preprocessor(8, 8)(Image.fromarray(np.full((8, 8), 70000, np.int32), mode="I"))
    image = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    image.save(tmp_path / "broken_exif.png", exif=b"Exif\x00\x00garbage")
    assert Preprocessor(8, 8)(tmp_path / "broken_exif.png").shape == (3, 8, 8)


def test_exif_orientation_is_applied_as_viewers_show_it(tmp_path):
    rng = np.random.default_rng(4)
    stored = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)  # as the sensor wrote it
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(stored).save(tmp_path / "rotated.png", exif=exif)
    upright = Image.fromarray(np.array(Image.fromarray(stored).transpose(Image.ROTATE_270)))
    assert upright.size == (30, 50)
    torch.testing.assert_close(Preprocessor(30, 30)(tmp_path / "rotated.png"),
                               Preprocessor(30, 30)(upright))


@pytest.mark.parametrize("size, crop", [(256, 224), (41, 31), (40, 33)])
def test_equals_torchvision_transforms_bit_for_bit(size, crop):
    # knnad's numpy preprocessing (also used where torch is absent) against torchvision's
    # Resize + CenterCrop + ToTensor + Normalize on PIL images; odd offsets test the rounding.
    from torchvision import transforms
    reference = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(crop),
                                    transforms.ToTensor(),
                                    transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    rng = np.random.default_rng(size)
    for shape in ((300, 400, 3), (97, 61, 3), (64, 64, 3)):
        image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
        expected = reference(image).numpy()
        assert np.array_equal(Preprocessor(size, crop)(image), expected)


def test_the_crop_is_resampled_alone_with_the_pixels_of_the_whole_resize():
    """The centre crop computed from its own region (PIL's box) equals the centre crop of the
    whole resized image, bit for bit, in every mode, for sizes that scale by odd factors,
    upwards, or not at all."""
    from knnad.preprocessing import center_crop, resized_rgb
    rng = np.random.default_rng(7)
    shapes = [(900, 900), (448, 448), (768, 1024), (517, 333), (1000, 257), (240, 240), (30, 45)]
    for height, width in shapes:
        images = {
            "RGB": Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)),
            "L": Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)),
            "I;16": Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16)),
            "F": Image.fromarray(rng.random((height, width), dtype=np.float32)),
        }
        for size, crop in ((256, 224), (240, 240), (64, 41)):
            for mode, image in images.items():
                whole = center_crop(resized_rgb(image, size), crop)
                assert np.array_equal(resized_rgb(image, size, crop=crop), whole), (mode, height,
                                                                                    width, size)
                mean, std = (np.array(values, np.float32).reshape(3, 1, 1)
                             for values in (IMAGENET_MEAN, IMAGENET_STD))
                if size >= crop:
                    assert np.array_equal(Preprocessor(size, crop).prepare(image)[0],
                                          (whole - mean) / std)


def test_a_square_image_resamples_only_its_crop(monkeypatch):
    """MVTec's square images (900 x 900 to 256, crop 224) take the window-only path (PIL's box),
    an image whose scale is not a binary fraction the whole resize."""
    boxes = []
    resize = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda self, size, *args, box=None, **kwargs: (
        boxes.append(box), resize(self, size, *args, box=box, **kwargs))[1])
    rng = np.random.default_rng(3)
    for shape in ((900, 900, 3), (300, 400, 3)):
        Preprocessor(256, 224).prepare(Image.fromarray(rng.integers(0, 256, shape, np.uint8)))
    assert boxes == [(56.25, 56.25, 843.75, 843.75), None]  # 16 and 240 pixels x 900 / 256
