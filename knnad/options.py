"""The detector's options, described once.

:data:`OPTIONS` holds, for every parameter of :class:`knnad.Detector`, its help text, its check
and its reading from command-line text, and whether changing it needs a new fit. The defaults
are the ones in ``Detector.__init__``'s signature. From these two sources come the detector's
validation (:func:`validate`), its docstring's parameter list (:func:`describe`) and every
front end's options (``knnad fit/evaluate/predict``, the example scripts).

:class:`Parameters` is scikit-learn's ``BaseEstimator`` (``get_params``, ``sklearn.base.clone``)
with knnad's checks in ``set_params`` and a one-line ``repr``, for a class whose ``__init__``
only stores its keyword arguments.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional

from sklearn.base import BaseEstimator
from torch import nn

from ._checks import check_bool, check_choice, check_int, check_number
from .anomaly_map import UPSAMPLING, gaussian_kernel_size
from .backbones import DEFAULT_PRESET, LAYER_PRESETS, PRESET_LAYERS, layer_scales
from .embedding import VIEW_SETS, VIEWS, check_aggregation_size, check_augment
from .fusion import FUSIONS
from .preprocessing import MAP_SIZES, check_bit_depth, check_geometry
from .runtime import BACKENDS, check_device
from .sampling import parse_coreset
from .scoring import IMAGE_SCORES
from .sources import ON_ERROR

Check = Callable[[Any, str], Any]


@dataclass(frozen=True)
class Option:
    """One detector parameter: ``help`` (one line), ``check`` (value, name) -> normalised value
    or a ValueError/TypeError naming the parameter, ``parse`` (command-line text -> value),
    ``refit`` (True: the fitted parts are built with it, so a change needs a new fit),
    ``nargs`` (argparse's, for list options) and ``scoring`` (it changes the scores of a fitted
    detector, so thresholds calibrated before a change no longer apply)."""

    help: str
    check: Check
    parse: Callable[[str], Any] = str
    refit: bool = True
    nargs: Optional[str] = None
    scoring: bool = False


def _choice(choices) -> Check:
    return lambda value, name: check_choice(value, name, choices)


def _int(minimum: int) -> Check:
    return lambda value, name: check_int(value, name, minimum)


def _optional(check: Check) -> Check:
    return lambda value, name: None if value is None else check(value, name)


def _none_or(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """A command-line reader where the word ``none`` means None."""
    return lambda text: None if text.strip().lower() == "none" else parse(text)


def _backbone(value: Any, name: str) -> Any:
    if isinstance(value, (str, nn.Module)):
        return value
    raise TypeError(f"{name} must be a torchvision model name or an nn.Module, got "
                    f"{type(value).__name__}")


def _layers(value: Any, name: str) -> Any:
    """None, a preset name of :data:`LAYER_PRESETS` (alone, or the one item of a list), a tuple
    of module names (one scale) or a tuple of such tuples (several scales, see
    :func:`~knnad.backbones.layer_scales`)."""
    if isinstance(value, (list, tuple)) and len(value) == 1 and value[0] in LAYER_PRESETS:
        value = value[0]
    try:
        scales = layer_scales(value)
    except TypeError:
        scales = ()
    if scales is None:
        return value
    if not scales or not all(scales) or not all(name_ for scale in scales for name_ in scale):
        raise ValueError(f"{name} must be None, a preset ({', '.join(map(repr, LAYER_PRESETS))}) "
                         f"or a non-empty list of module names (one scale; several scales: a list "
                         f"of such lists, or names joined by '+'), got {value!r}")
    return scales[0] if len(scales) == 1 else scales


def _weights(value: Any, name: str) -> Any:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


OPTIONS: Dict[str, Option] = {
    "backbone": Option(f"torchvision model name (presets: {', '.join(PRESET_LAYERS)}) or your "
                       f"own nn.Module", _backbone),
    "layers": Option("module names to hook, e.g. layer2 layer3 (one scale); several scales, "
                     "each its layers joined by '+', e.g. features.6+features.13 "
                     "features.3+features.6; or a preset of the backbone: 'multiscale' (the "
                     "default, also 'default' and none: the two below as two scales, each in "
                     "units of its scores on held-out normal images, fused as fusion says), "
                     "'coarse' (mobilenet_v2 features.6 features.13, resnets layer2 layer3; "
                     "knnad 0.3's default), 'fine' (coarse plus the stride-4 block, a 4x larger "
                     "patch grid)", _layers, nargs="+"),
    "fusion": Option("with several scales: how their maps, each in units of its normal scores, "
                     "become one: 'refine' (the default: the coarser map cut to the finer map's "
                     "outline where the finer scale sees a defect, else the larger), 'max' (a "
                     "defect any scale sees is kept), 'mean', or 'auto' (weights chosen at fit "
                     "by synthetic defects in held-out normal images; measured not to pick the "
                     "real defects' best weights on MVTec bottle and transistor)",
                     _choice(FUSIONS)),
    "weights": Option("'DEFAULT', a torchvision weight name such as IMAGENET1K_V1, none "
                      "(seeded random initialisation) or a .pth state-dict path", _weights,
                      parse=_none_or(str)),
    "k": Option("nearest normal patches whose mean Euclidean distance is a patch's score (a "
                "model of several scales keeps its fit's k)",
                _int(1), parse=int, refit=False, scoring=True),
    "image_score": Option("'max': the maximum of the anomaly map; 'spade': the mean distance of "
                          "the image's global feature to its image_k nearest training images, "
                          "with its patches searched among those images' patches only; "
                          "'reweighted': PatchCore's maximum patch score weighted by how "
                          "isolated its nearest normal patch is (reweight_k)",
                          _choice(IMAGE_SCORES), refit=False, scoring=True),
    "image_k": Option("nearest training images in 'spade' mode (capped at their number)",
                      _int(1), parse=int, refit=False, scoring=True),
    "reweight_k": Option("'reweighted' mode: nearest bank patches of the maximum patch's nearest "
                         "normal patch that the weight's softmax runs over (PatchCore's b; "
                         "capped at the bank size)", _int(1), parse=int, refit=False, scoring=True),
    "coreset": Option("patches kept by greedy k-center selection: none (all), a share in (0, 1] "
                      "such as 0.1, or a count >= 1 such as 10000", parse_coreset,
                      parse=parse_coreset),
    "backend": Option("search backend: 'faiss', 'torch' (torch.cdist + topk, the reference) or "
                      "'auto' (faiss where it can serve the device)", _choice(BACKENDS)),
    "device": Option("'auto' (the first GPU if any), 'cpu', 'cuda', 'cuda:N', or 'cuda:all' "
                     "(faiss index sharded over every GPU)", check_device),
    "rerank": Option("extra candidates per patch whose exact distances are checked (0: fastest)",
                     _int(0), parse=int),
    "image_size": Option("side the shorter image side is resized to, pixels", _int(1), parse=int),
    "crop_size": Option("side of the centre crop, pixels (at most image_size); none: whole-image "
                        "mode, no crop: the whole image, its shorter side resized to image_size "
                        "and its aspect ratio kept, is scored (one aspect ratio per model)",
                        _optional(_int(1)), parse=_none_or(int)),
    "bit_depth": Option("bits per sample of 16-bit and float images, e.g. 12 for 12-bit data in "
                        "16-bit files (none: 16 for integer images, float images as they are)",
                        check_bit_depth,
                        parse=_none_or(int)),
    "aggregation_size": Option("side of the window patch features are averaged over (odd)",
                               check_aggregation_size, parse=int),
    "reduce_dim": Option("reduce patch features to this many channels by adaptive average "
                         "pooling (none: keep them all)", _optional(_int(1)), parse=_none_or(int)),
    "sigma": Option("standard deviation of the Gaussian smoothing of the maps, pixels (0: none)",
                    lambda value, name: check_number(value, name, 0.0, " of pixels"), parse=float,
                    refit=False, scoring=True),
    "upsampling": Option("patch scores to pixels: 'bilinear', or 'nearest' (anomalib's maps)",
                         _choice(UPSAMPLING), refit=False, scoring=True),
    "map_size": Option("size of the maps predict returns: 'processed' (the crop, or the whole "
                       "resized image), or 'original' (each image's own size, its map lying over "
                       "it pixel for pixel; needs crop_size=none)", _choice(MAP_SIZES),
                       refit=False),
    "augment": Option("memory-bank augmentation, for parts that appear rotated or flipped: each "
                      "training image also enters the bank as these views of it: none; views ("
                      + ", ".join(VIEWS) + "), or sets ("
                      + "; ".join(f"{key}: {'+'.join(views)}" for key, views in VIEW_SETS.items())
                      + "), joined by '+' (e.g. hflip+rot180); fit, bank and search grow with "
                        "the number of views", check_augment, parse=_none_or(str)),
    "batch_size": Option("images per backbone call", _int(1), parse=int, refit=False),
    "progress": Option("show tqdm progress bars", check_bool, refit=False),
    "on_error": Option("an image that cannot be decoded: 'raise' stops with its name, 'skip' "
                       "skips it with a warning and lists it", _choice(ON_ERROR), refit=False),
    "seed": Option("seed of the coreset's first pick and random projection", _int(0), parse=int),
}

#: The parameters the fitted parts are built with: changing one after fit needs a new fit.
REFIT = tuple(name for name, option in OPTIONS.items() if option.refit)
#: The predict-time parameters that change the scores (and so what thresholds mean).
SCORING = tuple(name for name, option in OPTIONS.items() if option.scoring)


def check(name: str, value: Any) -> Any:
    """``value`` of parameter ``name``, normalised (e.g. a list of layers as a tuple), or a
    ValueError/TypeError naming it."""
    return OPTIONS[name].check(value, name)


def validate(params: Mapping[str, Any]) -> Dict[str, Any]:
    """Every parameter checked and normalised, and the checks between parameters
    (``crop_size <= image_size``, ``map_size="original"`` only without a crop); raises
    ValueError or TypeError naming the parameter."""
    checked = {name: check(name, value) for name, value in params.items()}
    check_geometry(checked["image_size"], checked["crop_size"])
    if checked["image_score"] != "max" and _several_scales(checked["layers"]):
        raise ValueError(f"image_score={checked['image_score']!r} scores one scale, and layers="
                         f"{checked['layers']!r} fuses several; set layers='coarse' (or another "
                         f"single scale), or image_score='max'")
    if checked.get("map_size") == "original" and checked["crop_size"] is not None:
        raise ValueError(f"map_size='original' needs whole-image mode: the map of a crop_size="
                         f"{checked['crop_size']} crop does not cover the image's border; set "
                         f"crop_size=None (and fit again), or map_size='processed'")
    _check_against_sizes(checked)
    return checked


def _several_scales(layers: Any) -> bool:
    """Whether a checked ``layers`` value names several scales (a preset counts as its
    :data:`LAYER_PRESETS` entry, which has the same number of scales for every backbone)."""
    scales = layer_scales(layers)
    if scales is None:
        preset = LAYER_PRESETS[DEFAULT_PRESET if layers in (None, "default") else layers]
        scales = next(iter(preset.values()))
    return len(scales) > 1


def _check_against_sizes(checked: Mapping[str, Any]) -> None:
    """The checks of one parameter against another's size that can be made before fit: ``k``
    against a coreset given as a count (the memory bank holds at most that many patches) and
    ``sigma`` against the maps (``crop_size`` pixels, or a shorter side of ``image_size`` in
    whole-image mode), which its ±4σ window must fit in."""
    k, coreset = checked["k"], checked["coreset"]
    sigma, crop = checked["sigma"], checked["crop_size"]
    if isinstance(coreset, int) and k > coreset:
        raise ValueError(f"k={k} is more than the {coreset} patches that coreset={coreset} keeps "
                         f"in the memory bank; use k <= {coreset} or a larger coreset")
    side, name = (crop, "crop_size") if crop is not None else (checked["image_size"], "image_size")
    if gaussian_kernel_size(sigma) // 2 >= side:
        raise ValueError(f"sigma={sigma:g} is too large for maps of {name}={side} pixels (the "
                         f"Gaussian's ±4 sigma window must fit in them); use sigma < "
                         f"{(side - 0.5) / 4:g} or a larger {name}")


def scoring_settings(settings: Mapping[str, Any]) -> Dict[str, Any]:
    """The :data:`SCORING` entries of ``settings``."""
    return {name: settings[name] for name in SCORING}


def check_unchanged(settings: Dict[str, Any], fitted: Mapping[str, Any], action: str
                    ) -> Dict[str, Any]:
    """``settings`` if every :data:`REFIT` parameter equals its ``fitted`` value (the same
    object for an ``nn.Module``); else a RuntimeError for ``action`` naming the changes."""
    def same(value: Any, before: Any) -> bool:
        return value is before or (not isinstance(value, nn.Module) and value == before)

    changed = [f"{name} from {fitted[name]!r} to {settings[name]!r}" for name in REFIT
               if not same(settings[name], fitted[name])]
    if changed:
        raise RuntimeError(f"{action} refused: {', '.join(changed)} changed since fit, and the "
                           f"fitted model was built with the old values; call fit() again or "
                           f"set them back")
    return settings


def describe(cls: type) -> str:
    """The parameter list of ``cls`` for its docstring: name, default and help of each."""
    lines = ["", "    Parameters (marked * need a new fit when changed)", "    ----------"]
    for name, default in defaults(cls).items():
        mark = "*" if OPTIONS[name].refit else ""
        lines.append(f"    {name}{mark} = {default!r}: {OPTIONS[name].help}.")
    return "\n".join(lines) + "\n"


def defaults(cls: type) -> Dict[str, Any]:
    """``{name: default}`` of the keyword arguments of ``cls.__init__``, in signature order."""
    return {name: parameter.default for name, parameter in
            inspect.signature(cls).parameters.items()}


def _shown(value: Any) -> str:
    return type(value).__name__ if isinstance(value, nn.Module) else repr(value)


class Parameters(BaseEstimator):
    """scikit-learn's ``BaseEstimator`` for a class whose ``__init__`` stores each keyword
    argument under its own name and does nothing else: ``get_params`` (names in alphabetical
    order, as scikit-learn gives them) and ``sklearn.base.clone`` are scikit-learn's;
    ``set_params`` checks first and ``repr`` fits on one line."""

    def set_params(self, **params: Any) -> "Parameters":
        """Set parameters by name, checked first together with the others (``crop_size <=
        image_size``): an unknown name or a bad value raises ValueError (or TypeError) before
        any is changed. Returns ``self``."""
        names = self._get_param_names()
        unknown = sorted(set(params) - set(names))
        if unknown:
            raise ValueError(f"{type(self).__name__} has no parameter(s) {unknown}; valid: {names}")
        validate({**self.get_params(), **params})
        return super().set_params(**params)

    def __repr__(self) -> str:
        """The class name and the parameters that differ from their defaults, in signature
        order, on one line; an ``nn.Module`` shown by its class name."""
        changed = [f"{name}={_shown(value)}" for name, default in defaults(type(self)).items()
                   if not _is_default(value := getattr(self, name), default)]
        return f"{type(self).__name__}({', '.join(changed)})"


def _is_default(value: Any, default: Any) -> bool:
    return value is default or (type(value) is type(default) and value == default)
