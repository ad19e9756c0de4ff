"""The fast decoders (libspng, libjpeg-turbo through imagecodecs) give Pillow's pixels to the
bit, and leave to Pillow every file where that is not known to hold."""
import io

import numpy as np
import pytest
from PIL import Image

from knnad import decoders
from knnad.preprocessing import ImageLoadError, Preprocessor

RNG = np.random.default_rng(7)
# Smooth content with noise: JPEG's chroma subsampling and IDCT rounding show on it.
_ramp = np.linspace(0, 255, 97)[None, :, None] * np.linspace(0.2, 1, 75)[:, None, None]
PICTURE = np.clip(_ramp + RNG.normal(0, 25, (75, 97, 3)), 0, 255).astype(np.uint8)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def pillow_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


rgb = Image.fromarray(PICTURE)
palette = rgb.convert("P", palette=Image.ADAPTIVE, colors=50)
FAST = {
    "png rgb": encoded(rgb, "PNG"),
    "png rgba": encoded(Image.fromarray(np.dstack([PICTURE, PICTURE[..., :1]])), "PNG"),
    "png grey": encoded(rgb.convert("L"), "PNG"),
    "png palette": encoded(palette, "PNG"),
    "png palette with transparency": encoded(palette, "PNG", transparency=3),
    "png interlaced": encoded(rgb, "PNG", interlace=1),
    "png compress_level 0": encoded(rgb, "PNG", compress_level=0),
    "jpeg 4:2:0": encoded(rgb, "JPEG", quality=90),
    "jpeg 4:4:4": encoded(rgb, "JPEG", quality=95, subsampling=0),
    "jpeg 4:2:2": encoded(rgb, "JPEG", quality=75, subsampling=1),
    "jpeg progressive": encoded(rgb, "JPEG", quality=85, progressive=True),
    "jpeg optimized": encoded(rgb, "JPEG", quality=60, optimize=True),
    "jpeg grey": encoded(rgb.convert("L"), "JPEG", quality=90),
}


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


PILLOW_ONLY = {
    "png 16-bit": encoded(Image.fromarray(PICTURE[..., 0].astype(np.uint16) * 257), "PNG"),
    "png grey with alpha": encoded(rgb.convert("LA"), "PNG"),
    "png 1-bit": encoded(rgb.convert("1"), "PNG"),
    "png with an eXIf chunk": encoded(rgb, "PNG", exif=_exif(6)),
    "jpeg turned by EXIF": encoded(rgb, "JPEG", exif=_exif(6)),
    "jpeg cmyk": encoded(rgb.convert("CMYK"), "JPEG"),
    "bmp": encoded(rgb, "BMP"),
    "tiff": encoded(rgb, "TIFF"),
}


@pytest.mark.parametrize("name", FAST)
def test_fast_decoders_give_pillows_pixels(name):
    data = FAST[name]
    fast = decoders.decode_fast(Image.open(io.BytesIO(data)), data)
    assert fast is not None, f"{name} should take the fast path"
    assert np.array_equal(np.asarray(fast.convert("RGB")), pillow_rgb(data))


@pytest.mark.parametrize("name", PILLOW_ONLY)
def test_other_files_are_left_to_pillow(name):
    data = PILLOW_ONLY[name]
    assert decoders.decode_fast(Image.open(io.BytesIO(data)), data) is None
    assert np.array_equal(np.asarray(decoders.read_image(data).convert("RGB")), pillow_rgb(data))


def test_a_truncated_png_is_named_as_before(tmp_path):
    path = tmp_path / "cut.png"
    path.write_bytes(FAST["png rgb"][:-200])
    with pytest.raises(ImageLoadError, match="cut.png"):
        Preprocessor()(path)


def test_genuine_images_and_masks_prepare_to_the_bit(bottle_root, monkeypatch):
    category = bottle_root / "bottle"
    paths = sorted((category / "test" / "broken_large").glob("*.png"))[:3]
    masks = sorted((category / "ground_truth" / "broken_large").glob("*.png"))[:3]
    data = paths[0].read_bytes()
    assert decoders.decode_fast(Image.open(io.BytesIO(data)), data) is not None

    def prepared(preprocessor):
        return ([preprocessor.prepare(path)[0] for path in paths]
                + [preprocessor.mask(m) for m in masks])

    for preprocessor in (Preprocessor(), Preprocessor(256, None)):
        fast = prepared(preprocessor)
        with monkeypatch.context() as patched:
            patched.setattr(decoders, "imagecodecs", None)
            pillow = prepared(preprocessor)
        assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(fast, pillow))
