"""A fitted detector in one file: its settings, fitted arrays, thresholds and the backbone's
identity (not its weights), in an archive of :mod:`knnad.archive`; and the checks that a loaded
backbone is the one its memory bank was built with.

Only torchvision weights can be rebuilt from a name. A model fit with a local weight file or a
user's ``nn.Module`` is loaded with ``weights=PATH`` or ``backbone=module``; either is checked
against the saved fingerprint, so a different backbone is refused instead of scoring wrongly.
"""
from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ._types import PathLike
from ._version import __version__
from .archive import ModelFileError, read_archive, write_archive
from .backbones import FeatureExtractor
from .embedding import PatchEmbedder, patch_features
from .fusion import NormalScores, Scale, normal_scores
from .index import FlatL2Index
from .options import check, validate
from .thresholds import Thresholds

KIND = "Detector"
_ARRAYS = ("memory_bank", "patch_image_ids", "global_features")
_META_KEYS = ("params", "custom_backbone", "layers", "weights_id", "train_paths", "skipped",
              "image_threshold", "pixel_threshold", "calibration_quantile")
#: 3 (knnad 0.4): several scales (``scales`` in the metadata: each one's layers, normal scores
#: and fusion weight; ``memory_bank_1``, ``patch_image_ids_1``, ... for the scales after the
#: first). Single-scale detectors are still written as version 2, which older knnad reads.
#: 2 (knnad 0.2): thresholds carry the scoring settings they were set with; no ``grid``.
#: Version 1 files (knnad 0.1) are still read.
FORMAT_VERSION = 3
_SINGLE_SCALE_VERSION = 2


def _scale_arrays(number: int) -> Tuple[str, str]:
    """The names of scale ``number``'s memory bank and bank-row image ids in a model file."""
    suffix = f"_{number}" if number else ""
    return f"memory_bank{suffix}", f"patch_image_ids{suffix}"


def write_detector(path: PathLike, settings: Dict[str, Any], extractor: FeatureExtractor,
                   scales: Sequence[Scale], global_features: np.ndarray, train_paths: list,
                   skipped: list, thresholds: Optional[Thresholds], frame: Tuple[int, int]) -> Path:
    """Write a fitted detector atomically; returns the path. ``settings``: its validated
    parameters; ``scales``: its fitted scales (memory banks, image ids, normal scores, weights);
    ``frame``: ``(height, width)`` of the images the model takes (fixed at fit in whole-image
    mode)."""
    arrays = {"global_features": global_features}
    for number, scale in enumerate(scales):
        bank, ids = _scale_arrays(number)
        arrays[bank], arrays[ids] = scale.index.vectors(), scale.image_ids
    params = dict(settings)
    params["backbone"] = extractor.backbone_name
    # Only torchvision weight names can be rebuilt without help; see read_detector().
    weights_id = extractor.weights_id
    rebuilt = not weights_id.startswith(("random:", "sha256:", "module:"))
    params["weights"] = weights_id if rebuilt else None
    meta = {"knnad_version": __version__, "params": params,
            "custom_backbone": isinstance(settings["backbone"], nn.Module),
            "layers": list(extractor.layers), "weights_id": weights_id,
            "train_paths": train_paths, "skipped": skipped,
            "image_threshold": thresholds.image if thresholds else None,
            "pixel_threshold": thresholds.pixel if thresholds else None,
            "calibration_quantile": thresholds.quantile if thresholds else None,
            "calibration_settings": thresholds.scored_with if thresholds else None,
            "frame": list(frame)}
    if len(scales) > 1:
        params["layers"] = [list(layers) for layers in extractor.scales]
        meta["scales"] = [{"layers": list(layers), "normal": asdict(normal), "weight": scale.weight}
                          for layers, scale, normal in
                          zip(extractor.scales, scales, normal_scores(scales))]
    return write_archive(path, KIND, FORMAT_VERSION if len(scales) > 1 else _SINGLE_SCALE_VERSION,
                         meta, arrays)


def read_detector(path: PathLike, names: Sequence[str], backbone: Any = None, weights: Any = None,
                  **overrides: Any) -> Tuple[Dict[str, Any], Dict[str, np.ndarray], Dict[str, Any]]:
    """``(params, arrays, meta)`` of a file written by :func:`write_detector`.

    ``params`` are the detector's constructor arguments: the saved ones, the backbone rebuilt
    from its identity (``backbone``/``weights`` where a name cannot rebuild it), and the
    ``overrides`` that are not None; ``names``: the detector's parameter names (others in the
    file are refused). Raises ModelFileError for a damaged or foreign file and ValueError when
    the backbone cannot be rebuilt or is not the saved one.
    """
    meta, arrays, _ = read_archive(path, KIND, FORMAT_VERSION)
    _check_contents(path, meta, arrays)
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
                         f"weights=PATH to that file (knnad predict: --weights PATH)")
    params["layers"] = ([scale["layers"] for scale in meta["scales"]] if "scales" in meta
                        else meta["layers"])
    given = {name: check(name, value) for name, value in overrides.items() if value is not None}
    params.update(given)  # checked first: an invalid override is the caller's error, not the file's
    unknown = sorted(set(params) - set(names))
    if unknown:
        raise ModelFileError(f"{path} holds settings {unknown} that this knnad does not know; "
                             f"upgrade knnad to load it")
    return params, arrays, meta


def _finite(array: np.ndarray, rows: int = 65536) -> bool:
    """Whether ``array`` holds no NaN or inf, checked by blocks of rows (no full-size mask)."""
    return all(bool(np.isfinite(array[start:start + rows]).all())
               for start in range(0, len(array), rows))


def _check_contents(path: PathLike, meta: Dict[str, Any], arrays: Dict[str, np.ndarray]) -> None:
    """ModelFileError unless the file holds every key and array a detector needs, consistent
    with each other (a file can carry valid checksums and still be crafted or cut short)."""
    missing = sorted(set(_META_KEYS) - set(meta)) + sorted(set(_ARRAYS) - set(arrays))
    if missing:
        raise ModelFileError(f"{path} is not a complete knnad detector: {missing} missing; "
                             f"restore it from a good copy or fit again")
    params, thresholds = meta["params"], [meta[key] for key in _META_KEYS[-3:]]
    typed = (isinstance(params, dict) and isinstance(params.get("backbone"), str)
             and isinstance(meta["weights_id"], str) and isinstance(meta["layers"], list)
             and all(isinstance(meta[key], list) for key in ("train_paths", "skipped"))
             and (all(value is None for value in thresholds)
                  or all(isinstance(value, (int, float)) for value in thresholds)))
    settings = meta.get("calibration_settings")
    typed = typed and (settings is None or (isinstance(settings, dict) and all(
        isinstance(key, str) for key in settings)))
    typed = typed and all(value is None or (not isinstance(value, bool) and math.isfinite(value))
                          for value in thresholds)
    if not typed:
        raise ModelFileError(f"{path} is not a consistent knnad detector: malformed settings; "
                             f"restore it from a good copy or fit again")
    bank, ids, pooled = (arrays[name] for name in _ARRAYS)
    if not (pooled.ndim == 2 and np.issubdtype(pooled.dtype, np.floating) and _finite(pooled)
            and _consistent_bank(bank, ids, len(pooled))):
        raise ModelFileError(f"{path} is not a consistent knnad detector: memory bank "
                             f"{bank.shape} {bank.dtype}, patch image ids {ids.shape}, global "
                             f"features {pooled.shape} {pooled.dtype} (or NaN or inf among them); "
                             f"restore it from a good copy or fit again")


def check_identity(path: PathLike, extractor: FeatureExtractor, scales: Sequence[Scale],
                   frame: Tuple[int, int], meta: Dict[str, Any],
                   arrays: Dict[str, np.ndarray]) -> None:
    """ValueError unless ``extractor`` has the weights the saved banks were built with;
    ModelFileError unless its features have the saved banks' dimensions (one forward pass)."""
    if extractor.weights_id != meta["weights_id"]:
        raise ValueError(f"{path} was fit with backbone weights {meta['weights_id']}, but the "
                         f"given backbone/weights are {extractor.weights_id}; scores would be "
                         f"wrong: pass the ones it was fit with (weights=PATH; knnad predict: "
                         f"--weights PATH) or fit a new model")
    patches, pooled = patch_features(extractor, [scale.embedder for scale in scales],
                                     torch.zeros(1, 3, *frame))
    found = [embedding.shape[-1] for embedding in patches] + [pooled.shape[-1]]
    saved = [scale.index.dim for scale in scales] + [arrays["global_features"].shape[1]]
    if found != saved:
        def dims(values: List[int]) -> str:
            return " + ".join(map(str, values[:-1]))
        raise ModelFileError(f"{path}: its memory bank has {dims(saved)}-d patches and "
                             f"{saved[-1]}-d global features, but its backbone and settings give "
                             f"{dims(found)} and {found[-1]}; the file does not belong to this "
                             f"configuration: restore it from a good copy or fit again")


def saved_scales(path: PathLike, meta: Dict[str, Any], arrays: Dict[str, np.ndarray],
                 embedders: Sequence[PatchEmbedder], placement: Dict[str, Any]) -> List[Scale]:
    """The fitted scales stored in a model file (one per embedder; indexes placed as
    ``placement`` says); a ModelFileError naming the file when a scale's arrays or statistics
    are missing or malformed."""
    described = meta.get("scales") or [{}]
    scales = []
    for number, (embedder, saved) in enumerate(zip(embedders, described)):
        bank, ids = (arrays.get(name) for name in _scale_arrays(number))
        try:
            normal = NormalScores(**saved["normal"]) if len(embedders) > 1 else None
            weight = float(saved.get("weight", 1.0))
            valid = ((normal is None or (normal.spread > 0 and math.isfinite(normal.location)))
                     and 0 <= weight <= 1)
        except (TypeError, KeyError, ValueError):
            valid = False
        if (not valid or len(described) != len(embedders) or bank is None or ids is None
                or not _consistent_bank(bank, ids, len(arrays["global_features"]))):
            raise ModelFileError(f"{path} is not a consistent knnad detector: scale {number} of "
                                 f"{len(embedders)} has no valid memory bank, image ids or normal "
                                 f"scores; restore it from a good copy or fit again")
        scales.append(Scale(embedder, FlatL2Index.of(bank, **placement), ids, normal, weight))
    return scales


def _consistent_bank(bank: np.ndarray, ids: np.ndarray, images: int) -> bool:
    """Whether ``bank`` is a finite float32 ``[R, D]`` matrix and ``ids`` its ``R`` sorted image
    ids below ``images``."""
    return (bank.ndim == 2 and ids.ndim == 1
            and len(ids) == len(bank) > 0 and bank.dtype == np.float32
            and np.issubdtype(ids.dtype, np.integer)
            and bool(np.all(np.diff(ids) >= 0)) and 0 <= ids.min() and ids.max() < images
            and _finite(bank))


def checked_settings(path: PathLike, params: Dict[str, Any]) -> Dict[str, Any]:
    """:func:`~knnad.options.validate` of the parameters of a detector read from ``path``; an
    invalid saved setting is a ModelFileError naming the file."""
    try:
        return validate(params)
    except (ValueError, TypeError) as error:
        raise ModelFileError(f"{path} holds an invalid setting ({error}); fit again and save a new "
                             f"model file") from None


def saved_frame(path: PathLike, settings: Dict[str, Any],
                meta: Dict[str, Any]) -> Optional[Tuple[int, int]]:
    """The whole-image frame ``(height, width)`` a model file fixes (None in crop mode, where
    the crop is the frame; older files, all of crop mode, hold none); a ModelFileError naming
    the file when a whole-image model's frame is missing or malformed."""
    if settings["crop_size"] is not None:
        return None
    frame = meta.get("frame")
    if not (isinstance(frame, list) and len(frame) == 2
            and all(isinstance(side, int) and not isinstance(side, bool) and side >= 1
                    for side in frame)):
        raise ModelFileError(f"{path} is not a consistent knnad detector: a whole-image model "
                             f"(crop_size=None) without a valid frame ({frame!r}); restore it from "
                             f"a good copy or fit again")
    return tuple(frame)


def saved_thresholds(meta: Dict[str, Any]) -> Optional[Thresholds]:
    """The thresholds stored by :func:`write_detector`, or None if it was not calibrated."""
    if meta["image_threshold"] is None:
        return None
    return Thresholds(meta["image_threshold"], meta["pixel_threshold"],
                      meta["calibration_quantile"], meta.get("calibration_settings"))
