"""Named tolerances of the tests. Fold and onnxruntime agreement use the library's one table
(`keras_bn.verification.TOLERANCES`), checked here with NumPy's own assert_allclose; the layer's
parity with Keras has its own, since no model-level rule applies to it."""

from keras_bn.verification import TOLERANCES

LAYER_RTOL = 1e-5  # keras_bn.BatchNorm vs keras.layers.BatchNormalization / NumPy, float32
LAYER_ATOL = 1e-5
FOLD_RTOL = TOLERANCES["float32"].rtol  # folded vs original, relative to max|output|
ORT_ATOL = TOLERANCES["float32"].atol  # onnxruntime parity, plus FOLD_RTOL x max|output|
