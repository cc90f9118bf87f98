"""keras_bn.diagnose: each finding on a model built to have it, and a healthy negative case."""

import keras
import numpy as np
import pytest

import keras_bn
from keras_bn.diagnosis import Verdict

L = keras.layers


def small(momentum=0.99, epsilon=1e-3):
    inputs = keras.Input((8, 8, 1))
    x = L.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
    x = L.ReLU()(keras_bn.BatchNorm(momentum=momentum, epsilon=epsilon, name="bn")(x))
    return keras.Model(inputs, L.Dense(3)(L.GlobalAveragePooling2D()(x)))


def test_untrained_statistics_are_stale_with_the_updates_needed():
    report = keras_bn.diagnose(small())
    row = report.rows[0]
    assert row.verdict == Verdict.STALE and row.initial_values
    assert row.updates_to_forget_init == 459  # 0.99**459 < 0.01 <= 0.99**458
    assert 0.99**459 < 0.01 <= 0.99**458
    assert not report.healthy and report.verdict == Verdict.STALE
    assert "lower momentum to 0.9" in row.action and "459 updates" in str(report)


def test_mode_under_fit_and_its_reason():
    inner_in = keras.Input((4,))
    inner = keras.Model(inner_in, L.BatchNormalization(name="inner_bn")(inner_in), name="backbone")
    inner.trainable = False
    inputs = keras.Input((4,))
    x = inner(inputs)
    x = L.BatchNormalization(name="called_inference")(x, training=False)
    frozen = L.BatchNormalization(name="frozen")
    frozen.trainable = False
    x = frozen(x)
    x = L.BatchNormalization(name="free")(x)
    rows = {r.name: r for r in keras_bn.diagnose(keras.Model(inputs, x)).rows}
    assert (rows["backbone/inner_bn"].mode_under_fit, rows["backbone/inner_bn"].mode_reason) == (
        "inference",
        "inside frozen model 'backbone'",
    )
    assert rows["called_inference"].mode_reason == "called with training=False"
    assert rows["frozen"].mode_reason == "trainable=False"
    assert rows["free"].mode_under_fit == "training" and rows["free"].mode_reason == ""
    # Layers that do not train are not stale: their 0/1 statistics are what they were given.
    assert rows["frozen"].verdict == Verdict.OK and rows["free"].verdict == Verdict.STALE


def test_large_scale_channels_and_corrupt_statistics():
    model = small(epsilon=1e-8)
    bn = model.get_layer("bn")
    var = np.full(8, 0.5, np.float32)
    var[:3] = 1e-10  # gamma / sqrt(1e-10 + 1e-8) = 9950 > 1e3
    bn.moving_variance.assign(var)
    bn.moving_mean.assign(np.full(8, 0.1, np.float32))
    row = keras_bn.diagnose(model).rows[0]
    assert row.large_scale_channels == 3 and row.verdict == Verdict.OK
    var[4] = np.nan
    bn.moving_variance.assign(var)
    row = keras_bn.diagnose(model).rows[0]
    assert row.verdict == Verdict.CORRUPT and "moving_variance has 1 non-finite" in row.problem


def test_with_data_a_short_run_is_stale_and_recalibration_makes_it_healthy(rng):
    keras.utils.set_random_seed(0)
    model = small()
    x = rng.normal(0.5, 1.0, size=(256, 8, 8, 1)).astype("float32")
    model.compile("sgd", "mse")
    model.fit(x, rng.normal(size=(256, 3)).astype("float32"), batch_size=32, epochs=1, verbose=0)
    before = [w.numpy().copy() for w in model.weights]
    report = keras_bn.diagnose(model, x)
    row = report.rows[0]
    # 8 updates at momentum 0.99: the exponential average still gives its initial 0/1 the
    # weight 0.99**8 = 0.923, and the diagnosis reads that weight back off the statistics.
    assert row.verdict == Verdict.STALE and not row.initial_values
    assert abs(row.initial_weight - 0.99**8) < 0.01 and row.updates_seen == 8
    assert "still weighs 92%" in str(report) and "needs 459" in str(report)
    assert row.drift > 0.5 or row.variance_ratio > 2.0
    assert report.output_error > 0.01
    for w, b in zip(model.weights, before):  # nothing changed
        np.testing.assert_array_equal(np.asarray(w), b)
    fixed, _ = keras_bn.recalibrate(model, x, verbose=0)
    healthy = keras_bn.diagnose(fixed, x)
    assert healthy.healthy and healthy.rows[0].drift < 1e-5
    assert healthy.output_error < 1e-5 and (healthy.rows[0].initial_weight or 0.0) < 1e-5
    # Statistics that converged on other data (shifted by 1) are drifted, not stale.
    shifted, _ = keras_bn.recalibrate(model, x + 1.0, verbose=0)
    row = keras_bn.diagnose(shifted, x).rows[0]
    assert row.verdict == Verdict.DRIFTED and row.initial_weight is None


def test_model_without_batchnorm_is_refused():
    inputs = keras.Input((3,))
    with pytest.raises(keras_bn.KerasBNError, match="The model has no BatchNorm to diagnose"):
        keras_bn.diagnose(keras.Model(inputs, L.Dense(2)(inputs)))


def tagger_block():
    """Conv(relu, 'same') -> BN -> MaxPool, as a trained VGG-style tagger has it: some channels
    dead (their ReLU never fired: moving variance 1.2e-36) and some gammas negative."""
    inputs = keras.Input((8, 8, 1))
    x = L.Conv2D(16, 3, padding="same", activation="relu", name="conv")(inputs)
    x = L.MaxPooling2D(name="pool")(L.BatchNormalization(name="bn")(x))
    model = keras.Model(inputs, L.Dense(3, name="head")(L.Flatten()(x)))
    bn = model.get_layer("bn")
    variance = np.full(16, 0.7, np.float32)
    variance[:6] = 1.2e-36
    gamma = np.full(16, 1.1, np.float32)
    gamma[10:14] = -0.4
    bn.moving_variance.assign(variance)
    bn.moving_mean.assign(np.full(16, 0.3, np.float32))
    bn.gamma.assign(gamma)
    return model


def test_dead_channels_and_negative_gammas_are_named_with_what_they_cost():
    report = keras_bn.diagnose(tagger_block())
    row = report.rows[0]
    assert (row.dead_channels, row.nonpositive_gammas) == (6, 4)
    assert row.verdict == Verdict.DEAD and not report.healthy
    assert "6 dead channel(s)" in str(report) and "4 channel(s) with gamma <= 0" in str(report)
    assert "prune them" in row.action
    # The negative case: the same block with living channels and positive gammas is ok.
    healthy = tagger_block()
    healthy.get_layer("bn").moving_variance.assign(np.full(16, 0.7, np.float32))
    healthy.get_layer("bn").gamma.assign(np.full(16, 1.1, np.float32))
    row = keras_bn.diagnose(healthy).rows[0]
    assert (row.verdict, row.dead_channels, row.nonpositive_gammas) == (Verdict.OK, 0, 0)


def test_folded_weights_that_float16_cannot_hold_are_reported(rng):
    # An input BatchNorm-like layer with running variances up to 2.3e8 (astronomical images):
    # folded, the conv's weights shrink by 1/sqrt(var) below float16's smallest normal number.
    inputs = keras.Input((8, 8, 2))
    x = L.BatchNormalization(name="bn")(L.Conv2D(4, 3, name="conv")(inputs))
    model = keras.Model(inputs, x)
    conv = model.get_layer("conv")
    conv.set_weights([rng.normal(0, 0.05, (3, 3, 2, 4)).astype("float32"), np.zeros(4, "float32")])
    model.get_layer("bn").moving_variance.assign(np.array([2.3e8, 1e8, 1.0, 2.0], "float32"))
    folded_kernel = conv.get_weights()[0] / np.sqrt(np.array([2.3e8, 1e8, 1.0, 2.0]) + 1e-3)
    share = np.mean(np.abs(folded_kernel) < np.finfo(np.float16).tiny)  # about half the weights
    assert 0.4 < share < 0.55
    _, fold_report = keras_bn.fold_bn(model)
    assert "below float16's smallest normal number" in fold_report.rows[0].float16
    assert f"{100 * share:.1f}%" in fold_report.rows[0].float16
    row = keras_bn.diagnose(model).rows[0]
    assert row.verdict == Verdict.FLOAT16 and "keep_float" in row.action
    # Variances of order 1: nothing to report.
    model.get_layer("bn").moving_variance.assign(np.array([0.5, 1.0, 1.5, 2.0], "float32"))
    assert keras_bn.diagnose(model).rows[0].verdict == Verdict.OK


def test_statistics_far_from_the_data_but_not_towards_0_1_are_drifted_not_stale(rng):
    # Means moved towards 0 (as a leftover of the initial value would) but variances moved away
    # from 1: statistics from other data. Over means and variances pooled, the initial values
    # would explain 84% of the squared deviation and be read as a 69% weight: stale.
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras_bn.BatchNorm(name="bn", momentum=0.99)(inputs))
    data = rng.normal(2.6, np.sqrt(0.5), (4096, 4)).astype("float32")
    population_mean, population_var = data.mean(0), data.var(0)
    bn = model.get_layer("bn")
    bn.moving_mean.assign((population_mean - 2.0).astype("float32"))
    bn.moving_variance.assign((population_var - 0.2).astype("float32"))
    moved = np.r_[
        (bn.moving_mean.numpy() - population_mean) / np.sqrt(population_var + 1e-3),
        (bn.moving_variance.numpy() - population_var) / (population_var + 1e-3),
    ]
    initial = np.r_[-population_mean / np.sqrt(population_var + 1e-3),
                    (1 - population_var) / (population_var + 1e-3)]  # fmt: skip
    pooled_cos2 = np.dot(moved, initial) ** 2 / (np.dot(moved, moved) * np.dot(initial, initial))
    assert pooled_cos2 > 0.75  # what the pooled fit saw
    row = keras_bn.diagnose(model, data, batch_size=256).rows[0]
    assert row.initial_weight is None and row.verdict == Verdict.DRIFTED


def test_same_named_batchnorms_in_two_nested_models_are_two_rows(rng):
    # Two nested models each hold a BatchNorm named "bn": rows, float16 checks and the data's
    # population statistics are matched by path, so neither takes the other's numbers.
    def block(name):
        x = keras.Input((3,))
        return keras.Model(x, L.BatchNormalization(name="bn")(x), name=name)

    a, b = block("a"), block("b")
    inputs = keras.Input((3,))
    model = keras.Model(inputs, [a(inputs), b(inputs)])
    x = rng.normal(5.0, 2.0, (512, 3)).astype("float32")
    mean, var = x.astype(np.float64).mean(0), x.astype(np.float64).var(0)
    a.get_layer("bn").set_weights([np.ones(3), np.zeros(3), mean, var])  # the data's own
    report = keras_bn.diagnose(model, x, batch_size=512)
    rows = {r.name: r for r in report.rows}
    assert sorted(rows) == ["a/bn", "b/bn"]
    assert rows["a/bn"].drift < 1e-4 and rows["a/bn"].verdict == Verdict.OK
    # b keeps 0/1: its drift is the data's mean in the data's standard deviations (epsilon 1e-3).
    want = float(np.max(np.abs(mean) / np.sqrt(var + 1e-3)))
    assert rows["b/bn"].drift == pytest.approx(want, rel=1e-4)
    assert rows["b/bn"].verdict == Verdict.STALE
