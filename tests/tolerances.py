"""Named tolerances of the tests, written here, not imported from the library: they are the
bounds the library must meet, so they cannot come from it."""

LAYER_RTOL = 1e-5  # keras_bn.BatchNorm vs keras.layers.BatchNormalization / NumPy, float32
LAYER_ATOL = 1e-5
FOLD_RTOL = 1e-5  # folded vs original, relative to max|output| (float32 reorders sums)
ORT_ATOL = 1e-6  # onnxruntime parity, plus FOLD_RTOL x max|output|
THROUGH_RTOL = 1e-6  # fold through ReLU vs float64 NumPy, relative to max|output|
