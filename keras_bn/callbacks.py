"""`SkippedUpdatesCallback`: tells, from eager code, what a compiled training step could not print.

A `keras_bn.BatchNorm` that meets NaN/Inf batch statistics (or, under XLA, a batch of one) keeps
its moving statistics and counts the skip in `skipped_updates`. Inside `model.fit` the step is a
`tf.function`, often XLA-compiled, where no host op may run (XLA rejects `PrintV2`), so the
warning (`SkippedUpdateWarning`) is raised here, after each epoch, from the counters.

On JAX the counters stay at 0 inside `fit`: Keras's JAX trainer carries only the model's
trainable, non-trainable, optimizer and metric variables through `jax.jit`, and the counter is none
of them on purpose (as a weight it would break `get_weights()` interchange with Keras's layer and
add a variable to .keras files; as a metric it would add a log entry per BatchNorm to every
epoch). The skip itself is made on every backend.
"""

import warnings

import keras

from keras_bn.errors import SkippedUpdateWarning


def _batchnorms(model):
    from keras_bn import _keras_internals as internals
    from keras_bn.layer import BatchNorm

    return [layer for layer in internals.all_layers(model) if isinstance(layer, BatchNorm)]


class SkippedUpdatesCallback(keras.callbacks.Callback):
    """Warns (`SkippedUpdateWarning`, a `RuntimeWarning`) after each epoch in which a `keras_bn.BatchNorm` skipped updates
    of its moving statistics, naming the layers and the counts.

    Example:
        model.fit(x, y, callbacks=[keras_bn.SkippedUpdatesCallback()])
    """

    def __init__(self):
        super().__init__()
        self._seen = {}

    def on_train_begin(self, logs=None):
        self._seen = {id(bn): bn.skipped_updates for bn in _batchnorms(self.model)}

    def on_epoch_end(self, epoch, logs=None):
        news = []
        for bn in _batchnorms(self.model):
            now = bn.skipped_updates
            new = now - self._seen.get(id(bn), 0)
            self._seen[id(bn)] = now
            if new:
                news.append(f"'{bn.name}' {new}")
        if news:
            warnings.warn(
                f"epoch {epoch + 1}: keras_bn.BatchNorm skipped moving-statistics updates on "
                f"batches with NaN/Inf statistics or one value per channel ({', '.join(news)}); "
                "the moving statistics keep their previous values for those batches.",
                SkippedUpdateWarning,
                stacklevel=2,
            )
