"""Image sources: what ``fit`` and ``predict`` accept, turned into preprocessed batches.

A source is a knnad dataset, a folder or image file, a list of paths or PIL images, or a float
tensor batch of images already preprocessed. :func:`batches` decodes files in worker threads,
one batch ahead of the caller, and skips or raises on files that cannot be decoded.

Imports no torch: a tensor can only be passed where torch is already loaded, so tensors are
recognised through ``sys.modules`` and the torch-free :class:`~knnad.onnx_detector.OnnxDetector`
reads its images here too.
"""
from __future__ import annotations

import logging
import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator, List, Optional, Tuple, Union

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .preprocessing import ImageLoadError, Preprocessor, image_files

logger = logging.getLogger(__name__)

#: What to do with an image file that cannot be decoded.
ON_ERROR = ("raise", "skip")
#: Decoding threads (PIL releases the GIL while decoding and resizing).
_DECODE_THREADS = min(4, os.cpu_count() or 1)

#: A list of paths and PIL images, or a float batch ``[N, 3, H, W]`` (numpy array or tensor).
Items = Union[List[Any], Any]


def _is_tensor(data: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(data, torch.Tensor)


def check_finite(images: Any, prefix: str = "") -> None:
    """ValueError (message after ``prefix``) naming the images of a float batch ``[N, ...]``
    (numpy array or tensor) that hold NaN or inf."""
    finite = images.isfinite() if _is_tensor(images) else np.isfinite(images)
    bad = [i for i in range(len(images)) if not bool(finite[i].all())]
    if bad:
        raise ValueError(f"{prefix}images {bad[:10]} of the batch hold NaN or inf; repair or "
                         "remove them")


@dataclass
class Batch:
    """Preprocessed ``images`` ``[B, 3, H, W]`` (a float32 numpy array; a slice of the
    caller's float batch, of its type and dtype, when given one), their ``paths`` (None for
    in-memory images), the ``skipped`` paths of this batch that could not be decoded (None for
    an in-memory image), and the ``sizes`` ``(height, width)`` of the images as given (of the
    arrays, for a float batch)."""

    images: Any
    paths: List[Optional[str]]
    skipped: List[Optional[str]]
    sizes: List[Tuple[int, int]] = field(default_factory=list)


def image_items(data: Any, argument: str, normal_only: bool = False) -> Items:
    """The images of ``data``: a list of paths / PIL images, or a float batch ``[N, 3, H, W]``
    (torch tensor or numpy array) of normalised images.

    Raises TypeError or ValueError naming ``argument`` for anything else, FileNotFoundError for
    a missing path, and, with ``normal_only``, ValueError for a dataset holding defect images.
    """
    if hasattr(data, "samples"):  # a knnad dataset
        defective = [s.path for s in data.samples if s.label != 0]
        if normal_only and defective:
            raise ValueError(f"{argument} holds {len(defective)} defect images (e.g. "
                             f"{defective[0]}); fit learns from normal images only: use "
                             f"split='train' or the normal folder")
        return [sample.path for sample in data.samples]
    if _is_tensor(data) or isinstance(data, np.ndarray):
        floating = (data.is_floating_point() if _is_tensor(data)
                    else np.issubdtype(data.dtype, np.floating))
        if data.ndim != 4 or data.shape[1] != 3 or not floating:
            raise ValueError(f"{argument}: an array must be a float batch [N, 3, H, W] of "
                             f"normalised images, got {data.dtype} {tuple(data.shape)}")
        check_finite(data, f"{argument}: ")
        return data
    if isinstance(data, (str, os.PathLike)):
        try:
            return image_files(data)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{argument}: {error}") from None
    if isinstance(data, Image.Image):
        return [data]
    if isinstance(data, (list, tuple)):
        for item in data:
            if not isinstance(item, (str, os.PathLike, Image.Image)):
                raise TypeError(f"{argument}: list items must be image paths or PIL images, "
                                f"got {type(item).__name__}")
        return list(data)
    raise TypeError(f"{argument} must be a knnad dataset, a folder, a list of image paths or "
                    f"PIL images, or a float batch [N, 3, H, W]; got {type(data).__name__}")


def batches(items: Items, preprocessor: Preprocessor, batch_size: int, on_error: str = "raise",
            progress: bool = False, description: str = "images") -> Iterator[Batch]:
    """Preprocessed batches of at most ``batch_size`` images of ``items`` (from
    :func:`image_items`), in order. The next batch is decoded in worker threads while the
    caller works on the current one. ``on_error="skip"`` skips undecodable files with a warning
    (a batch may then hold no image, only ``skipped``); ``"raise"`` raises ImageLoadError.
    Images whose arrays differ in size (whole-image mode, where the preprocessor's frame is not
    fixed yet, and images of several aspect ratios) raise a ValueError naming two of them."""
    if not isinstance(items, list):  # a batch of preprocessed images
        for start in tqdm(range(0, len(items), batch_size), desc=description,
                          disable=not progress, unit="batch"):
            chunk = items[start:start + batch_size]
            yield Batch(chunk, [None] * len(chunk), [], [tuple(chunk.shape[-2:])] * len(chunk))
        return

    def load(item: Any) -> Optional[Tuple[np.ndarray, Tuple[int, int]]]:
        try:
            return preprocessor.prepare(item)
        except ImageLoadError as error:
            if on_error == "raise":
                raise
            logger.warning("skipping %s", error)
            return None

    chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    frame, first = preprocessor.frame, None  # first: the image that set the frame
    with ThreadPoolExecutor(max_workers=_DECODE_THREADS) as pool, \
            tqdm(total=len(items), desc=description, disable=not progress, unit="img") as bar:
        pending = deque([[pool.submit(load, item) for item in chunks[0]]] if chunks else [])
        for position, chunk in enumerate(chunks):
            if position + 1 < len(chunks):
                pending.append([pool.submit(load, item) for item in chunks[position + 1]])
            loaded = [future.result() for future in pending.popleft()]
            paths = [None if isinstance(item, Image.Image) else str(item) for item in chunk]
            kept = {i: image for i, image in enumerate(loaded) if image is not None}
            for i, (array, _) in kept.items():
                shape = array.shape[-2:]
                if frame is None:
                    frame, first = shape, _shown(chunk[i])
                elif shape != frame:
                    raise ValueError(f"{_shown(chunk[i])} gives a {shape[1]}x{shape[0]} image "
                                     f"after resizing, but {first or 'the model'} "
                                     f"{'gave' if first else 'takes'} {frame[1]}x{frame[0]}: in "
                                     "whole-image mode (crop_size=None) the images of a model "
                                     "must have one aspect ratio; fit one model per image shape, "
                                     "bring them to one aspect ratio first, or set crop_size")
            bar.update(len(chunk))
            yield Batch(np.stack([array for array, _ in kept.values()]) if kept else
                        np.empty((0, 3, *(frame or (0, 0))), np.float32),
                        [paths[i] for i in kept],
                        [paths[i] for i, image in enumerate(loaded) if image is None],
                        [size for _, size in kept.values()])


def _shown(item: Any) -> str:
    return "an in-memory image" if isinstance(item, Image.Image) else str(item)
