"""knnad: industrial visual anomaly detection by exact nearest-neighbour search.

Normal (defect-free) images are turned into patch features by a hooked ImageNet CNN and kept
in an exact FAISS flat L2 index; a test patch's anomaly score is the mean Euclidean distance to
its K nearest normal patches.
"""
import logging

__version__ = "0.1.0"

from . import (anomaly_map, backbones, datasets, embedding, index, metrics, plots,  # noqa: E402
               preprocessing, runtime, sampling)
from .backbones import FeatureExtractor  # noqa: E402
from .detector import Detector, Prediction  # noqa: E402
from .evaluation import evaluate  # noqa: E402
from .index import FlatL2Index  # noqa: E402
from .preprocessing import ImageLoadError, Preprocessor  # noqa: E402
from .runtime import backend_info  # noqa: E402
from .sampling import coreset, covering_radius  # noqa: E402
from ._io import ModelFileError  # noqa: E402

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["anomaly_map", "backbones", "datasets", "embedding", "index", "metrics", "plots",
           "preprocessing", "runtime", "sampling", "evaluate", "Detector", "FeatureExtractor",
           "FlatL2Index", "ImageLoadError", "ModelFileError", "Prediction", "Preprocessor",
           "backend_info", "coreset", "covering_radius", "__version__"]
