"""The anomaly detector: learn normal from defect-free images, score images and pixels.

``Detector.fit`` hooks a pretrained backbone, turns each normal image into patch embeddings
and keeps them (optionally a greedy coreset of them) in a :class:`~knnad.index.FlatL2Index`.
``Detector.predict`` scores each test patch by the mean Euclidean distance to its K nearest
normal patches and turns the patch scores into smoothed pixel maps.
"""
from __future__ import annotations

import logging
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from ._checks import check_int
from ._io import PathLike, read_archive, write_archive
from .anomaly_map import anomaly_maps, check_upsampling
from .backbones import FeatureExtractor
from .embedding import PatchEmbedder
from .index import FlatL2Index
from .preprocessing import ImageLoadError, Preprocessor, image_files
from .sampling import coreset as greedy_coreset

logger = logging.getLogger(__name__)

IMAGE_SCORES = ("max", "spade")
_FORMAT_VERSION = 1


@dataclass
class Prediction:
    """What :meth:`Detector.predict` returns, one entry per scored image.

    ``image_scores``: float32 ``[N]``; ``anomaly_maps``: float32 ``[N, H, W]`` (crop size);
    ``paths``: the image paths (None for in-memory images); ``labels`` (bool ``[N]``, True =
    anomalous) and ``masks`` (bool ``[N, H, W]``) once the detector has a threshold;
    ``skipped``: paths that could not be decoded and were skipped (``on_error="skip"``).
    """

    image_scores: np.ndarray
    anomaly_maps: np.ndarray
    paths: List[Optional[str]]
    labels: Optional[np.ndarray] = None
    masks: Optional[np.ndarray] = None
    skipped: List[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.image_scores)


class Detector:
    """Anomaly detector by exact k-nearest-neighbour search on pretrained patch features.

    Parameters
    ----------
    backbone, layers, weights: the feature extractor (see :class:`~knnad.FeatureExtractor`).
    k: number of nearest normal patches whose mean Euclidean distance is a patch's score.
    image_score: ``"max"`` (maximum of the anomaly map) or ``"spade"`` (SPADE: the mean distance
        of the image's global feature to its ``image_k`` nearest training images, and pixel
        maps searched only among those images' patches).
    image_k: number of nearest training images in ``"spade"`` mode (capped at their count).
    coreset: None (keep every patch), a float ratio in (0, 1], or an int count of patches to
        keep by greedy k-center selection.
    backend, device: search backend and device of :class:`~knnad.FlatL2Index` (the backbone
        runs on ``device`` too; ``"auto"`` is the first GPU if there is one).
    rerank: extra candidates whose exact distances are checked per patch (see
        :class:`~knnad.FlatL2Index`); 4 makes the neighbours exact on MVTec bottle at about
        half again the search time, 0 is fastest.
    image_size, crop_size: resize the shorter side, then centre crop (pixels).
    aggregation_size, reduce_dim: patch embedding (see :class:`~knnad.embedding.PatchEmbedder`).
    sigma: Gaussian smoothing of the anomaly maps, in pixels.
    upsampling: patch scores to pixels, ``"bilinear"`` or ``"nearest"`` (anomalib's maps; on
        MVTec bottle pixel AUROC 0.97588 against bilinear's 0.97573).
    batch_size: images per backbone call. progress: tqdm bars.
    on_error: ``"raise"`` (an undecodable image stops fit/predict with its name) or ``"skip"``
        (it is skipped with a warning and listed in ``Prediction.skipped`` / ``skipped_``).
    """

    def __init__(self, backbone: Union[str, nn.Module] = "wide_resnet50_2",
                 layers: Optional[Sequence[str]] = None, weights: Any = "DEFAULT", k: int = 1,
                 image_score: str = "max", image_k: int = 50,
                 coreset: Union[None, float, int] = None, backend: str = "auto",
                 device: Union[str, torch.device] = "auto", rerank: int = 0, image_size: int = 256,
                 crop_size: int = 224, aggregation_size: int = 3, reduce_dim: Optional[int] = None,
                 sigma: float = 4.0, upsampling: str = "bilinear", batch_size: int = 8,
                 progress: bool = True,
                 on_error: str = "raise", seed: int = 0):
        self.backbone = backbone
        self.layers = layers
        self.weights = weights
        self.k = check_int(k, "k")
        if image_score not in IMAGE_SCORES:
            raise ValueError(f"image_score={image_score!r}; choose one of {IMAGE_SCORES}")
        self.image_score = image_score
        self.image_k = check_int(image_k, "image_k")
        if coreset is not None and not (
                (isinstance(coreset, float) and 0 < coreset <= 1)
                or (isinstance(coreset, (int, np.integer)) and not isinstance(coreset, bool) and coreset >= 1)):
            raise ValueError(f"coreset must be None, a ratio in (0, 1] or a positive int count, "
                             f"got {coreset!r}")
        self.coreset = coreset
        self.backend = backend
        self.device = device
        self.rerank = check_int(rerank, "rerank", 0)
        self.preprocessor = Preprocessor(image_size, crop_size)
        self.image_size, self.crop_size = image_size, crop_size
        self.embedder = PatchEmbedder(aggregation_size, reduce_dim)
        self.aggregation_size, self.reduce_dim = aggregation_size, reduce_dim
        if not isinstance(sigma, (int, float)) or sigma < 0:
            raise ValueError(f"sigma must be a number of pixels >= 0, got {sigma!r}")
        self.sigma = float(sigma)
        self.upsampling = check_upsampling(upsampling)
        self.batch_size = check_int(batch_size, "batch_size")
        self.progress = bool(progress)
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error={on_error!r}; choose 'raise' or 'skip'")
        self.on_error = on_error
        self.seed = seed
        self._extractor: Optional[FeatureExtractor] = None

    _PARAMS = ("backbone", "layers", "weights", "k", "image_score", "image_k", "coreset",
               "backend", "device", "rerank", "image_size", "crop_size", "aggregation_size",
               "reduce_dim", "sigma", "upsampling", "batch_size", "progress", "on_error",
               "seed")

    def get_params(self) -> Dict[str, Any]:
        """The constructor arguments, as scikit-learn estimators report them."""
        return {name: getattr(self, name) for name in self._PARAMS}

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.get_params().items() if k in ("backbone", "k", "image_score", "coreset")}
        state = f", fitted on {len(self.train_paths_)} images" if self.is_fitted else ""
        return f"Detector({', '.join(f'{k}={v!r}' for k, v in shown.items())}{state})"

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "index_")

    # ----------------------------------------------------------------------------- inputs
    @property
    def extractor(self) -> FeatureExtractor:
        """The hooked backbone, built on first use."""
        if self._extractor is None:
            self._extractor = FeatureExtractor(self.backbone, self.layers, self.weights, self._torch_device())
        return self._extractor

    def _torch_device(self) -> str:
        if str(self.device) == "cuda:all":
            return "cuda:0"
        return self.device

    @staticmethod
    def _items(data: Any, argument: str) -> Union[List[Any], torch.Tensor]:
        """Images to process: a list of paths / PIL images, or a float tensor batch."""
        if hasattr(data, "samples"):  # a knnad dataset
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

    def _load(self, item: Any) -> Optional[torch.Tensor]:
        try:
            return self.preprocessor(item)
        except ImageLoadError as error:
            if self.on_error == "raise":
                raise
            logger.warning("skipping %s", error)
            return None

    def _batches(self, items: Union[List[Any], torch.Tensor], description: str
                 ) -> Iterator[Tuple[torch.Tensor, List[Optional[str]], List[str]]]:
        """Yield ``(images [B, 3, H, W], paths, skipped paths)``; the next batch is decoded in
        worker threads while the current one runs through the backbone."""
        if isinstance(items, torch.Tensor):
            for start in tqdm(range(0, len(items), self.batch_size), desc=description,
                              disable=not self.progress, unit="batch"):
                batch = items[start:start + self.batch_size]
                yield batch, [None] * len(batch), []
            return
        chunks = [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            pending = deque([[pool.submit(self._load, item) for item in chunks[0]]] if chunks else [])
            bar = tqdm(total=len(items), desc=description, disable=not self.progress, unit="img")
            for position, chunk in enumerate(chunks):
                if position + 1 < len(chunks):
                    pending.append([pool.submit(self._load, item) for item in chunks[position + 1]])
                loaded = [future.result() for future in pending.popleft()]
                paths = [str(item) if not isinstance(item, Image.Image) else None for item in chunk]
                kept = [i for i, tensor in enumerate(loaded) if tensor is not None]
                skipped = [paths[i] for i in range(len(chunk)) if loaded[i] is None]
                bar.update(len(chunk))
                if kept:
                    yield torch.stack([loaded[i] for i in kept]), [paths[i] for i in kept], skipped
                elif skipped:
                    yield torch.empty(0, 3, self.crop_size, self.crop_size), [], skipped
            bar.close()

    def _embed(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Patch embeddings ``[B, h, w, D]`` and global features ``[B, G]`` (on the CPU)."""
        features = self.extractor(images)
        return self.embedder(features).cpu(), self.extractor.global_features(features).cpu()

    # ----------------------------------------------------------------------------- fit
    def fit(self, data: Any) -> "Detector":
        """Learn normal appearance from defect-free images; returns ``self``.

        ``data``: a knnad dataset (its samples' paths), a folder of images, a list of paths or
        PIL images (any size and mode), or a float tensor batch ``[N, 3, H, W]`` of normalised
        images.
        """
        defective = [s.path for s in getattr(data, "samples", []) if s.label != 0]
        if defective:
            raise ValueError(f"fit data holds {len(defective)} defect images (e.g. {defective[0]}); "
                             f"fit learns from normal images only: use split='train' or the "
                             f"normal folder")
        items = self._items(data, "fit data")
        if len(items) == 0:
            raise ValueError(f"fit needs at least one normal image; {data!r} holds none")
        patches, global_features, paths, skipped = [], [], [], []
        for images, batch_paths, batch_skipped in self._batches(items, "fit: features"):
            skipped += batch_skipped
            if len(images):
                embedding, pooled = self._embed(images)
                patches.append(embedding)
                global_features.append(pooled)
                paths += batch_paths
        if not patches:
            raise ValueError(f"fit: none of the {len(items)} images could be read (skipped: {skipped})")
        embeddings = torch.cat(patches)
        n_images, height, width, dim = embeddings.shape
        bank = embeddings.reshape(-1, dim).numpy()
        image_ids = np.repeat(np.arange(n_images, dtype=np.int64), height * width)
        if self.coreset is not None:
            picks = greedy_coreset(bank, **({"ratio": self.coreset} if isinstance(self.coreset, float)
                                            else {"n": min(int(self.coreset), len(bank))}),
                                   seed=self.seed, device=self.extractor.device, progress=self.progress)
            picks.sort()  # bank rows in image order, as without a coreset
            bank, image_ids = bank[picks], image_ids[picks]
        if self.k > len(bank):
            raise ValueError(f"k={self.k} exceeds the {len(bank)} patches in the memory bank; "
                             f"use a smaller k or a larger coreset")
        self._build_indexes(bank, torch.cat(global_features).numpy())
        self.patch_image_ids_ = image_ids
        self.grid_ = (height, width)
        self.train_paths_ = paths
        self.skipped_ = skipped
        self.image_threshold_: Optional[float] = None
        self.pixel_threshold_: Optional[float] = None
        logger.info("fitted on %d images: memory bank %d x %d (%s on %s)", n_images, len(bank),
                    dim, self.index_.backend, self.index_.device)
        return self

    def _build_indexes(self, bank: np.ndarray, global_features: np.ndarray) -> None:
        """The patch memory bank and the global-feature index, on the configured backend."""
        self.index_ = FlatL2Index(bank.shape[1], backend=self.backend, device=self.device,
                                  rerank=self.rerank)
        self.index_.add(bank)
        self.global_features_ = global_features
        self.global_index_ = FlatL2Index(global_features.shape[1], backend=self.backend,
                                         device=self.device, rerank=self.rerank)
        self.global_index_.add(global_features)

    # ----------------------------------------------------------------------------- predict
    def _check_fitted(self, action: str) -> None:
        if not self.is_fitted:
            raise RuntimeError(f"{action} before fit: call fit(normal_images) or Detector.load(path) first")

    def _patch_scores(self, embedding: torch.Tensor, pooled: torch.Tensor, bank: Optional[np.ndarray]
                      ) -> Tuple[torch.Tensor, Optional[np.ndarray]]:
        """Patch scores ``[B, h, w]`` and, in SPADE mode, image scores ``[B]`` (``bank``: the
        memory bank's vectors, needed in SPADE mode only)."""
        batch, height, width, dim = embedding.shape
        if self.image_score == "max":
            distances, _ = self.index_.search(embedding.reshape(-1, dim), self.k)
            return torch.from_numpy(distances.mean(axis=1)).reshape(batch, height, width), None
        image_k = min(self.image_k, len(self.global_index_))
        image_distances, neighbours = self.global_index_.search(pooled, image_k)
        scores = []
        for image, nearest_images in zip(embedding, neighbours):
            gallery = np.isin(self.patch_image_ids_, nearest_images)
            if gallery.sum() < self.k:
                raise ValueError(f"SPADE: the {image_k} nearest training images keep only "
                                 f"{gallery.sum()} patches (< k={self.k}); raise image_k or coreset")
            subset = FlatL2Index(dim, backend=self.index_.backend, device=self._index_device(),
                                 rerank=self.rerank)
            subset.add(bank[gallery])
            distances, _ = subset.search(image.reshape(-1, dim), self.k)
            scores.append(torch.from_numpy(distances.mean(axis=1)).reshape(height, width))
        return torch.stack(scores), image_distances.mean(axis=1)

    def _index_device(self) -> str:
        return "cpu" if self.index_.device == "cuda:all" else self.index_.device

    def predict(self, data: Any) -> Prediction:
        """Anomaly scores and maps for ``data`` (same kinds as :meth:`fit`).

        Pixel score: mean Euclidean distance of the patch to its ``k`` nearest normal patches,
        upsampled to the crop (``upsampling``, bilinear by default) and smoothed (``sigma``). Image score: maximum of the
        map (``"max"``) or SPADE's global kNN distance (``"spade"``).
        """
        self._check_fitted("predict")
        items = self._items(data, "predict data")
        bank = self.index_.vectors() if self.image_score == "spade" else None
        image_scores, maps, paths, skipped = [], [], [], []
        for images, batch_paths, batch_skipped in self._batches(items, "predict"):
            skipped += batch_skipped
            if not len(images):
                continue
            embedding, pooled = self._embed(images)
            patch_scores, spade_scores = self._patch_scores(embedding, pooled, bank)
            batch_maps = anomaly_maps(patch_scores, tuple(images.shape[-2:]), self.sigma,
                                      self.upsampling)
            maps.append(batch_maps.numpy())
            image_scores.append(spade_scores if spade_scores is not None
                                else batch_maps.amax(dim=(1, 2)).numpy())
            paths += batch_paths
        if not maps:
            raise ValueError(f"predict: none of the {len(items)} images could be read (skipped: {skipped})")
        prediction = Prediction(np.concatenate(image_scores).astype(np.float32),
                                np.concatenate(maps).astype(np.float32), paths, skipped=skipped)
        if self.image_threshold_ is not None:
            prediction.labels = prediction.image_scores > self.image_threshold_
            prediction.masks = prediction.anomaly_maps > self.pixel_threshold_
        return prediction

    def calibrate(self, normal_data: Any, quantile: float = 0.99) -> "Detector":
        """Set deployment thresholds from defect-free images only; returns ``self``.

        ``image_threshold_``: the ``quantile`` of the normal images' scores. ``pixel_threshold_``:
        the same quantile of their anomaly maps' maxima, so that a normal image at that quantile
        has no flagged pixel. Use held-out normal images: training images lie in the memory bank
        and score too low.
        """
        self._check_fitted("calibrate")
        if not 0 < quantile <= 1:
            raise ValueError(f"quantile must be in (0, 1], got {quantile!r}")
        reference = self.predict(normal_data)
        overlap = set(p for p in reference.paths if p) & set(self.train_paths_)
        if overlap:
            logger.warning("calibrate: %d of the images were used in fit; their scores are "
                           "biased low and so is the threshold", len(overlap))
        self.image_threshold_ = float(np.quantile(reference.image_scores, quantile))
        self.pixel_threshold_ = float(np.quantile(reference.anomaly_maps.reshape(len(reference), -1).max(axis=1),
                                                  quantile))
        self.calibration_quantile_ = float(quantile)
        return self

    # ----------------------------------------------------------------------------- storage
    def save(self, path: PathLike) -> Path:
        """Write the fitted detector to one ``.npz`` file, atomically (temporary file, then
        rename). Stores the parameters, memory bank, global features, thresholds and the
        backbone's identity, not its weights. Returns the path written."""
        self._check_fitted("save")
        params = self.get_params()
        custom = isinstance(self.backbone, nn.Module)
        params["backbone"] = self.extractor.backbone_name
        weights_id = self.extractor.weights_id
        # Only torchvision weight names can be rebuilt without help; see load().
        params["weights"] = None if weights_id.startswith(("random:", "sha256:", "module:")) else weights_id
        params["device"] = str(self.device)
        meta = {
            "knnad_version": __version__, "params": params, "custom_backbone": custom,
            "layers": list(self.extractor.layers), "weights_id": weights_id,
            "grid": list(self.grid_), "train_paths": self.train_paths_, "skipped": self.skipped_,
            "image_threshold": self.image_threshold_, "pixel_threshold": self.pixel_threshold_,
            "calibration_quantile": getattr(self, "calibration_quantile_", None),
        }
        arrays = {"memory_bank": self.index_.vectors(), "patch_image_ids": self.patch_image_ids_,
                  "global_features": self.global_features_}
        return write_archive(path, "Detector", _FORMAT_VERSION, meta, arrays)

    @classmethod
    def load(cls, path: PathLike, backbone: Union[None, str, nn.Module] = None, weights: Any = None,
             backend: Optional[str] = None, device: Union[None, str, torch.device] = None,
             progress: Optional[bool] = None) -> "Detector":
        """Read a detector written by :meth:`save`.

        The backbone is rebuilt from its saved identity: torchvision weights by name (from the
        local cache or a download). Pass ``weights=PATH`` when it was fit with a local weight
        file and ``backbone=module`` when it was fit with your own ``nn.Module``; both are
        checked against the saved fingerprint. ``backend``, ``device`` and ``progress``
        override the saved settings. Raises ModelFileError for a damaged or foreign file and
        ValueError for a backbone other than the saved one.
        """
        meta, arrays, _ = read_archive(path, "Detector", _FORMAT_VERSION)
        params = dict(meta["params"])
        saved_name, weights_id = params["backbone"], meta["weights_id"]
        if meta["custom_backbone"]:
            if not isinstance(backbone, nn.Module):
                raise ValueError(f"{path} was fit with a custom backbone ({saved_name}); pass "
                                 f"backbone=<that nn.Module> to Detector.load")
            params["backbone"] = backbone
        elif backbone is not None and backbone != saved_name:
            shown = backbone if isinstance(backbone, str) else type(backbone).__name__
            raise ValueError(f"{path} was fit with backbone {saved_name!r}, not {shown!r}; load "
                             f"it without backbone= or fit a new detector")
        if weights is not None:
            params["weights"] = weights
        elif weights_id.startswith("random:"):
            params["weights"] = None
        elif weights_id.startswith("sha256:"):
            raise ValueError(f"{path} was fit with weights from a local file ({weights_id}); pass "
                             f"weights=PATH to that file")
        params["layers"] = meta["layers"]
        for name, value in (("backend", backend), ("device", device), ("progress", progress)):
            if value is not None:
                params[name] = value
        detector = cls(**params)
        if detector.extractor.weights_id != weights_id:
            raise ValueError(f"{path} was fit with backbone weights {weights_id}, but the given "
                             f"backbone/weights are {detector.extractor.weights_id}; scores would "
                             f"be wrong")
        detector._build_indexes(arrays["memory_bank"], arrays["global_features"])
        detector.patch_image_ids_ = arrays["patch_image_ids"]
        detector.grid_ = tuple(meta["grid"])
        detector.train_paths_ = meta["train_paths"]
        detector.skipped_ = meta["skipped"]
        detector.image_threshold_ = meta["image_threshold"]
        detector.pixel_threshold_ = meta["pixel_threshold"]
        if meta["calibration_quantile"] is not None:
            detector.calibration_quantile_ = meta["calibration_quantile"]
        return detector
