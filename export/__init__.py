"""Deployment tooling for keras_bn: verified ONNX export and the `keras-bn` command line.

Depends on keras_bn; keras_bn never imports this package.
"""

from export.converter import ExportReport, VerifyReport, to_onnx, verify
from export.files import load_model_file

__all__ = ["ExportReport", "VerifyReport", "load_model_file", "to_onnx", "verify"]
