"""The anomaly detector, a short composition of knnad's parts (docs/architecture.md): ``fit`` builds
features, coreset and index; ``predict`` scores, maps and labels."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
from sklearn.exceptions import NotFittedError

from ._types import PathLike
from .backbones import FeatureExtractor
from .embedding import embed_images
from .export import MIN_OPSET, export_onnx
from .fusion import Scale
from .index import FlatL2Index
from .options import Parameters, check_unchanged, describe, scoring_settings, validate
from .persistence import (
    check_identity,
    checked_settings,
    read_detector,
    saved_frame,
    saved_scales,
    saved_thresholds,
    write_detector,
)
from .prediction import Prediction
from .preprocessing import Preprocessor
from .runtime import backbone_device, cpu_threads, one_thread_lanes
from .scales import (
    check_scales,
    fit_scales,
    index_placement,
    pool_seed,
    scale_embedders,
    score_images,
)
from .scoring import image_row_ranges
from .selection import held_out_numbers
from .sources import Batch, batches, image_items
from .thresholds import Thresholds, check_quantile

logger = logging.getLogger(__name__)


class Detector(Parameters):
    """Anomaly detector by exact k-nearest-neighbour search on pretrained patch features.

    A scikit-learn ``BaseEstimator``: ``__init__`` only stores; ``fit`` checks every parameter
    and builds the parts as fitted attributes (``preprocessor_``, ``extractor_``, ``scales_``
    (each scale's embedder, index and, with several, normal scores and fusion weight),
    ``config_`` ...); ``get_params``, ``set_params`` (checked) and ``sklearn.base.clone`` (an
    unfitted copy) work, ``sklearn.utils.validation.check_is_fitted`` tells a fitted detector,
    and predict, calibrate, save and export_onnx before fit raise
    ``sklearn.exceptions.NotFittedError`` (a ValueError and an AttributeError).
    A parameter marked * builds the fitted parts: changed after fit, predict, calibrate and save
    refuse until the next fit. The others may change between predicts and are saved as set."""

    # The fitted attributes (set by fit and load).
    config_: Dict[str, Any]
    preprocessor_: Preprocessor
    extractor_: FeatureExtractor
    scales_: List[Scale]
    global_index_: FlatL2Index
    global_features_: np.ndarray
    image_rows_: np.ndarray
    train_paths_: List[Optional[str]]
    skipped_: List[Optional[str]]
    thresholds_: Optional[Thresholds]

    def __init__(self, backbone="wide_resnet50_2", layers=None, fusion="refine", weights="DEFAULT",
                 k=1, image_score="max", image_k=50, reweight_k=9, coreset=0.1, augment=None,
                 backend="auto", device="auto", rerank=0, image_size=256, crop_size=224,
                 bit_depth=None, aggregation_size=3, reduce_dim=None, sigma=4.0,
                 upsampling="bilinear", map_size="processed", batch_size=8, progress=True,
                 on_error="raise", seed=0):
        self.backbone, self.layers, self.fusion = backbone, layers, fusion
        self.weights, self.k = weights, k
        self.image_score, self.image_k, self.reweight_k = image_score, image_k, reweight_k
        self.coreset, self.augment, self.map_size = coreset, augment, map_size
        self.backend, self.device, self.rerank = backend, device, rerank
        self.image_size, self.crop_size, self.bit_depth = image_size, crop_size, bit_depth
        self.aggregation_size, self.reduce_dim, self.sigma = aggregation_size, reduce_dim, sigma
        self.upsampling = upsampling
        self.batch_size, self.progress = batch_size, progress
        self.on_error, self.seed = on_error, seed

    @property
    def is_fitted(self) -> bool:
        """Whether the detector holds a fitted or loaded model (not after a failed fit)."""
        return hasattr(self, "scales_")

    def __sklearn_is_fitted__(self) -> bool:
        """:attr:`is_fitted`, for ``check_is_fitted`` (some fitted attributes are properties,
        and a failed fit leaves others behind)."""
        return self.is_fitted

    index_ = property(lambda self: self.scales_[0].index, doc="The first (coarsest) scale's index.")
    embedder_ = property(lambda self: self.scales_[0].embedder,
                         doc="The first scale's patch embedder.")

    def fit(self, data: Any) -> "Detector":
        """Learn normal appearance from defect-free ``data``: a knnad dataset, a folder, a list
        of paths or PIL images (any size and mode), or a float tensor ``[N, 3, H, W]`` of
        normalised images. Every parameter is checked before any image is read. Returns self."""
        config = validate(self.get_params())
        items = image_items(data, "fit data", normal_only=True)
        if len(items) == 0:
            raise ValueError(f"fit needs at least one normal image; {data!r} holds none")
        self._build_parts(config)
        images = batches(items, self.preprocessor_, config["batch_size"], config["on_error"],
                         config["progress"], "fit: features")
        embedders = scale_embedders(self.extractor_, config)
        keep = held_out_numbers(len(items)) if len(embedders) > 1 else ()
        found = embed_images(images, self.extractor_, embedders, config["augment"], keep,
                             self._lanes(len(items), config["batch_size"]),
                             pool_seed(config))
        scales = fit_scales(found, embedders, self.extractor_, config)
        self._set_bank(config, scales, found.global_features)
        whole_image = config["crop_size"] is None  # the frame of fit's images is then fixed
        self.preprocessor_.frame = found.frame if whole_image else None
        self.train_paths_, self.skipped_, self.thresholds_ = found.paths, found.skipped, None
        banks = " + ".join(f"{len(scale.index)} x {scale.index.dim}" for scale in scales)
        logger.info("fitted on %d images: memory bank %s (%s on %s)", len(found.paths), banks,
                    self.index_.backend, self.index_.device)
        return self

    def predict(self, data: Any) -> Prediction:
        """Anomaly scores and maps for ``data`` (same kinds as :meth:`fit`). Pixel score: mean
        Euclidean distance of the patch to its ``k`` nearest normal patches, upsampled to the crop
        or whole frame (``upsampling``), smoothed (``sigma``), sized per ``map_size``; with
        several scales (the default), each scale's map in units of its normal scores (1 = their
        99.9th percentile) and fused (``fusion``). Image score per ``image_score``."""
        return Prediction.concatenate(list(self.predict_batches(data)), "predict")

    def predict_batches(self, data: Any) -> Iterator[Prediction]:
        """:meth:`predict` one batch at a time, each as soon as it is scored, so that memory stays
        flat in the number of images (a batch whose images were all skipped gives a Prediction
        of no image that lists them)."""
        settings = self._settings("predict")
        usable = self.thresholds_ is not None and self.thresholds_.usable(settings)
        thresholds = self.thresholds_ if usable else None
        for prediction in self._scores(data, settings):
            if settings["map_size"] == "original":
                prediction.anomaly_maps = self.preprocessor_.original_maps(
                    prediction.anomaly_maps, prediction.image_sizes)
            yield prediction if thresholds is None else thresholds.apply(prediction)

    def _scores(self, data: Any, settings: Dict[str, Any]) -> Iterator[Prediction]:
        items = image_items(data, "predict data")
        scored = batches(items, self.preprocessor_, settings["batch_size"], settings["on_error"],
                         settings["progress"], "predict")
        yield from one_thread_lanes(lambda batch: self._score_batch(batch, settings), scored,
                                    self._lanes(len(items), settings["batch_size"]))

    def _lanes(self, images: int, batch_size: int) -> int:
        """How many batches of ``images`` to run at once, each on one thread: on a CPU, with
        several batches, as many as torch has threads (faster than one batch at a time on all of
        them, see :func:`~knnad.runtime.one_thread_lanes`); else 1."""
        if self.extractor_.device.type != "cpu" or images <= batch_size:
            return 1
        return cpu_threads()[0]

    def _score_batch(self, batch: Batch, settings: Dict[str, Any]) -> Prediction:
        if not len(batch.images):
            return Prediction.empty(batch.images.shape[-2:], batch.skipped)
        scores, maps = score_images(self.extractor_, self.scales_, settings,
                                    (self.global_index_, self.image_rows_), batch.images)
        return Prediction(scores, maps.numpy(), batch.paths, skipped=batch.skipped,
                          image_sizes=batch.sizes)

    def calibrate(self, normal_data: Any, quantile: float = 0.99) -> "Detector":
        """Set deployment thresholds (``thresholds_``) from defect-free images only: the
        ``quantile`` of their image scores and of their maps' maxima (see
        :class:`~knnad.thresholds.Thresholds`). Use held-out normal images: training images lie
        in the memory bank and score too low. Returns ``self``."""
        check_quantile(quantile)
        settings = self._settings("calibrate")
        reference = Prediction.concatenate(list(self._scores(normal_data, settings)), "calibrate")
        overlap = set(p for p in reference.paths if p) & set(self.train_paths_)
        if overlap:
            logger.warning("calibrate: %d of the images were used in fit; their scores are "
                           "biased low and so is the threshold", len(overlap))
        self.thresholds_ = Thresholds.from_normal(reference.image_scores, reference.anomaly_maps,
                                                  quantile, scoring_settings(settings))
        return self

    def save(self, path: PathLike) -> Path:
        """Write the fitted detector to one ``.npz`` file, atomically (temporary file, then
        rename): its settings, memory bank, global features, thresholds and the backbone's
        identity, not its weights. Returns the path written."""
        return write_detector(path, self._settings("save"), self.extractor_,
                                          self.scales_, self.global_features_, self.train_paths_,
                                          self.skipped_, self.thresholds_, self._frame)

    def export_onnx(self, path: PathLike, *, batch_size: Optional[int] = None,
                    opset: int = MIN_OPSET) -> Path:
        """Write the fitted detector to one self-contained ONNX file (see :mod:`knnad.export`):
        float32 images ``[N, 3, H, W]`` (crop or whole-image frame) in, ``image_scores`` and
        ``anomaly_maps`` out, thresholds in its metadata; ``batch_size`` None: any. Load it with
        ``knnad.OnnxDetector``."""
        return export_onnx(path, self._settings("export"), self.extractor_, self.scales_,
                           self.thresholds_, self._frame, batch_size=batch_size, opset=opset)

    @classmethod
    def load(cls, path: PathLike, backbone: Any = None, weights: Any = None,
             backend: Optional[str] = None, device: Any = None,
             progress: Optional[bool] = None) -> "Detector":
        """Read a detector written by :meth:`save` (see :mod:`~knnad.persistence`):
        ``backbone=module`` or ``weights=PATH`` where the saved identity cannot be rebuilt from
        a name; ``backend``, ``device`` and ``progress`` override the saved settings. Raises
        ModelFileError for a damaged or foreign file and ValueError for another backbone."""
        params, arrays, meta = read_detector(
            path, cls._get_param_names(), backbone, weights, backend=backend, device=device,
            progress=progress)
        detector = cls(**params)
        config = checked_settings(path, detector.get_params())
        detector._build_parts(config)
        detector.preprocessor_.frame = saved_frame(path, config, meta)
        embedders = scale_embedders(detector.extractor_, config)
        scales = saved_scales(path, meta, arrays, embedders, index_placement(config))
        check_identity(path, detector.extractor_, scales, detector._frame, meta, arrays)
        detector._set_bank(config, scales, arrays["global_features"])
        detector.train_paths_, detector.skipped_ = meta["train_paths"], meta["skipped"]
        detector.thresholds_ = saved_thresholds(meta)
        return detector

    _frame = property(lambda self: self.preprocessor_.frame, doc="The model's frame (height, "
                      "width): the crop, or the whole-image frame that fit and load fix.")

    def _build_parts(self, config: Dict[str, Any]) -> None:
        """The feature parts for ``config``, after removing the previous hooks and index: a
        failed (re)fit leaves nothing that predict or save would accept."""
        for stale in ("scales_", "global_index_"):
            self.__dict__.pop(stale, None)
        if hasattr(self, "extractor_"):
            self.extractor_.close()
        self.config_ = config
        self.preprocessor_ = Preprocessor(config["image_size"], config["crop_size"],
                                          config["bit_depth"])
        self.extractor_ = FeatureExtractor(config["backbone"], config["layers"], config["weights"],
                                           backbone_device(config["device"]))

    def _set_bank(self, config: Dict[str, Any], scales: List[Scale],
                  global_features: np.ndarray) -> None:
        """The scales and the global-feature index (one row per training image)."""
        self.global_index_ = FlatL2Index.of(global_features, **index_placement(config))
        self.scales_, self.global_features_ = scales, global_features
        self.image_rows_ = image_row_ranges(scales[0].image_ids, len(global_features))

    def _settings(self, action: str) -> Dict[str, Any]:
        """The checked parameters for ``action`` on the fitted model; refuses when a parameter
        that shapes the memory bank changed since fit, or ``k`` exceeds the bank; raises
        NotFittedError before fit."""
        if not self.is_fitted:
            raise NotFittedError(f"{action} before fit: call fit(normal_images) or "
                                 f"Detector.load(path) first")
        settings = check_unchanged(validate(self.get_params()), self.config_, action)
        return check_scales(settings, self.scales_)


Detector.__doc__ = (Detector.__doc__ or "") + describe(Detector)
