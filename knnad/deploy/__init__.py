"""A fitted detector deployed without torch or faiss (optional extra ``knnad[export]``).

* :mod:`knnad.deploy.export` writes a fitted detector as one self-contained ONNX file
  (:meth:`knnad.Detector.export_onnx`, ``knnad export``); it needs torch, onnx and onnxscript.
* :mod:`knnad.deploy.onnx_detector` scores with such a file through ONNX Runtime:
  :class:`~knnad.deploy.onnx_detector.OnnxDetector`, with numpy, Pillow and onnxruntime only.

Importing this package imports neither torch nor faiss (it leaves :mod:`knnad.deploy.export`
to be imported by its users), so that ``from knnad.deploy import OnnxDetector`` works where they
are not installed. The former paths ``knnad.export`` and ``knnad.onnx_detector`` give the same
objects.
"""
from .onnx_detector import OnnxDetector

__all__ = ["OnnxDetector"]
