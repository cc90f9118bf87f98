"""`ChannelAffine`: y = x * scale + offset per channel, what an unfoldable BatchNorm becomes."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_bn")
class ChannelAffine(keras.layers.Layer):
    """Per-channel `y = x * scale + offset`: one multiply-add, the inference form of a BatchNorm
    that had no neighbour to fold into (`scale = gamma / sqrt(var + eps)`,
    `offset = beta - mean * scale`).

    Args:
        axis: The channel axis (-1 channels_last, 1 channels_first).
        use_scale: False leaves out the multiply: `y = x + offset`, what is left of a BatchNorm
            whose positive scales were folded through a ReLU into the layer before it.

    Call arguments:
        inputs: Tensor; `training` and `mask` are accepted and ignored (the map is the same in
            both modes), so the layer can stand where a BatchNorm was called with them.
    """

    def __init__(self, axis=-1, use_scale=True, **kwargs):
        super().__init__(**kwargs)
        self.axis = axis
        self.use_scale = use_scale
        self.supports_masking = True

    def build(self, input_shape):
        self._axis = self.axis % len(input_shape)
        channels = input_shape[self._axis]
        self.scale = None
        if self.use_scale:
            self.scale = self.add_weight(
                shape=(channels,), name="scale", initializer="ones", autocast=False
            )
        self.offset = self.add_weight(
            shape=(channels,), name="offset", initializer="zeros", autocast=False
        )

    def call(self, inputs, training=None, mask=None):
        shape = [1] * len(inputs.shape)
        shape[self._axis] = -1
        x = ops.cast(inputs, self.offset.dtype)
        if self.scale is not None:
            x = x * ops.reshape(self.scale, shape)
        return ops.cast(x + ops.reshape(self.offset, shape), self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "axis": self.axis, "use_scale": self.use_scale}
