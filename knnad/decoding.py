"""The decoding stage of :func:`knnad.distributed.predict_dataset`, run in Ray tasks.

Imports neither torch nor Ray: the worker processes that run it load this module, numpy and
Pillow only (about 190 MiB each with Ray Data, against 830 MiB with torch), so a node can run
one decoding task per CPU beside its scoring workers.
"""
from __future__ import annotations

import logging
from typing import Dict

import numpy as np

from .preprocessing import ImageLoadError, Preprocessor

logger = logging.getLogger(__name__)


def decode_batch(batch: Dict[str, np.ndarray], preprocessor: Preprocessor) -> Dict[str, np.ndarray]:
    """A Ray Data batch of image paths, ``batch["path"]`` ``[B]``, decoded: ``path`` ``[B]``
    (str), ``image`` float32 ``[B, 3, H, W]`` as ``preprocessor`` prepares it (``H, W``: its
    frame, the crop or a whole-image model's frame), and
    ``error`` ``[B]`` (str): "" where the image was read, else why it could not be (its
    ``image`` is then zeros)."""
    if preprocessor.frame is None:
        raise ValueError("decode_batch needs the frame of the model's images: a crop_size, or the "
                         "frame a whole-image model was fit on")
    paths = [str(path) for path in batch["path"]]
    images = np.zeros((len(paths), 3, *preprocessor.frame), np.float32)
    errors = np.full(len(paths), "", dtype=object)
    for row, path in enumerate(paths):
        try:
            images[row] = preprocessor(path)
        except ImageLoadError as error:
            logger.warning("skipping %s", error)
            errors[row] = str(error)
    return {"path": np.array(paths, dtype=object), "image": images, "error": errors}
