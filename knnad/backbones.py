"""Hooked ImageNet backbones: a batch of images in, the activations of named layers out.

:class:`FeatureExtractor` wraps any torchvision classification model (by name) or a user's
``nn.Module``, registers forward hooks on the requested layers and stops the forward pass as
soon as the last of them has run, so later layers (``layer4``, ``fc``, ...) cost nothing.
"""
from __future__ import annotations

import difflib
import hashlib
import logging
import os
import pickle
import threading
import urllib.error
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torchvision
from torch import nn

from .runtime import resolve_device

logger = logging.getLogger(__name__)

#: Hooked layers of the coarse scale per backbone (the first scale of the default,
#: ``"multiscale"``; alone, ``"coarse"``): mid-level layers at strides 8 and 16, as PatchCore.
PRESET_LAYERS: Dict[str, Tuple[str, ...]] = {
    "wide_resnet50_2": ("layer2", "layer3"),
    "resnet18": ("layer2", "layer3"),
    "mobilenet_v2": ("features.6", "features.13"),
}
#: Hooked layers of the fine scale (``layers="fine"``, and the second scale of
#: ``"multiscale"``): the coarse layers with the last block at stride 4, whose grid (56 x 56 at
#: crop 224) is the scale's patch grid.
FINE_LAYERS: Dict[str, Tuple[str, ...]] = {
    "wide_resnet50_2": ("layer1", "layer2", "layer3"),
    "resnet18": ("layer1", "layer2", "layer3"),
    "mobilenet_v2": ("features.3", "features.6", "features.13"),
}
#: Scales: one tuple of layer names per scale, the coarsest first.
Scales = Tuple[Tuple[str, ...], ...]
#: Named layer presets (``layers="fine"``), per backbone, as scales: ``"multiscale"`` (the
#: default, also ``"default"`` and None): both of the following, each in units of its normal
#: scores, fused (see :mod:`knnad.fusion`); ``"coarse"``: :data:`PRESET_LAYERS` (knnad 0.3's
#: default); ``"fine"``: :data:`FINE_LAYERS` (4x the patches of the coarse scale; ``reduce_dim``
#: can take its channels back).
LAYER_PRESETS: Dict[str, Dict[str, Scales]] = {
    "multiscale": {name: (PRESET_LAYERS[name], FINE_LAYERS[name]) for name in PRESET_LAYERS},
    "coarse": {name: (layers,) for name, layers in PRESET_LAYERS.items()},
    "fine": {name: (layers,) for name, layers in FINE_LAYERS.items()},
}
#: The preset of ``layers=None`` and ``layers="default"`` (``bench_accuracy.py``: with
#: ``fusion="refine"`` above the coarse and the fine scale alone on MVTec bottle and transistor).
DEFAULT_PRESET = "multiscale"


def layer_scales(layers: Any) -> Optional[Scales]:
    """``layers`` as scales, without a backbone; None for None or a preset name (resolved
    against the backbone). A name or a list of names is one scale; a list holding lists, or
    names joined by ``+`` (``["features.6+features.13", "features.3+features.6"]``, as the
    command line gives them), is one scale per item. A TypeError for anything else."""
    if layers is None or (isinstance(layers, str)
                          and (layers in LAYER_PRESETS or layers == "default")):
        return None
    items = ([layers] if isinstance(layers, str)
             else list(layers) if isinstance(layers, (list, tuple)) else None)
    if items is None or not all(isinstance(item, (str, list, tuple)) for item in items) or not all(
            isinstance(name, str) for item in items if not isinstance(item, str) for name in item):
        raise TypeError(f"layers must be None, a preset name, a list of module names or a list of "
                        f"such lists (one per scale), got {layers!r}")
    if any(not isinstance(item, str) or "+" in item for item in items):
        return tuple(tuple(item.split("+")) if isinstance(item, str) else tuple(item)
                     for item in items)
    return (tuple(items),)


#: Images per forward pass on the CPU: with channels-last tensors, small passes stay in cache
#: (measured in benchmarks/bench_truncation.py).
CPU_MICRO_BATCH = 4

#: Seed of the random initialisation for ``weights=None``, so that a saved model built on a
#: random backbone gives the same features when loaded again.
RANDOM_INIT_SEED = 0

WeightsSpec = Union[None, str, os.PathLike, "torchvision.models.WeightsEnum"]


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be found locally nor downloaded."""


class _LastLayerReached(Exception):
    """Raised from a forward hook to stop the forward pass after the last hooked layer."""


def available_backbones() -> list:
    """Names of the torchvision classification models knnad can build by name."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _weights_enum(name: str) -> Any:
    try:
        return torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        return None


def _resolve_named_weights(name: str, weights: Any) -> Any:
    """A torchvision WeightsEnum member for ``weights`` ("DEFAULT", a member name, its full
    name, or a member), or a Path for a local file. Raises ValueError for anything else."""
    enum = _weights_enum(name)
    if isinstance(weights, torchvision.models.WeightsEnum):
        if enum is None or not isinstance(weights, enum):
            raise ValueError(f"weights={weights} do not belong to backbone {name!r}; "
                             f"use one of {_weight_names(enum)}")
        return weights
    if isinstance(weights, str) and enum is not None:
        member = weights.split(".", 1)[1] if weights.startswith(enum.__name__ + ".") else weights
        if member in enum.__members__:
            return enum[member]
    path = Path(weights)
    if path.is_file():
        return path
    raise ValueError(f"weights={str(weights)!r} is neither a weight name of {name!r} "
                     f"({_weight_names(enum)}) nor an existing .pth file")


def _published_weights(name: str, sha256: str) -> Optional[str]:
    """The torchvision weight name (``"MobileNet_V2_Weights.IMAGENET1K_V1"``) of ``name`` whose
    published file has this SHA-256, else None: torchvision names its files
    ``<model>-<leading hex digits of their SHA-256>.pth`` and checks downloads the same way
    (``torch.hub.HASH_REGEX``)."""
    for member in _weights_enum(name) or ():
        published = torch.hub.HASH_REGEX.search(os.path.basename(member.url))
        if published and len(published.group(1)) >= 8 and sha256.startswith(published.group(1)):
            return str(member)
    return None


def _weight_names(enum: Any) -> str:
    if enum is None:
        return "this model has no pretrained weights; use weights=None or a .pth path"
    return ", ".join(["'DEFAULT'"] + [repr(member) for member in enum.__members__])


def _build_pretrained(name: str, weights: Any) -> nn.Module:
    """torchvision's own builder and loader (local cache first, hash check included), with an
    offline or damaged-cache failure turned into one clear WeightsUnavailableError."""
    file_name = os.path.basename(weights.url)
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    try:
        return torchvision.models.get_model(name, weights=weights)
    except (urllib.error.URLError, OSError, RuntimeError, EOFError,
            pickle.UnpicklingError) as error:
        cached = cache / file_name
        hint = (f"the cached file {cached} is damaged: delete it or replace it"
                if cached.exists() else f"put {file_name} (from {weights.url}) into {cache}/")
        raise WeightsUnavailableError(
            f"cannot load pretrained weights {weights} for {name!r}: {error}. Offline, {hint}, "
            f"or pass weights=PATH to a local .pth state dict (--weights PATH on the command "
            f"line; weights=None for a random initialisation)") from None


def _load_state_dict_file(path: Path) -> Dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a bad file
        raise ValueError(f"weights file {path} is not a readable torch state dict: "
                         f"{error}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights file {path} does not hold a state dict of tensors")
    return state


def build_backbone(backbone: Union[str, nn.Module], weights: WeightsSpec = "DEFAULT"
                   ) -> Tuple[nn.Module, str, str]:
    """Build the model and load its weights.

    Returns ``(model, name, weights_id)``: ``name`` is the torchvision name (or the module's
    class name) and ``weights_id`` identifies the weights for save/load: a torchvision weight
    name, ``"sha256:<hex>"`` of a local file, ``"random:seed=0"``, or ``"module:<hash>"``
    (a fingerprint of a user module's parameters).
    """
    if isinstance(backbone, nn.Module):
        if weights not in (None, "DEFAULT"):
            path = Path(weights)
            backbone.load_state_dict(_load_state_dict_file(path))
        return backbone, type(backbone).__name__, "module:" + module_fingerprint(backbone)
    if not isinstance(backbone, str):
        raise TypeError(f"backbone must be a torchvision model name or an nn.Module, got "
                        f"{type(backbone).__name__}")
    known = available_backbones()
    if backbone not in known:
        close = difflib.get_close_matches(backbone, known, n=3)
        raise ValueError(f"unknown backbone {backbone!r}"
                         + (f"; did you mean {close}?" if close else "")
                         + " See knnad.backbones.available_backbones() for all names.")
    if weights is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = torchvision.models.get_model(backbone, weights=None)
        return model, backbone, f"random:seed={RANDOM_INIT_SEED}"
    resolved = _resolve_named_weights(backbone, weights)
    if isinstance(resolved, Path):
        model = torchvision.models.get_model(backbone, weights=None)
        try:
            model.load_state_dict(_load_state_dict_file(resolved))
        except RuntimeError as error:
            raise ValueError(f"weights file {resolved} does not fit backbone {backbone!r}: "
                             f"{str(error).splitlines()[0]}") from None
        sha256 = _file_sha256(resolved)
        return model, backbone, _published_weights(backbone, sha256) or "sha256:" + sha256
    return _build_pretrained(backbone, resolved), backbone, str(resolved)


def module_fingerprint(module: nn.Module) -> str:
    """First 16 hex digits of a SHA-256 over the names, shapes and values of ``module``'s
    parameters and buffers: equal for equal weights, different for any other model."""
    digest = hashlib.sha256()
    for key, tensor in module.state_dict().items():
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                      if tensor.numel() else b"")
    return digest.hexdigest()[:16]


def _layer_choices(model: nn.Module) -> str:
    shallow = [name for name, _ in model.named_modules() if name and name.count(".") <= 1]
    return ", ".join(shallow)


class FeatureExtractor:
    """Activations of named layers of a pretrained CNN, in eval mode and without gradients.

    ``extractor(images)`` with a float tensor ``[B, 3, H, W]`` returns an ordered
    ``dict[layer -> Tensor[B, C, h, w]]`` (float32, on ``device``) in the order of ``layers``.

    Parameters
    ----------
    backbone
        A torchvision classification model name (``"wide_resnet50_2"``, ``"mobilenet_v2"``,
        ``"resnet18"``, any of :func:`available_backbones`) or an ``nn.Module``.
    layers
        Module names as in ``model.named_modules()`` (``"layer2"``, ``"features.6"``): one
        scale; a list of such lists: several scales (:attr:`scales`), hooked once
        (:attr:`layers`, their union in order); ``None`` or ``"default"`` takes the backbone's
        :data:`DEFAULT_PRESET`; a preset name of :data:`LAYER_PRESETS` takes that preset.
    weights
        ``"DEFAULT"`` (torchvision's best ImageNet weights), a weight name such as
        ``"IMAGENET1K_V1"`` or a torchvision weight enum, ``None`` (seeded random init), or a
        path to a local ``.pth`` state dict. Ignored (unless a path) for an ``nn.Module``.
    device
        ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.
    """

    def __init__(self, backbone: Union[str, nn.Module] = "wide_resnet50_2",
                 layers: Optional[Sequence[str]] = None, weights: WeightsSpec = "DEFAULT",
                 device: Union[str, torch.device] = "cpu"):
        self.device = resolve_device(device)
        model, self.backbone_name, self.weights_id = build_backbone(backbone, weights)
        preset = DEFAULT_PRESET if layers in (None, "default") else layers \
            if isinstance(layers, str) and layers in LAYER_PRESETS else None
        if preset is not None:
            if self.backbone_name not in LAYER_PRESETS[preset]:
                named = "" if layers is None or layers == "default" else f" {preset!r}"
                raise ValueError(f"no preset layers{named} for backbone {self.backbone_name!r} "
                                 f"(presets for {sorted(LAYER_PRESETS[preset])}); pass "
                                 f"layers=[...] with module names such as: {_layer_choices(model)}")
            scales: Optional[Scales] = LAYER_PRESETS[preset][self.backbone_name]
        else:
            scales = layer_scales(layers)
        if not scales or not all(scales) or any(len(set(scale)) != len(scale) for scale in scales) \
                or len(set(scales)) != len(scales):
            raise ValueError("layers must be a non-empty list of distinct module names (one "
                             f"scale), or of distinct such lists (several scales), got {layers!r}")
        self.scales: Scales = scales
        self.layers = tuple(dict.fromkeys(name for scale in scales for name in scale))
        modules = dict(model.named_modules())
        unknown = [name for name in self.layers if name not in modules or name == ""]
        if unknown:
            close = {name: difflib.get_close_matches(name, list(modules), n=3) for name in unknown}
            raise ValueError(f"unknown layer(s) {unknown} for backbone {self.backbone_name!r} "
                             f"(close matches: {close}). Valid names include: "
                             f"{_layer_choices(model)} (and every name in model.named_modules())")
        # Channels-last is oneDNN's and cuDNN's fast layout for convolutions.
        self.model = model.eval().requires_grad_(False).to(self.device).to(
            memory_format=torch.channels_last)
        # Per thread (threads may run forward passes at once): the hooked outputs, a dict only
        # while a pass runs, and whether the pass stops after the last hooked layer.
        self._running = threading.local()
        self._hooks = [modules[name].register_forward_hook(self._make_hook(name))
                       for name in self.layers]

    def __repr__(self) -> str:
        return (f"FeatureExtractor(backbone={self.backbone_name!r}, layers={list(self.layers)}, "
                f"weights={self.weights_id!r}, device='{self.device}')")

    def close(self) -> None:
        """Remove the forward hooks from the model (a user's module can then be hooked again
        or used on its own); the extractor cannot be called afterwards."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _make_hook(self, name: str):
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            outputs = getattr(self._running, "outputs", None)
            if outputs is None:  # another extractor sharing this module is running
                return
            outputs[name] = output
            if len(outputs) == len(self.layers) and self._running.stop_early:
                raise _LastLayerReached
        return hook

    def __call__(self, images: Union[torch.Tensor, np.ndarray]) -> Dict[str, torch.Tensor]:
        if not self._hooks:
            raise RuntimeError("this FeatureExtractor was closed; build a new one")
        if isinstance(images, np.ndarray):  # as Preprocessor gives them, stacked
            images = torch.from_numpy(images)
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a tensor or numpy array [B, 3, H, W], got "
                            f"{type(images).__name__}")
        if images.ndim != 4 or images.shape[1] != 3 or len(images) == 0:
            raise ValueError("images must have shape [B, 3, H, W] with B >= 1, got "
                             f"{tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a float tensor (normalised), got {images.dtype}; "
                            f"use knnad.preprocessing.Preprocessor to prepare images")
        step = CPU_MICRO_BATCH if self.device.type == "cpu" else max(1, len(images))
        passes = [self._forward(images[start:start + step])
                  for start in range(0, len(images), step)]
        if len(passes) == 1:
            return passes[0]
        return {name: torch.cat([outputs[name] for outputs in passes]) for name in self.layers}

    def hooked_outputs(self, images: torch.Tensor,
                       stop_early: bool = True) -> Dict[str, torch.Tensor]:
        """The hooked layers' outputs (by layer name, as the layers give them) of one forward
        pass of ``images`` (already on the model's device), stopped after the last hooked layer
        (``stop_early``; else the whole model runs, as tracers need). No checks, no inference
        mode: what :mod:`knnad.export` traces."""
        self._running.outputs, self._running.stop_early = {}, stop_early
        try:
            self.model(images)
        except _LastLayerReached:
            pass
        finally:
            outputs, self._running.outputs = self._running.outputs, None
        return outputs

    def _forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """One forward pass, stopped after the last hooked layer; float32 outputs by layer."""
        with torch.inference_mode():
            outputs = self.hooked_outputs(images.to(self.device, torch.float32)
                                          .contiguous(memory_format=torch.channels_last))
        missing = [name for name in self.layers if name not in outputs]
        if missing:
            raise RuntimeError(f"layers {missing} did not run in the forward pass of "
                               f"{self.backbone_name}; hook modules that are called in forward()")
        for name, output in outputs.items():
            if not isinstance(output, torch.Tensor) or output.ndim != 4:
                raise ValueError(f"layer {name!r} gives {type(output).__name__} "
                                 f"{getattr(output, 'shape', '')}, not a [B, C, h, w] feature "
                                 f"map; choose a convolutional layer")
        return {name: outputs[name].float() for name in self.layers}

    @staticmethod
    def global_features(features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Global average pooling of each layer, concatenated: ``Tensor[B, sum(C)]``
        (SPADE-style image features)."""
        return torch.cat([f.mean(dim=(2, 3)) for f in features.values()], dim=1)
