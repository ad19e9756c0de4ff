"""Image files to PIL images by the fastest exact decoder installed.

8-bit PNG goes through libspng and baseline or progressive JPEG through libjpeg-turbo, both by
`imagecodecs <https://github.com/cgohlke/imagecodecs>`_ (PNG in about half of Pillow's time on
MVTec's 900 x 900 images, JPEG in about 60 %). Both give the pixels Pillow gives, to the bit
(tests/test_decoders.py holds them to it on every mode and layout they take): they are used only
where that is so, and Pillow decodes everything else — 16-bit, grey with alpha, CMYK, files
with an EXIF orientation or an eXIf chunk, any file they reject — and whenever imagecodecs is
not installed. numpy, Pillow and (optionally) imagecodecs only, no torch.
"""
from __future__ import annotations

import io
import logging
import struct
from typing import Callable, Optional

import numpy as np
from PIL import ExifTags, Image

try:
    import imagecodecs
except ImportError:  # an optional speed-up: Pillow decodes everything without it
    imagecodecs = None  # type: ignore[assignment]  # mypy's idiom for an optional module

logger = logging.getLogger(__name__)

#: PNG colour types libspng's 8-bit output matches Pillow's conversion to RGB for: grey,
#: RGB, palette (transparency dropped, as Pillow's ``convert("RGB")`` drops it), RGBA.
_PNG_COLOUR_TYPES = (0, 2, 3, 6)


def _png_decoder(header: Image.Image, data: bytes) -> Optional[Callable[[bytes], np.ndarray]]:
    # IHDR is the first chunk: bit depth at byte 24, colour type at 25.
    if len(data) < 26 or data[24] != 8 or data[25] not in _PNG_COLOUR_TYPES:
        return None
    # Pillow reads an eXIf chunk that follows the pixels only after decoding them: a file that
    # may hold one (or these bytes inside its compressed data, rarely) is left to Pillow.
    if b"eXIf" in data:
        return None
    return imagecodecs.spng_decode


def _jpeg_decoder(header: Image.Image, data: bytes) -> Optional[Callable[[bytes], np.ndarray]]:
    if header.mode not in ("RGB", "L"):
        return None
    try:  # JPEG keeps its EXIF block before the pixels: Pillow has read it already
        orientation = header.getexif().get(ExifTags.Base.Orientation, 1)
    except (SyntaxError, ValueError, OSError, struct.error):
        return None
    return imagecodecs.jpeg8_decode if orientation in (0, 1) else None


_DECODERS = {"PNG": _png_decoder, "JPEG": _jpeg_decoder}


def decode_fast(header: Image.Image, data: bytes) -> Optional[Image.Image]:
    """The image in ``data`` (the whole file, whose header Pillow has opened as ``header``)
    decoded by libspng or libjpeg-turbo, as a PIL image of mode ``L``, ``RGB`` or ``RGBA`` whose
    RGB conversion equals that of ``header`` decoded by Pillow, bit for bit; None where that is
    not known to hold, or the fast decoder rejects the data: decode ``header`` with Pillow then
    (it names what is wrong with a broken file)."""
    choose = _DECODERS.get(header.format or "") if imagecodecs is not None else None
    decoder = choose(header, data) if choose is not None else None
    if decoder is None:
        return None
    try:
        pixels = decoder(data)
    except Exception as error:  # noqa: BLE001 (imagecodecs raises one class per codec)
        logger.debug("%s decoder refused the data (%s); Pillow decodes it", header.format, error)
        return None
    if pixels.dtype != np.uint8 or pixels.shape[:2] != header.size[::-1]:
        return None
    return Image.fromarray(pixels)


def read_image(data: bytes) -> Image.Image:
    """``data`` (a whole image file) decoded: by :func:`decode_fast` where it applies, else by
    Pillow (fully loaded). Pillow's exceptions for data it cannot read pass through; the EXIF
    orientation is not applied here (the fast path takes only files without one)."""
    header = Image.open(io.BytesIO(data))
    fast = decode_fast(header, data)
    if fast is not None:
        header.close()
        return fast
    header.load()
    return header

