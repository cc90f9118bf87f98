"""keras_bn: BatchNorm for Keras 3 with explicit conventions, exact folding and verified export."""

import sys as _sys

from keras_bn import _environment
from keras_bn.errors import KerasBNError

if _environment.running_the_command_line():  # before TensorFlow's import writes its C++ log
    from keras_bn import _console

    _console.filter_stderr(_sys.argv[1:])

# Before Keras is imported: an unknown or missing backend fails inside Keras's own import.
try:
    _environment.check_keras_backend()
except KerasBNError as _error:
    if not _environment.running_the_command_line():
        raise
    print(f"keras-bn: error: {_error}", file=_sys.stderr)
    raise SystemExit(2) from None

from keras_bn.affine import ChannelAffine
from keras_bn.callbacks import SkippedUpdatesCallback
from keras_bn.conventions import keras_momentum_to_torch, torch_momentum_to_keras
from keras_bn.diagnosis import DiagnosisReport, diagnose
from keras_bn.errors import MissingExtraError, SkippedUpdateWarning, VerificationError
from keras_bn.fold import FoldReport, fold_bn
from keras_bn.interop import InteropReport, from_torch_state_dict, to_torch_state_dict
from keras_bn.layer import BatchNorm
from keras_bn.recalibration import RecalibrationReport, recalibrate

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "ChannelAffine",
    "FoldReport",
    "fold_bn",
    "from_torch_state_dict",
    "to_torch_state_dict",
    "InteropReport",
    "KerasBNError",
    "MissingExtraError",
    "SkippedUpdateWarning",
    "SkippedUpdatesCallback",
    "VerificationError",
    "RecalibrationReport",
    "recalibrate",
    "DiagnosisReport",
    "diagnose",
    "keras_momentum_to_torch",
    "torch_momentum_to_keras",
]
