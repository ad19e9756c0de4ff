"""knnad: industrial visual anomaly detection by exact nearest-neighbour search.

Normal (defect-free) images are turned into patch features by a hooked ImageNet CNN and kept
in an exact FAISS flat L2 index; a test patch's anomaly score is the mean Euclidean distance to
its K nearest normal patches.

Names load on first use, so that ``import knnad`` stays light and its torch-free parts
(:class:`~knnad.onnx_detector.OnnxDetector`, preprocessing, thresholds) work where torch and
faiss are not installed.
"""
import logging
from typing import TYPE_CHECKING

from ._lazy import lazy_names
from ._version import __version__  # noqa: F401 (public)

if TYPE_CHECKING:  # what __getattr__ loads on first use, for type checkers and IDEs
    from . import (
        anomaly_map,
        archive,
        backbones,
        datasets,
        deploy,
        distributed,
        embedding,
        evaluation,
        export,
        index,
        metrics,
        onnx_detector,
        options,
        persistence,
        plots,
        prediction,
        preprocessing,
        report,
        runtime,
        sampling,
        scoring,
        sources,
        thresholds,
    )
    from .archive import ModelFileError
    from .backbones import FeatureExtractor
    from .deploy.onnx_detector import OnnxDetector
    from .detector import Detector
    from .evaluation import evaluate
    from .index import FlatL2Index
    from .prediction import Prediction
    from .preprocessing import ImageLoadError, Preprocessor
    from .runtime import backend_info
    from .sampling import coreset, covering_radius
    from .thresholds import Thresholds

logging.getLogger(__name__).addHandler(logging.NullHandler())

#: Public modules and subpackages (``export`` and ``onnx_detector``: the former paths of
#: ``deploy.export`` and ``deploy.onnx_detector``); the TYPE_CHECKING imports above name them
#: and _NAMES again (tests/test_typing.py checks that they agree).
_MODULES = ("anomaly_map", "archive", "backbones", "datasets", "deploy", "distributed",
            "embedding", "evaluation", "export", "index", "metrics", "onnx_detector", "options",
            "persistence", "plots", "prediction", "preprocessing", "report", "runtime", "sampling",
            "scoring", "sources", "thresholds")
#: Public names and the modules that define them.
_NAMES = {"Detector": "detector", "FeatureExtractor": "backbones", "FlatL2Index": "index",
          "ImageLoadError": "preprocessing", "ModelFileError": "archive",
          "OnnxDetector": "deploy.onnx_detector", "Prediction": "prediction",
          "Preprocessor": "preprocessing", "Thresholds": "thresholds", "backend_info": "runtime",
          "coreset": "sampling", "covering_radius": "sampling", "evaluate": "evaluation"}


__getattr__, __dir__ = lazy_names(__name__, globals(), _NAMES, _MODULES)

__all__ = sorted(_MODULES + tuple(_NAMES) + ("__version__",))
