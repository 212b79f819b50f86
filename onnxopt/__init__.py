"""onnxopt: an ONNX model-rewriting compiler whose every rewrite is verified."""

from onnxopt.api import OptimizeOptions, inspect, optimize, validate
from onnxopt.errors import BadInputError, CheckFailedError, OnnxoptError

__version__ = "0.1.0"
__all__ = ["optimize", "inspect", "validate", "OptimizeOptions", "OnnxoptError",
           "BadInputError", "CheckFailedError", "__version__"]
