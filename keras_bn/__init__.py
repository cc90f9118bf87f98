"""keras_bn: BatchNorm for Keras 3 with explicit conventions, exact folding and verified export."""

from keras_bn.affine import ChannelAffine
from keras_bn.callbacks import SkippedUpdatesWarning
from keras_bn.conventions import keras_momentum_to_torch, torch_momentum_to_keras
from keras_bn.diagnosis import DiagnosisReport, diagnose
from keras_bn.errors import KerasBNError, VerificationError
from keras_bn.fold import FoldReport, fold_bn
from keras_bn.layer import BatchNorm
from keras_bn.recalibration import RecalibrationReport, recalibrate

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "ChannelAffine",
    "FoldReport",
    "fold_bn",
    "KerasBNError",
    "SkippedUpdatesWarning",
    "VerificationError",
    "RecalibrationReport",
    "recalibrate",
    "DiagnosisReport",
    "diagnose",
    "keras_momentum_to_torch",
    "torch_momentum_to_keras",
]
