"""knnad: industrial visual anomaly detection by exact nearest-neighbour search.

Normal (defect-free) images are turned into patch features by a hooked ImageNet CNN and kept
in an exact FAISS flat L2 index; a test patch's anomaly score is the mean Euclidean distance to
its K nearest normal patches.
"""
import logging

__version__ = "0.1.0"

from . import backbones, preprocessing, runtime  # noqa: E402
from .backbones import FeatureExtractor  # noqa: E402
from .preprocessing import Preprocessor  # noqa: E402
from .runtime import backend_info  # noqa: E402

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["FeatureExtractor", "Preprocessor", "backend_info", "backbones", "preprocessing",
           "runtime", "__version__"]
