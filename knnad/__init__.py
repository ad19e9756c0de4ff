"""knnad: industrial visual anomaly detection by exact nearest-neighbour search.

Normal (defect-free) images are turned into patch features by a hooked ImageNet CNN and kept
in an exact FAISS flat L2 index; a test patch's anomaly score is the mean Euclidean distance to
its K nearest normal patches.
"""
import importlib
import logging

__version__ = "0.1.0"

from . import (anomaly_map, backbones, datasets, embedding, index, preprocessing,  # noqa: E402
               runtime, sampling)
from .backbones import FeatureExtractor  # noqa: E402
from .detector import Detector, Prediction  # noqa: E402
from .index import FlatL2Index  # noqa: E402
from .preprocessing import ImageLoadError, Preprocessor  # noqa: E402
from .runtime import backend_info  # noqa: E402
from .sampling import coreset, covering_radius  # noqa: E402
from ._io import ModelFileError  # noqa: E402

logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name: str):
    """``knnad.metrics``, ``knnad.plots``, ``knnad.evaluation`` and ``knnad.evaluate`` on first
    use: they pull in scikit-learn and matplotlib (0.8 s of ``import knnad``'s 2.8 s here),
    which fitting and predicting do not need."""
    if name in ("metrics", "plots", "evaluation"):
        return importlib.import_module(f".{name}", __name__)
    if name == "evaluate":
        return importlib.import_module(".evaluation", __name__).evaluate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["anomaly_map", "backbones", "datasets", "embedding", "evaluation", "index", "metrics",
           "plots", "preprocessing", "runtime", "sampling", "evaluate", "Detector", "FeatureExtractor",
           "FlatL2Index", "ImageLoadError", "ModelFileError", "Prediction", "Preprocessor",
           "backend_info", "coreset", "covering_radius", "__version__"]
