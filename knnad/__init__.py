"""knnad: industrial visual anomaly detection by exact nearest-neighbour search.

Normal (defect-free) images are turned into patch features by a hooked ImageNet CNN and kept
in an exact FAISS flat L2 index; a test patch's anomaly score is the mean Euclidean distance to
its K nearest normal patches.
"""
import importlib
import logging

from . import (anomaly_map, archive, backbones, datasets, embedding, index, options, persistence,
               preprocessing, runtime, sampling, scoring, sources, thresholds)
from ._version import __version__
from .archive import ModelFileError
from .backbones import FeatureExtractor
from .detector import Detector, Prediction
from .index import FlatL2Index
from .preprocessing import ImageLoadError, Preprocessor
from .runtime import backend_info
from .sampling import coreset, covering_radius
from .thresholds import Thresholds

logging.getLogger(__name__).addHandler(logging.NullHandler())

#: Modules loaded on first use: they pull in scikit-learn and matplotlib, which fitting and
#: predicting do not need.
_LAZY_MODULES = ("metrics", "plots", "evaluation", "report")


def __getattr__(name: str):
    if name in _LAZY_MODULES:
        return importlib.import_module(f".{name}", __name__)
    if name == "evaluate":
        return importlib.import_module(".evaluation", __name__).evaluate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["anomaly_map", "archive", "backbones", "datasets", "embedding", "evaluation", "index",
           "metrics", "options", "persistence", "plots", "preprocessing", "report", "runtime",
           "sampling", "scoring", "sources", "thresholds", "evaluate", "Detector",
           "FeatureExtractor", "FlatL2Index", "ImageLoadError", "ModelFileError", "Prediction",
           "Preprocessor", "Thresholds", "backend_info", "coreset", "covering_radius",
           "__version__"]
