"""The former path of :mod:`knnad.deploy.export`, kept for existing imports: the same objects.

The module's settings, such as ``TILE_ROWS``, are read where they are defined: change them in
:mod:`knnad.deploy.export`, not here.
"""
from .deploy.export import MIN_OPSET, TILE_ROWS, export_onnx, import_onnx

__all__ = ["MIN_OPSET", "TILE_ROWS", "export_onnx", "import_onnx"]
