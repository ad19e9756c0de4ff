"""Scoring with an exported ONNX file (:mod:`knnad.deploy.export`) through ONNX Runtime: numpy,
Pillow and onnxruntime only — neither torch nor faiss is imported."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence

import numpy as np

from .._checks import check_choice, check_int
from .._types import PathLike
from ..prediction import Prediction
from ..preprocessing import MAP_SIZES, Preprocessor
from ..sources import ON_ERROR, batches, check_finite, image_items
from ..thresholds import Thresholds

#: The file format this module reads and :mod:`knnad.deploy.export` writes (defined here, on the
#: torch-free side): metadata keys start with METADATA_PREFIX, each value JSON; the graph's
#: doc_string is DIGEST_PREFIX + :func:`metadata_digest` of them.
FORMAT = "knnad-onnx/1"
#: The format of whole-image exports (``crop_size`` None, ``preprocessing.frame`` the input's
#: height and width), which readers of FORMAT alone cannot prepare images for.
WHOLE_IMAGE_FORMAT = "knnad-onnx/2"
METADATA_PREFIX = "knnad."
DIGEST_PREFIX = "knnad metadata sha256:"
INPUT, OUTPUTS = "images", ("image_scores", "anomaly_maps")
_REQUIRED = ("format", "version", "backbone", "weights", "layers", "preprocessing", "scoring",
             "bank", "io", "thresholds")


def import_onnxruntime():
    """The ``onnxruntime`` module, or an ImportError naming the extra that installs it."""
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("OnnxDetector needs onnxruntime: pip install 'knnad[export]' "
                          "(or onnxruntime alone)") from None
    return onnxruntime


def metadata_digest(metadata: Dict[str, str]) -> str:
    """SHA-256 over the ``knnad.`` metadata entries, in key order."""
    entries = sorted((key, value) for key, value in metadata.items()
                     if key.startswith(METADATA_PREFIX))
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


class OnnxDetector:
    """A detector exported by :meth:`knnad.Detector.export_onnx`, run by ONNX Runtime.

    ``OnnxDetector(path, providers=None, session_options=None)``: ``providers`` and
    ``session_options`` (an ``onnxruntime.SessionOptions``) as for
    ``onnxruntime.InferenceSession`` (default: CPU, ONNX Runtime's defaults). ONNX Runtime
    prepacks the bank's tiles for its matrix product, a second copy of the bank; where memory
    is tight, ``options.add_session_config_entry("session.disable_prepacking", "1")`` keeps one
    (``benchmarks/results/export-bottle-cpu2.md``: a few % slower). :meth:`predict` takes what
    ``Detector.predict`` takes (paths, folders, PIL images, knnad datasets, float batches
    ``[N, 3, H, W]`` as numpy arrays), prepares images with knnad's
    :class:`~knnad.preprocessing.Preprocessor`, and returns the same
    :class:`~knnad.prediction.Prediction`, with labels and masks from the thresholds in the
    file's metadata when the detector was calibrated.

    Raises FileNotFoundError for a missing file, ValueError naming the file when it is not an
    ONNX model, not a knnad export, or its metadata was stripped or edited.
    """

    def __init__(self, path: PathLike, providers: Optional[Sequence[Any]] = None,
                 session_options: Any = None):
        ort = import_onnxruntime()
        self.path = Path(path)
        if self.path.is_dir():
            raise IsADirectoryError(f"{self.path} is a folder; name the .onnx file written by "
                                    f"knnad export")
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX file {self.path} does not exist")
        try:
            self.session = ort.InferenceSession(
                str(self.path), session_options,
                providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as error:  # onnxruntime raises its own exception types
            advice = ("; a knnad model (.npz) becomes one with `knnad export MODEL --out FILE.onnx`"
                      if self.path.suffix == ".npz" else "")
            raise ValueError(f"{self.path} is not a loadable ONNX model "
                             f"({str(error).strip()[:200]}){advice}") from None
        self.metadata = self._read_metadata()
        geometry = self.metadata["preprocessing"]
        whole_image = geometry["crop_size"] is None
        self.preprocessor = Preprocessor(geometry["image_size"], geometry["crop_size"],
                                         geometry["bit_depth"],
                                         geometry.get("frame") if whole_image else None)
        saved = self.metadata["thresholds"]
        self.thresholds = None if saved is None else Thresholds(**saved)
        self.batch_size = self.metadata["io"]["batch_size"]

    def __repr__(self) -> str:
        bank = self.metadata["bank"]
        return (f"OnnxDetector({str(self.path)!r}: {self.metadata['backbone']}, bank "
                f"{bank['rows']} x {bank['dim']}, k={self.metadata['scoring']['k']}, "
                f"{'calibrated' if self.thresholds else 'not calibrated'})")

    def _read_metadata(self) -> Dict[str, Any]:
        meta = self.session.get_modelmeta()
        raw = dict(meta.custom_metadata_map)
        if METADATA_PREFIX + "format" not in raw:
            raise ValueError(f"{self.path} is not a knnad export (no knnad metadata); export it "
                             f"with knnad.Detector.export_onnx or `knnad export`")
        found = raw[METADATA_PREFIX + "format"]
        if found not in (json.dumps(FORMAT), json.dumps(WHOLE_IMAGE_FORMAT)):
            raise ValueError(f"{self.path} is a {found} export; this knnad reads {FORMAT!r} and "
                             f"{WHOLE_IMAGE_FORMAT!r}: upgrade knnad")
        digest = (meta.graph_description or "").removeprefix(DIGEST_PREFIX)
        if metadata_digest(raw) != digest:
            raise ValueError(f"{self.path}: its knnad metadata was edited or stripped (the digest "
                             f"in the graph does not match); export the model again")
        try:
            entries = {key: json.loads(raw[METADATA_PREFIX + key]) for key in _REQUIRED}
        except (KeyError, json.JSONDecodeError) as error:
            raise ValueError(f"{self.path}: knnad metadata incomplete or unreadable "
                             f"({error})") from None
        return entries

    @property
    def input_shape(self) -> tuple:
        """``(batch, 3, H, W)``: ``H = W =`` the crop, or the whole-image frame; batch None
        where the file takes any batch size."""
        frame = self.preprocessor.frame
        assert frame is not None  # the crop, or the metadata's whole-image frame
        return (self.batch_size, 3, *frame)

    def predict(self, data: Any, batch_size: int = 8, on_error: str = "raise",
                progress: bool = False, map_size: str = "processed") -> Prediction:
        """Image scores, maps (and labels, masks when calibrated) of ``data``; see the class.
        ``batch_size`` is ignored where the file was exported with a fixed one; ``map_size`` as
        ``Detector``'s (``"original"``: maps at each image's size, whole-image models only)."""
        return Prediction.concatenate(
            list(self.predict_batches(data, batch_size, on_error, progress, map_size)), "predict")

    def predict_batches(self, data: Any, batch_size: int = 8, on_error: str = "raise",
                        progress: bool = False, map_size: str = "processed"
                        ) -> Iterator[Prediction]:
        """:meth:`predict` one batch at a time, so that memory stays flat in the number of
        images."""
        step = check_int(batch_size, "batch_size")
        step = self.batch_size or step
        check_choice(on_error, "on_error", ON_ERROR)
        crop_size = self.preprocessor.crop_size
        if check_choice(map_size, "map_size", MAP_SIZES) == "original" and crop_size is not None:
            raise ValueError(f"map_size='original' needs a whole-image model (fit with "
                             f"crop_size=None): the map of this file's {crop_size} px crop does "
                             f"not cover the image's border; use map_size='processed'")
        for batch in batches(image_items(data, "predict data"), self.preprocessor, step, on_error,
                             progress, "predict"):
            if not len(batch.images):
                yield Prediction.empty(self.input_shape[2:], batch.skipped)
                continue
            images = batch.images
            if hasattr(images, "detach"):
                images = images.detach().cpu().numpy()
            images = np.asarray(images)
            count = len(images)
            if self.batch_size and count < self.batch_size:  # a fixed-size file: pad the last batch
                padding = np.repeat(images[-1:], self.batch_size - count, axis=0)
                images = np.concatenate([images, padding])
            scores, maps = self.run(images)
            maps = maps[:count]
            if map_size == "original":
                maps = self.preprocessor.original_maps(maps, batch.sizes)
            prediction = Prediction(scores[:count], maps, batch.paths, skipped=batch.skipped,
                                    image_sizes=batch.sizes)
            yield prediction if self.thresholds is None else self.thresholds.apply(prediction)

    def run(self, images: np.ndarray) -> tuple:
        """``(image_scores [N], anomaly_maps [N, H, W])`` of a prepared float batch ``images``
        ``[N, 3, H, W]`` (:attr:`input_shape`); a ValueError naming the expected shape
        otherwise."""
        expected = self.input_shape
        array = isinstance(images, np.ndarray)
        if not array or images.ndim != 4 or images.shape[1:] != expected[1:] \
                or (expected[0] is not None and images.shape[0] != expected[0]) or not len(images):
            batch = f" with N = {expected[0]} (the exported batch size)" if expected[0] else ""
            got = f"shape {images.shape}" if array else type(images).__name__
            raise ValueError(f"images must be float32 [N, 3, {expected[2]}, {expected[3]}]{batch}, "
                             f"prepared as knnad's Preprocessor does; got {got}")
        if not np.issubdtype(images.dtype, np.floating):
            raise ValueError(f"images must be floating-point (normalised RGB), got {images.dtype}")
        check_finite(images)
        scores, maps = self.session.run(list(OUTPUTS),
                                        {INPUT: images.astype(np.float32, copy=False)})
        return scores, maps
