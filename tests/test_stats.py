"""keras_bn._stats alone, without a layer: batch moments, the one moving-statistics rule and
normalization, against float64 NumPy and PyTorch's BatchNorm. Runs on every backend
(tests/test_backends.py runs this file under JAX and PyTorch)."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_bn import _stats

torch = pytest.importorskip("torch")

BACKEND = keras.backend.backend()


def np_of(t):
    return np.asarray(ops.convert_to_numpy(t), dtype=np.float64)


def test_moments_match_float64_numpy_where_the_mean_dwarfs_the_spread(rng):
    # mean 1e4, std 0.01: E[x^2] - E[x]^2 in float32 gives 0 (or worse); the shifted two-pass
    # moments keep the variance to about 1e-5 relative (float32 rounding of x itself aside).
    x = (1e4 + 0.01 * rng.standard_normal((64, 5, 3))).astype("float32")
    x64 = x.astype(np.float64).reshape(-1, 3)
    centered, mean, variance, count = _stats.moments(ops.convert_to_tensor(x), [0, 1])
    assert tuple(mean.shape) == (1, 1, 3) and tuple(centered.shape) == x.shape
    np.testing.assert_allclose(np_of(count).ravel(), [320.0] * 3)
    # The float32 mean itself is rounded to float32's spacing at 1e4, 9.8e-4.
    np.testing.assert_allclose(np_of(mean).ravel(), x64.mean(0), rtol=0, atol=9.8e-4)
    np.testing.assert_allclose(np_of(variance).ravel(), x64.var(0), rtol=1e-4)
    naive = float(np.mean(x[..., 0] ** 2) - np.mean(x[..., 0]) ** 2)
    assert abs(naive - x64.var(0)[0]) >= 0.5 * x64.var(0)[0]  # the formula the shift avoids
    pivot, shifted_mean, variance2, _ = _stats.moments(ops.convert_to_tensor(x), [0, 1], shift=True)
    np.testing.assert_allclose(np_of(pivot).ravel(), x[0, 0], rtol=0)
    # In two parts, added in float64, the mean keeps the spread's digits.
    np.testing.assert_allclose(
        np_of(pivot).ravel() + np_of(shifted_mean).ravel(), x64.mean(0), rtol=0, atol=1e-6
    )
    np.testing.assert_array_equal(np_of(variance2), np_of(variance))


def test_masked_moments_leave_masked_values_out(rng):
    x = rng.standard_normal((4, 6, 2)).astype("float32")
    mask = np.ones((4, 6), bool)
    mask[:, 4:] = False
    x[:, 4:] = 1e6  # padding far from the data: must not enter the statistics
    _, mean, variance, count = _stats.moments(
        ops.convert_to_tensor(x), [0, 1], mask=ops.convert_to_tensor(mask)
    )
    kept = x[:, :4].astype(np.float64).reshape(-1, 2)
    np.testing.assert_allclose(np_of(count).ravel(), [16.0, 16.0])
    np.testing.assert_allclose(np_of(mean).ravel(), kept.mean(0), atol=1e-6)
    np.testing.assert_allclose(np_of(variance).ravel(), kept.var(0), rtol=1e-5)
    # An all-masked batch: count 0, mean and variance 0, no NaN.
    _, mean0, var0, count0 = _stats.moments(
        ops.convert_to_tensor(x), [0, 1], mask=ops.convert_to_tensor(np.zeros((4, 6), bool))
    )
    assert np_of(count0).sum() == 0 and not np.any(np_of(mean0)) and not np.any(np_of(var0))


def torch_running_stats(batches, momentum, eps=1e-5):
    """PyTorch's running_mean/running_var after training on `batches` (each (n, C))."""
    bn = torch.nn.BatchNorm1d(batches[0].shape[1], momentum=momentum, eps=eps, dtype=torch.float64)
    bn.train()
    for b in batches:
        bn(torch.from_numpy(b))
    return bn.running_mean.numpy(), bn.running_var.numpy()


def update_with_stats(old, batch, count, **kwargs):
    """One `_stats.moving_update` from a batch's biased float64 statistics."""
    mean = ops.convert_to_tensor(batch.mean(0, keepdims=True).astype("float32"))
    variance = ops.convert_to_tensor(batch.var(0, keepdims=True).astype("float32"))
    old_mean, old_variance = (ops.convert_to_tensor(v.astype("float32")) for v in old)
    return _stats.moving_update(old_mean, old_variance, mean, variance, count, **kwargs)


@pytest.mark.parametrize("static", [True, False])
def test_moving_update_matches_pytorch_running_stats(rng, static):
    # PyTorch momentum 0.1 (weight of the NEW value) is Keras momentum 0.9; running_var is
    # unbiased. `count` as a Python int (no mask) and as a per-channel tensor (masks, all-reduce).
    batches = [rng.normal(3.0, 2.0, (8, 4)) for _ in range(3)]
    old = (np.zeros(4), np.ones(4))
    for b in batches:
        count = 8 if static else ops.convert_to_tensor(np.full((1, 4), 8.0, "float32"))
        update = update_with_stats(old, b, count, momentum=0.9, unbiased=True)
        old = (np_of(update.mean), np_of(update.variance))
    want_mean, want_var = torch_running_stats(batches, momentum=0.1)
    np.testing.assert_allclose(old[0], want_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(old[1], want_var, rtol=1e-6)


def test_cumulative_average_matches_pytorch_momentum_none(rng):
    batches = [rng.normal(-1.0, 0.5, (n, 3)) for n in (5, 9, 2)]
    old = (np.zeros(3), np.ones(3))
    for k, b in enumerate(batches):
        tracked = ops.convert_to_tensor(k, dtype="int64")
        update = update_with_stats(
            old, b, len(b), momentum=None, unbiased=True, batches_tracked=tracked
        )
        old = (np_of(update.mean), np_of(update.variance))
    want_mean, want_var = torch_running_stats(batches, momentum=None)
    np.testing.assert_allclose(old[0], want_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(old[1], want_var, rtol=1e-6)


def test_biased_keras_rule_by_hand():
    # momentum 0.99 (Keras): 0.99 * old + 0.01 * batch, variance biased.
    batch = np.array([[1.0, 10.0], [3.0, 14.0]])  # means 2, 12; biased variances 1, 4
    update = update_with_stats((np.array([0.5, 1.0]), np.array([2.0, 3.0])), batch, 2,
                               momentum=0.99, unbiased=False)  # fmt: skip
    np.testing.assert_allclose(np_of(update.mean), [0.515, 1.11], rtol=1e-6)
    np.testing.assert_allclose(np_of(update.variance), [1.99, 3.01], rtol=1e-6)
    assert update.skipped is False or not bool(np_of(update.skipped))


def test_skip_rules_per_row_and_the_row_average():
    # Two rows (two devices' slices): row 0 is finite, row 1 holds NaN and keeps the old value;
    # the result is the rows' average, as tf.distribute averages per-replica updates.
    old_mean, old_var = np.array([1.0, 1.0]), np.array([2.0, 2.0])
    mean = np.array([[3.0, 5.0], [np.nan, 0.0]], "float32")
    variance = np.array([[4.0, 6.0], [1.0, 1.0]], "float32")
    count = ops.convert_to_tensor(np.full((2, 1), 4.0, "float32"))
    update = _stats.moving_update(
        *(ops.convert_to_tensor(v.astype("float32")) for v in (old_mean, old_var)),
        ops.convert_to_tensor(mean), ops.convert_to_tensor(variance), count,
        momentum=0.5, unbiased=False,
    )  # fmt: skip
    np.testing.assert_array_equal(np_of(update.updated), [1.0, 0.0])
    np.testing.assert_allclose(np_of(update.mean), [(2.0 + 1.0) / 2, (3.0 + 1.0) / 2])
    np.testing.assert_allclose(np_of(update.variance), [(3.0 + 2.0) / 2, (4.0 + 2.0) / 2])
    assert bool(np_of(update.skipped))
    # One value per channel: nothing to learn, a skip; an empty batch: no update, no skip.
    for counts, skipped in (([[1.0]], True), ([[0.0]], False)):
        update = _stats.moving_update(
            *(ops.convert_to_tensor(v[:1].astype("float32")) for v in (old_mean, old_var)),
            ops.convert_to_tensor(np.zeros((1, 1), "float32")),
            ops.convert_to_tensor(np.zeros((1, 1), "float32")),
            ops.convert_to_tensor(np.array(counts, "float32")),
            momentum=0.5, unbiased=True,
        )  # fmt: skip
        np.testing.assert_allclose(np_of(update.mean), [1.0])
        np.testing.assert_allclose(np_of(update.variance), [2.0])
        assert bool(np_of(update.skipped)) is skipped


def test_normalize_centres_before_it_scales():
    # mean 1e4, variance 1e-4, epsilon 1e-6: x * s + (beta - mean * s) cancels two numbers of
    # 1e6; (x - mean) * s does not. The value by hand: (x - mean) / sqrt(1.01e-4) * 2 + 0.5.
    x = np.array([[10000.0, 10000.015625]], "float32")
    args = [np.array([[v]], "float32") for v in (10000.0, 1e-4, 2.0, 0.5)]
    y = np_of(_stats.normalize(*(ops.convert_to_tensor(a) for a in (x, *args)), 1e-6))
    want = (x.astype(np.float64) - 1e4) / np.sqrt(1.01e-4) * 2.0 + 0.5
    np.testing.assert_allclose(y, want, rtol=1e-6)
    s = 2.0 / np.sqrt(np.float32(1.01e-4))
    cancelled = x * np.float32(s) + np.float32(0.5 - 1e4 * s)
    assert np.max(np.abs(cancelled - want)) > 1e-3  # what the other form would give
