"""The former path of :mod:`knnad.deploy.onnx_detector`, kept for existing imports: the same
objects, and like it free of torch and faiss."""
from .deploy.onnx_detector import (
    DIGEST_PREFIX,
    FORMAT,
    INPUT,
    METADATA_PREFIX,
    OUTPUTS,
    WHOLE_IMAGE_FORMAT,
    OnnxDetector,
    import_onnxruntime,
    metadata_digest,
)

__all__ = ["DIGEST_PREFIX", "FORMAT", "INPUT", "METADATA_PREFIX", "OUTPUTS", "WHOLE_IMAGE_FORMAT",
           "OnnxDetector", "import_onnxruntime", "metadata_digest"]
