"""Deployment tooling for keras_bn: verified ONNX export and the `keras-bn` command line.

Depends on keras_bn; keras_bn never imports this package. Attributes load lazily, so the command
line answers usage errors without importing TensorFlow, and a missing `[onnx]` extra is one line
naming its `pip install` command (`keras_bn.MissingExtraError`), not a `ModuleNotFoundError`.
"""

__all__ = [
    "ExportReport",
    "LiteRTReport",
    "QuantizationReport",
    "VerifyReport",
    "VerifyRow",
    "load_model_file",
    "to_litert",
    "to_onnx",
    "verify",
]


def __getattr__(name):
    if name in ("to_litert", "LiteRTReport"):
        from keras_bn import _environment

        _environment.require_extra("litert", f"keras_bn.export.{name}")
        from . import litert

        return getattr(litert, name)
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
        from keras_bn import _environment

        _environment.require_extra("onnx", f"keras_bn.export.{name}")
        from . import converter

        return getattr(converter, name)
    raise AttributeError(f"module 'keras_bn.export' has no attribute {name!r}")
