"""What keras_bn checks before it imports Keras: the backend Keras is about to load.

Keras picks its backend at import time (`KERAS_BACKEND`, else `backend` in `~/.keras/keras.json`,
else TensorFlow) and fails inside its own import when the name is unknown or the package is not
installed: a traceback, not a message. keras_bn checks the same two things first and says what
to set or install. The `keras-bn` command line, which cannot catch an error raised while its own
package is imported, prints that one line and exits 2 instead.
"""

import importlib.util
import json
import os
import sys

from keras_bn.errors import KerasBNError, MissingExtraError, expected

# Keras 3's backends, and the package each one imports.
BACKEND_PACKAGES = {
    "tensorflow": "tensorflow",
    "jax": "jax",
    "torch": "torch",
    "numpy": "numpy",
    "openvino": "openvino",
}
INSTALL = {
    "tensorflow": 'pip install "keras-bn[tensorflow]"',
    "jax": 'pip install "keras-bn[jax]"',
    "torch": 'pip install "keras-bn[torch]"',
}

# The optional features, the packages each imports (by import name), and the extra that installs
# them (setup.cfg's extras_require).
EXTRAS = {
    "onnx": ("tensorflow", "tf2onnx", "onnx", "onnxruntime"),
    "demo": ("tensorflow", "tf2onnx", "onnx", "onnxruntime", "ai_edge_litert", "sklearn"),
    "litert": ("tensorflow", "ai_edge_litert"),
    "torch": ("torch",),
}


def configured_backend():
    """`(name, where it was set)`, as Keras reads it: the environment, then keras.json."""
    name = os.environ.get("KERAS_BACKEND")
    if name:
        return name, "KERAS_BACKEND"
    base = os.path.expanduser("~")
    base = base if os.access(base, os.W_OK) else "/tmp"  # Keras's own fallback
    home = os.environ.get("KERAS_HOME") or os.path.join(base, ".keras")
    path = os.path.join(home, "keras.json")
    try:
        with open(path) as f:
            name = json.load(f).get("backend")
    except (OSError, ValueError, AttributeError):
        name = None
    return (name, path) if name else ("tensorflow", "the default")


def check_keras_backend():
    """Raises `KerasBNError` when Keras's backend is unknown or its package is missing."""
    name, where = configured_backend()
    if name not in BACKEND_PACKAGES:
        raise KerasBNError(
            expected(
                f"Keras's backend {name!r} (from {where}) is not one of Keras's backends",
                ", ".join(BACKEND_PACKAGES),
                repr(name),
                "Set KERAS_BACKEND to one of them, or unset it for tensorflow.",
            )
        )
    package = BACKEND_PACKAGES[name]
    if importlib.util.find_spec(package) is None:
        raise KerasBNError(
            expected(
                f"Keras's backend {name!r} (from {where}) is not installed",
                f"the {package} package",
                "no such package in this Python",
                f"Install it ({INSTALL.get(name, f'pip install {package}')}), or set "
                "KERAS_BACKEND to an installed backend.",
            )
        )


def running_the_command_line() -> bool:
    """Whether this process is the `keras-bn` command (console script or `python -m`)."""
    return os.path.basename(sys.argv[0]) == "keras-bn" or "keras_bn.export.cli" in getattr(
        sys, "orig_argv", ()
    )


def require_extra(extra: str, feature: str) -> None:
    """Raises `MissingExtraError` (one line, with the `pip install` command) when a package of
    keras-bn's `extra` is not installed, before anything imports it: `feature` would otherwise
    fail with a raw `ModuleNotFoundError` deep in an import."""
    missing = [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtraError(
            expected(
                f"{feature} needs the packages of keras-bn's [{extra}] extra",
                " and ".join(EXTRAS[extra]) + " installed",
                " and ".join(missing) + " missing",
                f'Install them: pip install "keras-bn[{extra}]"',
            )
        )


def interactive_output() -> bool:
    """Whether progress may redraw itself: stdout is a terminal or a notebook. In a pipe, a log
    file or CI, Keras's progress bar would write backspaces and carriage returns."""
    isatty = getattr(sys.stdout, "isatty", None)
    return bool(isatty and isatty()) or "ipykernel" in sys.modules


def progress_verbose(verbose: int) -> int:
    """Keras's `verbose` for a progress bar: 1 (a bar) where output is interactive, else 2 (one
    plain line when done), 0 stays 0."""
    return 1 if verbose and interactive_output() else (2 if verbose else 0)
