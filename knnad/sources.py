"""Image sources: what ``fit`` and ``predict`` accept, turned into preprocessed batches.

A source is a knnad dataset, a folder or image file, a list of paths or PIL images, or a float
tensor batch of images already preprocessed. :func:`batches` decodes files in worker threads,
one batch ahead of the caller, and skips or raises on files that cannot be decoded.
"""
from __future__ import annotations

import logging
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Union

import torch
from PIL import Image
from tqdm.auto import tqdm

from .preprocessing import ImageLoadError, Preprocessor, image_files

logger = logging.getLogger(__name__)

#: What to do with an image file that cannot be decoded.
ON_ERROR = ("raise", "skip")
#: Decoding threads (PIL releases the GIL while decoding and resizing).
_DECODE_THREADS = min(4, os.cpu_count() or 1)

Items = Union[List[Any], torch.Tensor]


@dataclass
class Batch:
    """Preprocessed ``images`` ``[B, 3, H, W]`` (float32), their ``paths`` (None for in-memory
    images) and the ``skipped`` paths of this batch that could not be decoded."""

    images: torch.Tensor
    paths: List[Optional[str]]
    skipped: List[str]


def image_items(data: Any, argument: str, normal_only: bool = False) -> Items:
    """The images of ``data``: a list of paths / PIL images, or a float tensor batch.

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
    if isinstance(data, torch.Tensor):
        if data.ndim != 4 or data.shape[1] != 3 or not data.is_floating_point():
            raise ValueError(f"{argument}: a tensor must be a float batch [N, 3, H, W] of "
                             f"normalised images, got {data.dtype} {tuple(data.shape)}")
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
                    f"PIL images, or a float tensor [N, 3, H, W]; got {type(data).__name__}")


def batches(items: Items, preprocessor: Preprocessor, batch_size: int, on_error: str = "raise",
            progress: bool = False, description: str = "images") -> Iterator[Batch]:
    """Preprocessed batches of at most ``batch_size`` images of ``items`` (from
    :func:`image_items`), in order. The next batch is decoded in worker threads while the
    caller works on the current one. ``on_error="skip"`` skips undecodable files with a warning
    (a batch may then hold no image, only ``skipped``); ``"raise"`` raises ImageLoadError."""
    if isinstance(items, torch.Tensor):
        for start in tqdm(range(0, len(items), batch_size), desc=description,
                          disable=not progress, unit="batch"):
            chunk = items[start:start + batch_size]
            yield Batch(chunk, [None] * len(chunk), [])
        return

    def load(item: Any) -> Optional[torch.Tensor]:
        try:
            return preprocessor(item)
        except ImageLoadError as error:
            if on_error == "raise":
                raise
            logger.warning("skipping %s", error)
            return None

    chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    crop = preprocessor.crop_size
    with ThreadPoolExecutor(max_workers=_DECODE_THREADS) as pool, \
            tqdm(total=len(items), desc=description, disable=not progress, unit="img") as bar:
        pending = deque([[pool.submit(load, item) for item in chunks[0]]] if chunks else [])
        for position, chunk in enumerate(chunks):
            if position + 1 < len(chunks):
                pending.append([pool.submit(load, item) for item in chunks[position + 1]])
            loaded = [future.result() for future in pending.popleft()]
            paths = [None if isinstance(item, Image.Image) else str(item) for item in chunk]
            kept = [i for i, tensor in enumerate(loaded) if tensor is not None]
            bar.update(len(chunk))
            yield Batch(torch.stack([loaded[i] for i in kept]) if kept else torch.empty(0, 3, crop, crop),
                        [paths[i] for i in kept],
                        [paths[i] for i, tensor in enumerate(loaded) if tensor is None])
