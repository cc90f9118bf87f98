import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


class SubclassedWithBatchNorm(keras.Model):
    """Dense then BatchNorm in a subclassed model: no graph that fold_bn, recalibrate or
    diagnose can read."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(3)
        self.bn = keras.layers.BatchNormalization()

    def call(self, x):
        return self.bn(self.dense(x))


@pytest.fixture
def subclassed_model():
    """A built SubclassedWithBatchNorm, inputs of 4 features."""
    model = SubclassedWithBatchNorm()
    model(np.zeros((2, 4), np.float32))
    return model


@pytest.fixture
def mixed_policy():
    """Sets a global dtype policy for one test and restores float32 afterwards."""

    def _set(name):
        keras.config.set_dtype_policy(name)

    yield _set
    keras.config.set_dtype_policy("float32")


def pytest_collection_modifyitems(items):
    """The backend subprocess tests (minutes each) first, so that the two xdist workers start
    them at once and the short tests fill in around them instead of waiting behind them."""
    items.sort(key=lambda item: 0 if item.nodeid.startswith("tests/test_backends.py") else 1)
