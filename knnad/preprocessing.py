"""Images and masks to arrays: decode any PIL mode, resize the shorter side, centre crop (or,
with ``crop_size=None``, the whole resized image), ImageNet normalisation. Masks get the same
geometry with nearest-neighbour interpolation; maps of the whole image go back to its size.

numpy and Pillow only (no torch), so that :class:`~knnad.onnx_detector.OnnxDetector` prepares
images exactly as :class:`~knnad.Detector` does where torch is not installed."""
from __future__ import annotations

import logging
import os
import struct
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from ._checks import check_int
from ._types import PathLike
from .decoders import read_image

logger = logging.getLogger(__name__)

#: ImageNet channel statistics used by every torchvision classification model.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# As float32 [3, 1, 1]: torchvision's normalize subtracts and divides in float32, and so do we.
_MEAN = np.array(IMAGENET_MEAN, np.float32).reshape(3, 1, 1)
_STD = np.array(IMAGENET_STD, np.float32).reshape(3, 1, 1)

#: Largest image after resizing, in pixels (2**24: 192 MiB as float32 RGB); a longer strip
#: (aspect ratio beyond 256:1 at image_size 256) is refused instead of exhausting memory.
MAX_RESIZED_PIXELS = 2**24

#: Sizes of the maps predict returns: those of the arrays the model sees (``"processed"``: the
#: crop, or the whole resized image), or each image's own (``"original"``, whole-image mode).
MAP_SIZES = ("processed", "original")

#: File suffixes treated as images when a folder is scanned.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

ImageInput = Union[PathLike, Image.Image]


class ImageLoadError(ValueError):
    """An image file that cannot be opened or decoded; ``path`` names it."""

    def __init__(self, path: object, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"cannot read image {self.path}: {reason}")


def _upright(image: Image.Image) -> Image.Image:
    """``image`` as viewers show it: turned by its EXIF orientation tag, if it has a readable
    one (a malformed EXIF block leaves the image as stored, as other viewers do)."""
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except (SyntaxError, ValueError, OSError, struct.error):
        return image
    return image if orientation in (0, 1) else ImageOps.exif_transpose(image)


def broken_link(path: Path) -> Optional[str]:
    """What is wrong with ``path`` when it is a symbolic link whose target is gone ("a broken
    symbolic link to TARGET", and what to do), else None."""
    if path.is_symlink() and not path.exists():
        return (f"a broken symbolic link to {os.readlink(path)}; restore its target or remove "
                "the link")
    return None


def open_image(image: ImageInput) -> Image.Image:
    """Open ``image`` (a path or a PIL image), decode it fully (:mod:`knnad.decoders`: the
    fastest exact decoder) and apply its EXIF orientation.

    Raises ImageLoadError naming the file when it is missing, not an image, or truncated.
    """
    if isinstance(image, Image.Image):
        return _upright(image)
    if not isinstance(image, (str, os.PathLike)):
        raise TypeError(f"expected an image path or a PIL.Image, got {type(image).__name__}")
    path = Path(image)
    broken = broken_link(path)
    if broken:
        raise ImageLoadError(path, broken)
    if not path.is_file():
        raise ImageLoadError(path, "no such file")
    try:
        data = path.read_bytes()
    except OSError as error:  # permissions, a device error: the file's, so named with it
        raise ImageLoadError(path, f"cannot read the file ({error.strerror or error}); check its "
                                   f"permissions") from None
    return decode_image(data, path)


def decode_image(data: bytes, source: object) -> Image.Image:
    """The image file held in ``data``, decoded fully and upright, as :func:`open_image` reads a
    file; an ImageLoadError naming ``source`` (its path or name) when it is not a decodable
    image."""
    try:
        return _upright(read_image(data))
    except Image.DecompressionBombError as error:
        raise ImageLoadError(source, f"too many pixels to decode safely ({error}); skip it "
                                     f"(on_error='skip', knnad predict --on-error skip), or, if "
                                     f"the file is trusted, raise PIL.Image.MAX_IMAGE_PIXELS"
                             ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageLoadError(source, f"not a decodable image ({error})") from error


def resized_size(width: int, height: int, size: int) -> Tuple[int, int]:
    """``(width, height)`` of an image of ``width`` x ``height`` pixels with its shorter side
    resized to ``size``, the longer one truncated as torchvision's Resize does."""
    if width <= height:
        return size, max(1, int(size * height / width))
    return max(1, int(size * width / height)), size


def upright_size(path: PathLike) -> Tuple[int, int]:
    """``(width, height)`` of an image file as viewers show it (its EXIF orientation applied),
    read from its header without decoding the pixels."""
    with Image.open(path) as opened:
        width, height = opened.size
        try:
            orientation = opened.getexif().get(ExifTags.Base.Orientation, 1)
        except (SyntaxError, ValueError, OSError, struct.error):
            orientation = 1
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _resize_shorter_side(image: Image.Image, size: Optional[int],
                         resample: Image.Resampling = Image.Resampling.BILINEAR,
                         crop: Optional[int] = None) -> Image.Image:
    """Shorter side to ``size`` (None: as it is), the longer one truncated as torchvision's
    Resize does; with ``crop``, only the centre ``crop`` × ``crop`` window of that
    (:func:`center_crop`'s). The window alone is resampled from its region of ``image`` (PIL's
    ``box``, about three quarters of the work at 256 / 224) where that gives the same pixels:
    when both scale factors are binary fractions (a square image to 256: 900/256), so that
    PIL's filter positions come out exact either way; else the whole image is resized."""
    target = image.size if size is None else resized_size(*image.size, size)
    if crop is None:
        return image if target == image.size else image.resize(target, resample)
    top, left = _crop_offsets(target[1], target[0], crop)
    window = (left, top, left + crop, top + crop)
    if target == image.size:
        return image.crop(window)
    scales = [Fraction(image.size[axis], target[axis]) for axis in (0, 1)]
    box = [corner * scales[number % 2] for number, corner in enumerate(window)]
    if all(_binary(value, 24) for value in (*scales, *box)):  # exact in PIL's float32 box too
        left_x, top_y, right_x, bottom_y = map(float, box)
        return image.resize((crop, crop), resample, box=(left_x, top_y, right_x, bottom_y))
    return image.resize(target, resample).crop(window)


def _binary(value: Fraction, bits: int) -> bool:
    """Whether ``value`` is a binary fraction of at most ``bits`` significant bits."""
    denominator = value.denominator
    return denominator & (denominator - 1) == 0 and value.numerator.bit_length() <= bits


#: Relative excess over the value range that is float rounding, clipped rather than refused.
_ROUNDING = 1e-5


@lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    logger.warning(message)


def resized_rgb(image: Image.Image, size: Optional[int],
                bit_depth: Optional[int] = None, crop: Optional[int] = None) -> np.ndarray:
    """Float32 array ``[3, H, W]`` in [0, 1] of ``image`` (any PIL mode) with its shorter side
    resized to ``size`` (PIL's antialiased bilinear filter, as torchvision's Resize on PIL
    images; None: not resized), and with ``crop`` its centre ``crop`` × ``crop`` window (the
    pixels :func:`center_crop` of the whole resized image gives, computed for the window only).

    8-bit images map 0..255 to 0..1. 16- and 32-bit integer images (``I;16*``, ``I``) map
    0..2**bit_depth - 1 to 0..1 (``bit_depth`` None: 16, the container's depth; cameras often
    write 10-, 12- or 14-bit data in 16-bit files); float images (``F``) are taken as they are
    with ``bit_depth`` None, else scaled the same way. No per-image stretching, so absolute
    intensity stays comparable. Values outside the range raise ValueError saying which
    ``bit_depth`` would fit. Alpha is dropped; grey and palette images become three channels.
    """
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float32)
        if image.mode == "F" and not np.isfinite(values).all():
            raise ValueError(f"{image.mode} image holds NaN or infinite values; repair it first")
        top = 1.0 if image.mode == "F" and bit_depth is None else float(2 ** (bit_depth or 16) - 1)
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if low < -_ROUNDING * top or high > (1 + _ROUNDING) * top:  # float rounding is clipped
            needed = int(np.ceil(np.log2(high + 1))) if low >= 0 and high >= 2 else 99
            raise ValueError(f"{image.mode} image values span [{low:g}, {high:g}], outside "
                             f"0..{top:g}"
                             + (f"; set bit_depth={needed} (or more) to scale them" if needed <= 16
                                else "; scale them to [0, 1] first"))
        if bit_depth is None and image.mode != "F" and 0 < high < 4096:
            _warn_once(f"{image.mode} images hold values below 4096 only: if the camera writes "
                       "10-, 12- or 14-bit data in 16-bit files, set bit_depth (they look dark at "
                       "16)")
        resized = _resize_shorter_side(Image.fromarray(values / top, mode="F"), size, crop=crop)
        grey = np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)
        return np.broadcast_to(grey, (3, *grey.shape))
    if image.mode != "RGB":
        image = image.convert("RGB")
    rgb = np.asarray(_resize_shorter_side(image, size, crop=crop),
                     dtype=np.float32).transpose(2, 0, 1)
    return rgb / np.float32(255.0)


def center_crop(array: np.ndarray, size: int) -> np.ndarray:
    """The centre ``size`` × ``size`` window of ``array`` ``[..., H, W]`` (H, W >= size), placed
    as torchvision's ``center_crop`` places it (offsets rounded half to even)."""
    top, left = _crop_offsets(int(array.shape[-2]), int(array.shape[-1]), size)
    return array[..., top:top + size, left:left + size]


def _crop_offsets(height: int, width: int, size: int) -> Tuple[int, int]:
    """``(top, left)`` of the centre ``size`` × ``size`` window of ``height`` × ``width``."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def check_bit_depth(value: Any, name: str = "bit_depth") -> Optional[int]:
    """``value`` if it is None or an int in [1, 16], else a ValueError naming ``name``."""
    return None if value is None else check_int(value, name, 1, 16)


def check_geometry(image_size: Any, crop_size: Any) -> None:
    """ValueError naming the argument unless both are ints >= 1 and ``crop_size <= image_size``
    (``crop_size`` None: whole-image mode)."""
    check_int(image_size, "image_size")
    if crop_size is None:
        return
    check_int(crop_size, "crop_size", hint=" or None (the whole image)")
    if crop_size > image_size:
        raise ValueError(f"crop_size={crop_size} is larger than image_size={image_size}; "
                         f"the crop is taken from the resized image, so choose "
                         f"crop_size <= image_size")


def denormalise(image: np.ndarray) -> np.ndarray:
    """A normalised ``[3, H, W]`` image (as :class:`Preprocessor` gives) back to RGB
    ``[H, W, 3]`` in [0, 1], for display."""
    rgb = image.transpose(1, 2, 0) * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)
    return np.clip(rgb, 0.0, 1.0)


class Preprocessor:
    """Resize the shorter side to ``image_size`` pixels, centre crop ``crop_size`` × ``crop_size``;
    or, with ``crop_size=None`` (whole-image mode), keep the whole resized image.

    ``preprocessor(image)`` gives the normalised float32 array ``[3, H, W]`` (``(rgb -
    IMAGENET_MEAN) / IMAGENET_STD`` per channel, rgb in [0, 1]) for a path or PIL image, of the
    :attr:`frame` size; :meth:`mask` gives the matching bool array ``[H, W]`` for a mask (any
    non-zero pixel is anomalous).

    Whole-image mode keeps the aspect ratio: a 1000 × 750 image at ``image_size=256`` becomes
    a 341 × 256 frame, the whole image, undistorted, at the scale of the crop mode's resize.
    One model takes one frame size (its feature grid and maps have one shape): ``frame`` is
    set from the images of fit, and an image that resizes to another frame is refused with an
    ImageLoadError naming it (a skippable error: ``on_error="skip"``).
    """

    def __init__(self, image_size: int = 256, crop_size: Optional[int] = 224,
                 bit_depth: Optional[int] = None, frame: Optional[Sequence[int]] = None):
        check_geometry(image_size, crop_size)
        self.image_size = image_size
        self.crop_size = crop_size
        self.bit_depth = check_bit_depth(bit_depth)
        self.frame = frame

    def __repr__(self) -> str:
        return (f"Preprocessor(image_size={self.image_size}, crop_size={self.crop_size}, "
                f"bit_depth={self.bit_depth}"
                + (f", frame={self.frame}" if self.crop_size is None else "") + ")")

    @property
    def frame(self) -> Optional[Tuple[int, int]]:
        """``(height, width)`` of the arrays it gives: ``(crop_size, crop_size)``; in whole-image
        mode the frame of the images a model was fit on, None where not fixed yet (any)."""
        return self._frame if self.crop_size is None else (self.crop_size, self.crop_size)

    @frame.setter
    def frame(self, value: Optional[Sequence[int]]) -> None:
        if value is not None:
            if not (isinstance(value, (tuple, list)) and len(value) == 2):
                raise ValueError(f"frame must be None or (height, width), got {value!r}")
            value = (check_int(value[0], "frame height"), check_int(value[1], "frame width"))
            if self.crop_size is not None and value != self.frame:
                raise ValueError(f"frame={value} differs from the crop, {self.frame}; a frame "
                                 f"is fixed only in whole-image mode (crop_size=None)")
        self._frame = value

    def _decode(self, image: ImageInput) -> Tuple[Image.Image, Any]:
        return open_image(image), "an in-memory image" if isinstance(image, Image.Image) else image

    def _rgb(self, opened: Image.Image, source: Any, size: Optional[int],
             crop: Optional[int] = None) -> np.ndarray:
        try:
            return resized_rgb(opened, size, self.bit_depth, crop)
        except ValueError as error:
            raise ImageLoadError(source, str(error)) from None

    def __call__(self, image: ImageInput) -> np.ndarray:
        return self.prepare(image)[0]

    def prepare(self, image: ImageInput) -> Tuple[np.ndarray, Tuple[int, int]]:
        """``(array, (height, width))``: ``preprocessor(image)`` and the size of the image as
        given (after its EXIF orientation), which maps of the whole image go back to."""
        opened, source = self._decode(image)
        width, height = opened.size
        resized_pixels = self.image_size ** 2 * max(width, height) / max(1, min(width, height))
        if resized_pixels > MAX_RESIZED_PIXELS:
            raise ImageLoadError(source, f"{width}x{height} pixels is too elongated to resize to a "
                                         f"shorter side of {self.image_size} (over "
                                         f"{MAX_RESIZED_PIXELS} pixels); cut it into tiles first")
        if self.crop_size is None and self._frame is not None:
            new_width, new_height = resized_size(width, height, self.image_size)
            if (new_height, new_width) != self._frame:
                fit_height, fit_width = self._frame
                raise ImageLoadError(source, f"{width}x{height} pixels resize to a {new_width}x"
                                             f"{new_height} frame (shorter side "
                                             f"{self.image_size}), but this whole-image model "
                                             "(crop_size=None) was fit on "
                                             f"{fit_width}x{fit_height} frames: one aspect ratio "
                                             "per model; bring the image to "
                                             f"{fit_width}:{fit_height} first, or fit a model on "
                                             "images of its shape")
        rgb = self._rgb(opened, source, self.image_size, self.crop_size)
        return (rgb - _MEAN) / _STD, (height, width)

    def rgb(self, image: ImageInput, original: bool = False) -> np.ndarray:
        """RGB ``[H, W, 3]`` in [0, 1] of ``image`` for display: as the model sees it (resized,
        cropped), or with ``original`` as given (decoded, upright, not resized)."""
        opened, source = self._decode(image)
        if original:
            return self._rgb(opened, source, None).transpose(1, 2, 0)
        return self._rgb(opened, source, self.image_size, self.crop_size).transpose(1, 2, 0)

    def mask(self, mask: ImageInput, original: bool = False) -> np.ndarray:
        """Bool array ``[H, W]`` of the :attr:`frame`'s geometry (``original``: of the mask as
        given): True where the mask is non-zero."""
        binary = np.asarray(open_image(mask).convert("L")) > 0
        if original:
            return binary
        resized = np.asarray(_resize_shorter_side(Image.fromarray(binary.astype(np.uint8)),
                                                  self.image_size, Image.Resampling.NEAREST))
        return (resized if self.crop_size is None else center_crop(resized, self.crop_size)) > 0

    def frame_of(self, width: int, height: int) -> Tuple[int, int]:
        """``(height, width)`` of the array an image of ``width`` x ``height`` pixels (upright)
        becomes."""
        if self.crop_size is not None:
            return self.crop_size, self.crop_size
        new_width, new_height = resized_size(width, height, self.image_size)
        return new_height, new_width

    def original_maps(self, maps: np.ndarray, sizes: Sequence[Tuple[int, int]]) -> np.ndarray:
        """Maps ``[N, H, W]`` of whole-image frames resized to their images' ``sizes``
        (``(height, width)`` each, as :meth:`prepare` gives them) with Pillow's bilinear filter,
        the inverse of the images' resize: each map then lies over its image pixel for pixel.
        Whole-image mode only (a crop's map does not cover the image's border)."""
        if self.crop_size is not None:
            raise ValueError(f"maps at the original image size need whole-image mode: the map of a "
                             f"crop_size={self.crop_size} crop does not cover the image's border; "
                             f"set crop_size=None (and fit again), or map_size='processed'")
        sizes = [(int(height), int(width)) for height, width in sizes]
        if len(sizes) != len(maps):
            raise ValueError(f"{len(maps)} maps but {len(sizes)} image sizes")
        if len(set(sizes)) > 1:
            shown = ", ".join(f"{width}x{height}" for height, width in sorted(set(sizes))[:4])
            raise ValueError("maps at the original image size: images of different sizes "
                             f"({shown}) cannot share one array of maps; predict each size in its "
                             "own call (or predict_batches with batch_size=1), or use "
                             "map_size='processed'")
        if not sizes:
            return maps
        height, width = sizes[0]
        return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(one, np.float32))
                                    .resize((width, height), Image.Resampling.BILINEAR))
                         for one in maps])


def image_files(path: PathLike) -> List[Path]:
    """``[path]`` for an image file (or a broken symbolic link, which reading names), the
    sorted images of a folder (:func:`list_images`); a FileNotFoundError naming ``path`` when
    it is none of these."""
    path = Path(path)
    if path.is_dir():
        return list_images(path)
    if path.is_file() or broken_link(path):
        return [path]
    raise FileNotFoundError(f"{path} is neither an image file nor a folder")


def list_images(folder: PathLike) -> List[Path]:
    """Sorted paths of the image files (by suffix, see IMAGE_SUFFIXES) directly in ``folder``,
    broken symbolic links among them: reading one then raises ImageLoadError naming it (or, with
    ``on_error="skip"``, it is skipped with a warning and listed), instead of its being left out."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                  and (p.is_file() or broken_link(p)))
