"""Named tolerances, in one place."""

LAYER_RTOL = 1e-5  # keras_bn.BatchNorm vs keras.layers.BatchNormalization / NumPy, float32
LAYER_ATOL = 1e-5
FOLD_RTOL = 1e-5  # folded vs original model, relative to the largest output magnitude
ORT_ATOL = 1e-5  # onnxruntime parity
