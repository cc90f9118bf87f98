"""Deployment tooling for keras_bn: verified ONNX export and the `keras-bn` command line.

Depends on keras_bn; keras_bn never imports this package. Attributes load lazily, so the command
line answers usage errors without importing TensorFlow.
"""

__all__ = [
    "ExportReport",
    "QuantizationReport",
    "VerifyReport",
    "VerifyRow",
    "load_model_file",
    "to_onnx",
    "verify",
]


def __getattr__(name):
    if name == "load_model_file":
        from .files import load_model_file

        return load_model_file
    if name in (
        "ExportReport",
        "QuantizationReport",
        "VerifyReport",
        "VerifyRow",
        "to_onnx",
        "verify",
    ):
        from . import converter

        return getattr(converter, name)
    raise AttributeError(f"module 'keras_bn.export' has no attribute {name!r}")
