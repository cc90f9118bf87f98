"""keras_bn.recalibrate: precise statistics against NumPy over the layers' real inputs.

Runs on every Keras backend (tests/test_backends.py runs it on JAX and PyTorch); the
tf.distribute test is TensorFlow's."""

import gc
import json
import subprocess
import sys
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_bn
from keras_bn import KerasBNError

L = keras.layers
tf_only = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow machinery")


def two_branch_model():
    """Two BatchNorms whose inputs do not depend on another BatchNorm's batch statistics, one
    with PyTorch's unbiased moving variance; Dropout that must not fire."""
    inputs = keras.Input((8, 8, 3), name="image")
    a = L.BatchNormalization(name="bn_a")(L.Conv2D(4, 3, name="conv")(inputs))
    b = keras_bn.BatchNorm(name="bn_b", unbiased_variance=True)(L.Dense(5, name="dense")(inputs))
    a = L.Dropout(0.5)(L.GlobalAveragePooling2D()(a))
    return keras.Model(inputs, L.Concatenate()([a, L.GlobalAveragePooling2D()(b)]))


def activations(model, layer_name, x):
    """The inputs of a BatchNorm, from a sub-model ending at its producer, as (values, channels)
    in float64: the independent reference."""
    sub = keras.Model(model.inputs, model.get_layer(layer_name).output)
    out = sub.predict(x, verbose=0)
    return out.reshape(-1, out.shape[-1]).astype(np.float64)


@pytest.fixture
def data(rng):
    return rng.normal(2.0, 3.0, size=(300, 8, 8, 3)).astype("float32")


def test_population_statistics_equal_numpy_whatever_the_batch_size(data):
    model = two_branch_model()
    conv, dense = activations(model, "conv", data), activations(model, "dense", data)
    results = []
    for batch_size in (7, 32, 256):
        new, report = keras_bn.recalibrate(model, data, batch_size=batch_size, verbose=0)
        a, b = new.get_layer("bn_a"), new.get_layer("bn_b")
        # Means to 1e-6 of the spread (float32 batch sums), variances to 1e-6 relative.
        np.testing.assert_allclose(a.moving_mean.numpy(), conv.mean(0), atol=1e-6 * conv.std())
        np.testing.assert_allclose(a.moving_variance.numpy(), conv.var(0), rtol=1e-6)
        np.testing.assert_allclose(b.moving_mean.numpy(), dense.mean(0), atol=1e-6 * dense.std())
        np.testing.assert_allclose(b.moving_variance.numpy(), dense.var(0, ddof=1), rtol=1e-6)
        assert report.batches == -(-300 // batch_size)
        assert [r.values_per_channel for r in report.rows] == [300 * 36, 300 * 64]
        results.append(a.moving_variance.numpy())
    np.testing.assert_allclose(results[0], results[2], rtol=1e-6)


@pytest.mark.parametrize("epsilon", [1e-3, 1e-8])  # the fused output and the plain one
def test_downstream_batchnorm_sees_batch_normalized_inputs(rng, epsilon):
    # conv1 -> BN1 -> conv2 -> BN2, one batch of all the data: BN2's statistics are those of
    # conv2 over BN1 in training mode (batch statistics), computed here by Keras itself.
    inputs = keras.Input((6, 6, 3))
    x = L.BatchNormalization(name="bn1", epsilon=epsilon)(L.Conv2D(4, 3, name="conv1")(inputs))
    x = L.BatchNormalization(name="bn2")(L.Conv2D(5, 1, name="conv2")(x))
    model = keras.Model(inputs, x)
    model.get_layer("bn1").set_weights([np.full(4, 2.0), np.full(4, 0.5), np.zeros(4), np.ones(4)])
    data = rng.normal(1.0, 2.0, size=(40, 6, 6, 3)).astype("float32")
    new, _ = keras_bn.recalibrate(model, data, batch_size=40, verbose=0)
    reference = keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    conv2 = keras.Model(reference.inputs, reference.get_layer("conv2").output)(data, training=True)
    conv2 = keras.ops.convert_to_numpy(conv2).astype(np.float64).reshape(-1, 5)
    np.testing.assert_allclose(new.get_layer("bn2").moving_mean.numpy(), conv2.mean(0), atol=1e-5)
    np.testing.assert_allclose(
        new.get_layer("bn2").moving_variance.numpy(), conv2.var(0), rtol=1e-5
    )


def update_bn_reference(batches, unbiased):
    """NumPy transcription of torch.optim.swa_utils.update_bn: momentum=None, so the running
    statistics are the cumulative (equal-weight) average of the per-batch mean and variance
    (PyTorch's per-batch running_var is unbiased)."""
    means, variances = [], []
    for values in batches:
        means.append(values.mean(0))
        variances.append(values.var(0, ddof=1 if unbiased else 0))
    return np.mean(means, 0), np.mean(variances, 0)


def test_batch_mean_matches_update_bn(data):
    model = two_branch_model()
    new, report = keras_bn.recalibrate(
        model, data, batch_size=64, estimator="batch_mean", verbose=0
    )
    conv = [activations(model, "conv", data[i : i + 64]) for i in range(0, 300, 64)]
    dense = [activations(model, "dense", data[i : i + 64]) for i in range(0, 300, 64)]
    mean, var = update_bn_reference(conv, unbiased=False)
    np.testing.assert_allclose(
        new.get_layer("bn_a").moving_mean.numpy(), mean, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(new.get_layer("bn_a").moving_variance.numpy(), var, rtol=1e-5)
    mean, var = update_bn_reference(dense, unbiased=True)
    np.testing.assert_allclose(new.get_layer("bn_b").moving_variance.numpy(), var, rtol=1e-5)
    # The last batch has 44 rows: population and batch_mean differ there.
    population, _ = keras_bn.recalibrate(model, data, batch_size=64, verbose=0)
    assert not np.allclose(
        population.get_layer("bn_a").moving_variance.numpy(),
        new.get_layer("bn_a").moving_variance.numpy(),
        rtol=1e-7,
        atol=0,
    )
    assert report.estimator == "batch_mean"


def test_dropout_never_fires_and_the_caller_model_is_unchanged(data):
    model = two_branch_model()
    before = [w.numpy().copy() for w in model.weights]
    first, _ = keras_bn.recalibrate(model, data, verbose=0)
    second, _ = keras_bn.recalibrate(model, data, verbose=0)
    for a, b in zip(first.weights, second.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for w, b in zip(model.weights, before):
        np.testing.assert_array_equal(np.asarray(w), b)
    assert first is not model


def test_trainable_false_is_recalibrated_unless_only_trainable(data):
    model = two_branch_model()
    model.get_layer("bn_a").trainable = False
    new, _ = keras_bn.recalibrate(model, data, verbose=0)
    assert not np.allclose(new.get_layer("bn_a").moving_variance.numpy(), 1.0)
    kept, report = keras_bn.recalibrate(model, data, only_trainable=True, verbose=0)
    np.testing.assert_array_equal(kept.get_layer("bn_a").moving_variance.numpy(), np.ones(4))
    assert report.rows[0].skipped.startswith("trainable=False")


def test_masked_values_are_left_out(rng):
    inputs = keras.Input((6, 3))
    x = L.Masking(mask_value=0.0)(inputs)
    x = L.BatchNormalization(name="bn")(L.Dense(4, name="dense")(x))
    model = keras.Model(inputs, x)
    data = rng.normal(3.0, 1.0, size=(20, 6, 3)).astype("float32")
    data[:, 4:] = 0.0  # padding: masked
    new, _ = keras_bn.recalibrate(model, data, batch_size=6, verbose=0)
    dense = keras.Model(inputs, model.get_layer("dense").output).predict(data, verbose=0)
    kept = dense[:, :4].reshape(-1, 4).astype(np.float64)
    np.testing.assert_allclose(new.get_layer("bn").moving_mean.numpy(), kept.mean(0), rtol=1e-5)
    np.testing.assert_allclose(new.get_layer("bn").moving_variance.numpy(), kept.var(0), rtol=1e-5)


def test_data_forms_sequential_nested_and_mixed_precision(data, mixed_policy):
    model = two_branch_model()
    reference, _ = keras_bn.recalibrate(model, data, batch_size=50, verbose=0)
    expected = reference.get_layer("bn_a").moving_variance.numpy()
    labels = np.zeros(300)
    forms = {
        "(x, y)": (data, labels),
        "dataset": tf.data.Dataset.from_tensor_slices((data, labels)).batch(50),
        "generator": (data[i : i + 50] for i in range(0, 300, 50)),
        "dict": {"image": data},
    }
    for name, form in forms.items():
        new, _ = keras_bn.recalibrate(model, form, batch_size=50, verbose=0)
        np.testing.assert_allclose(
            new.get_layer("bn_a").moving_variance.numpy(), expected, rtol=1e-6, err_msg=name
        )
    # Nested in a classifier, Sequential outside.
    outer = keras.Sequential([keras.Input((8, 8, 3)), model, L.Dense(2)])
    new, report = keras_bn.recalibrate(outer, data, batch_size=50, verbose=0)
    nested_bn = new.layers[0].get_layer("bn_a")
    np.testing.assert_allclose(nested_bn.moving_variance.numpy(), expected, rtol=1e-6)
    # Rows name nested layers by their path, as fold and diagnose reports do.
    inner = model.name
    assert sorted(r.name for r in report.rows) == [f"{inner}/bn_a", f"{inner}/bn_b"]
    # Mixed precision: float16 compute, statistics kept in float32.
    mixed_policy("mixed_float16")
    mixed = two_branch_model()
    mixed.set_weights(model.get_weights())
    new, _ = keras_bn.recalibrate(mixed, data, batch_size=50, verbose=0)
    assert new.get_layer("bn_a").moving_variance.dtype == "float32"
    np.testing.assert_allclose(new.get_layer("bn_a").moving_variance.numpy(), expected, rtol=5e-3)


def test_bad_input_is_refused_and_nothing_changes(data):
    model = two_branch_model()
    before = [w.numpy().copy() for w in model.weights]
    with pytest.raises(
        KerasBNError,
        match=r"Data for input 'image' has the wrong shape\. "
        r"Expected: \(batch, 8, 8, 3\)\. Received: shape \(7, 8, 3\)",
    ):
        keras_bn.recalibrate(model, data[:7, 0], verbose=0)
    with pytest.raises(KerasBNError, match=r"The data gave no batch"):
        keras_bn.recalibrate(model, iter([]), verbose=0)
    with pytest.raises(KerasBNError, match=r"Data for input 'image' is not numeric"):
        keras_bn.recalibrate(model, np.full((4, 8, 8, 3), "a"), verbose=0)
    bad = data.copy()
    bad[3, 0, 0, 0] = np.nan
    with pytest.raises(KerasBNError, match=r"BatchNorm 'bn_a' got statistics that are not finite"):
        keras_bn.recalibrate(model, bad, verbose=0)
    with pytest.raises(
        KerasBNError,
        match=r"Unknown `estimator`\. Expected: 'population' or "
        r"'batch_mean'\. Received: 'ema'",
    ):
        keras_bn.recalibrate(model, data, estimator="ema", verbose=0)
    for w, b in zip(model.weights, before):
        np.testing.assert_array_equal(np.asarray(w), b)
    inputs = keras.Input((3,))
    with pytest.raises(KerasBNError, match=r"The model has no BatchNorm to recalibrate"):
        keras_bn.recalibrate(keras.Model(inputs, L.Dense(2)(inputs)), np.ones((4, 3)), verbose=0)


def test_recalibration_repairs_stale_statistics_of_a_short_run():
    # The problem users report most: Keras's momentum 0.99, about 130 training steps, moving
    # statistics still mostly their initial (0, 1), test accuracy near chance. Recalibrating on the
    # training split (no labels) restores it.
    from keras_bn.export.demo import load_digits_split

    x_train, x_test, y_train, y_test = load_digits_split()
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    x = inputs
    for filters in (16, 32):
        x = L.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = L.ReLU()(keras_bn.BatchNorm()(x))  # Keras's default momentum 0.99
    x = L.GlobalAveragePooling2D()(x)
    x = L.ReLU()(keras_bn.BatchNorm()(L.Dense(64, use_bias=False)(x)))
    model = keras.Model(inputs, L.Dense(10)(x))
    model.compile(
        keras.optimizers.Adam(3e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x_train, y_train, batch_size=64, epochs=6, verbose=0)

    def accuracy(m):
        return float(np.mean(np.argmax(m.predict(x_test, verbose=0), 1) == y_test))

    stale = accuracy(model)
    new, report = keras_bn.recalibrate(model, x_train, batch_size=64, verbose=0)
    assert stale < 0.5  # measured 0.10 here: the moving statistics are stale
    assert accuracy(new) > 0.95  # measured 0.99
    assert max(r.std_change for r in report.rows) > 1.0


# Run in a fresh process: the two logical CPUs must be configured before TensorFlow starts.
MIRRORED_SCRIPT = r"""
import json
import os
import sys

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

import keras_bn  # noqa: E402

L = keras.layers


def build():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 3))
    x = L.BatchNormalization(name="bn1")(L.Conv2D(4, 3, name="c1")(inputs))
    x = keras_bn.BatchNorm(name="bn2", unbiased_variance=True)(L.Conv2D(5, 1, name="c2")(x))
    x = L.Dense(3, name="d")(L.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, L.BatchNormalization(name="bn3")(x))


def stats(model):
    return {
        name: [model.get_layer(name).moving_mean.numpy().tolist(),
               model.get_layer(name).moving_variance.numpy().tolist()]
        for name in ("bn1", "bn2", "bn3")
    }


data = np.random.default_rng(0).normal(1.0, 2.0, size=(37, 6, 6, 3)).astype("float32")
single = build()
single.get_layer("bn1").set_weights([np.full(4, 2.0), np.full(4, 0.5), np.zeros(4), np.ones(4)])
out = {"replicas": None}
for estimator in ("population", "batch_mean"):
    out[f"single/{estimator}"] = stats(
        keras_bn.recalibrate(single, data, batch_size=8, estimator=estimator, verbose=0)[0]
    )
    # What two unsynchronized devices would see: batches of 4.
    out[f"halves/{estimator}"] = stats(
        keras_bn.recalibrate(single, data, batch_size=4, estimator=estimator, verbose=0)[0]
    )
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    replicated = build()
    replicated.set_weights(single.get_weights())
    for estimator in ("population", "batch_mean"):
        new, report = keras_bn.recalibrate(
            replicated, data, batch_size=8, estimator=estimator, verbose=0
        )
        out[f"mirrored/{estimator}"] = stats(new)
        out[f"batches/{estimator}"] = report.batches
    dataset = tf.data.Dataset.from_tensor_slices(data).batch(8)
    out["mirrored-dataset/population"] = stats(
        keras_bn.recalibrate(replicated, dataset, verbose=0)[0]
    )
    out["replicas"] = strategy.num_replicas_in_sync
    variable = new.get_layer("bn1").moving_mean
    out["mirrored_variables"] = isinstance(
        getattr(variable, "value", variable), tf.distribute.DistributedValues
    )
json.dump(out, sys.stdout)
"""


@tf_only
def test_mirrored_strategy_all_reduces_to_the_single_device_statistics(tmp_path):
    # Two replicas (two logical CPUs) each see half of every global batch of 8 (the last batch
    # has 5 rows: 3 and 2). All-reduced sums give the statistics of one device over the same
    # batches, for both estimators and downstream of another BatchNorm (each replica normalizes
    # with the global batch's statistics), from arrays and from a tf.data.Dataset; batches of 4
    # on one device (what unsynchronized replicas would compute) differ.
    script = tmp_path / "mirrored.py"
    script.write_text(MIRRORED_SCRIPT)
    run = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=600, check=False
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout)
    assert out["replicas"] == 2 and out["mirrored_variables"]
    assert out["batches/population"] == out["batches/batch_mean"] == 5

    def std_units(a, b, reference):  # max |a - b| in units of the reference's std
        (mean_a, var_a), (mean_b, var_b) = (
            (np.asarray(a[0]), np.asarray(a[1])),
            (
                np.asarray(b[0]),
                np.asarray(b[1]),
            ),
        )
        std = np.sqrt(np.asarray(reference[1]))
        return max(np.max(np.abs(mean_a - mean_b) / std), np.max(np.abs(var_a - var_b) / std**2))

    for estimator in ("population", "batch_mean"):
        single, mirrored = out[f"single/{estimator}"], out[f"mirrored/{estimator}"]
        for name in ("bn1", "bn2", "bn3"):
            assert std_units(single[name], mirrored[name], single[name]) < 1e-6, (estimator, name)
        halves = out[f"halves/{estimator}"]
        assert std_units(single["bn2"], halves["bn2"], single["bn2"]) > 1e-3, estimator
    dataset = out["mirrored-dataset/population"]
    for name in ("bn1", "bn2", "bn3"):
        assert std_units(out["single/population"][name], dataset[name], dataset[name]) < 1e-6


def test_shared_batchnorm_gets_the_statistics_of_all_its_calls(rng):
    # One BatchNorm applied to two branches (a Siamese tower): its population statistics are
    # those of every value it saw, both calls, not just the last one.
    inputs = keras.Input((5, 5, 2))
    shared = L.BatchNormalization(name="shared")
    a = shared(L.Conv2D(3, 1, name="left")(inputs))
    b = shared(L.Conv2D(3, 3, name="right")(inputs))
    model = keras.Model(inputs, [a, b])
    data = rng.normal(1.0, 2.0, size=(30, 5, 5, 2)).astype("float32")
    new, report = keras_bn.recalibrate(model, data, batch_size=8, verbose=0)
    values = np.concatenate([activations(model, "left", data), activations(model, "right", data)])
    layer = new.get_layer("shared")
    np.testing.assert_allclose(layer.moving_mean.numpy(), values.mean(0), atol=1e-6 * values.std())
    np.testing.assert_allclose(layer.moving_variance.numpy(), values.var(0), rtol=1e-6)
    assert report.rows[0].values_per_channel == 30 * 25 + 30 * 9


def test_multi_input_multi_output_model_from_a_list_and_a_dict(rng):
    # Two inputs (an image and a vector), one BatchNorm on each, two outputs; the data as a list
    # in model.inputs order and as a dict by input name give NumPy's statistics of each branch.
    image, vector = keras.Input((6, 6, 2), name="image"), keras.Input((5,), name="vector")
    a = L.BatchNormalization(name="bn_image")(L.Conv2D(3, 3, name="conv")(image))
    b = keras_bn.BatchNorm(name="bn_vector")(L.Dense(4, name="dense")(vector))
    model = keras.Model([image, vector], [L.GlobalAveragePooling2D()(a), b])
    x_image = rng.normal(1.0, 2.0, size=(50, 6, 6, 2)).astype("float32")
    x_vector = rng.normal(-3.0, 0.5, size=(50, 5)).astype("float32")
    conv = keras.Model(image, model.get_layer("conv").output).predict(x_image, verbose=0)
    dense = keras.Model(vector, model.get_layer("dense").output).predict(x_vector, verbose=0)
    conv, dense = conv.reshape(-1, 3).astype(np.float64), dense.astype(np.float64)
    for form in ([x_image, x_vector], {"vector": x_vector, "image": x_image}):
        new, report = keras_bn.recalibrate(model, form, batch_size=16, verbose=0)
        np.testing.assert_allclose(
            new.get_layer("bn_image").moving_variance.numpy(), conv.var(0), rtol=1e-6
        )
        np.testing.assert_allclose(
            new.get_layer("bn_vector").moving_mean.numpy(), dense.mean(0), atol=1e-6 * dense.std()
        )
        np.testing.assert_allclose(
            new.get_layer("bn_vector").moving_variance.numpy(), dense.var(0), rtol=1e-6
        )
        assert report.batches == 4
    with pytest.raises(KerasBNError, match="vector"):  # one input's data missing or misshapen
        keras_bn.recalibrate(model, [x_image, x_vector[:, :3]], verbose=0)


def test_a_pytorch_dataloader_over_x_y_is_read_as_keras_fit_reads_it(rng):
    # A DataLoader over a TensorDataset yields lists [x, y]: for a one-input model that is
    # (x, y), as Keras's fit and torch's update_bn read it, not two inputs.
    torch = pytest.importorskip("torch")
    inputs = keras.Input((5,))
    model = keras.Model(inputs, L.BatchNormalization(name="bn")(L.Dense(3, name="dense")(inputs)))
    x = rng.normal(2.0, 3.0, (40, 5)).astype("float32")
    y = rng.integers(0, 3, 40)
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    loader = torch.utils.data.DataLoader(dataset, batch_size=16)
    assert isinstance(next(iter(loader)), list)
    new, report = keras_bn.recalibrate(model, loader, verbose=0)
    dense = activations(model, "dense", x)
    bn = new.get_layer("bn")
    np.testing.assert_allclose(bn.moving_mean.numpy(), dense.mean(0), atol=1e-6 * dense.std())
    np.testing.assert_allclose(bn.moving_variance.numpy(), dense.var(0), rtol=1e-6)
    assert report.batches == 3
    # A two-input model fed lists of two arrays per batch still reads them as its two inputs.
    a, b = keras.Input((2,), name="a"), keras.Input((2,), name="b")
    two = keras.Model([a, b], L.BatchNormalization(name="bn")(L.Concatenate()([a, b])))
    pairs = [[x[i : i + 8, :2], x[i : i + 8, 2:4]] for i in range(0, 40, 8)]
    new, _ = keras_bn.recalibrate(two, pairs, verbose=0)
    np.testing.assert_allclose(
        new.get_layer("bn").moving_mean.numpy(), x[:, :4].astype(np.float64).mean(0), atol=1e-6
    )


def test_means_far_from_zero_keep_the_digits_float32_can_store(rng):
    # Mean 30 standard deviations from 0: the stored float32 mean is the float32 nearest to
    # NumPy's float64 mean, within one unit in the last place, on every backend.
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras_bn.BatchNorm(name="bn")(inputs))
    x = rng.normal(30.0, 1.0, (512, 4)).astype("float32")
    new, _ = keras_bn.recalibrate(model, x, batch_size=32, verbose=0)
    mean = keras.ops.convert_to_numpy(new.get_layer("bn").moving_mean)
    expected = x.astype(np.float64).mean(0).astype(np.float32)
    assert np.all(np.abs(mean - expected) <= np.spacing(expected)), (mean, expected)


def test_a_model_that_fails_on_the_data_is_a_clear_error(rng):
    # A model that regroups 3 channels by 12 values cannot run on sequences of 50 (150 values a
    # sample): what the model says, and which batch, in a KerasBNError (the command line's
    # exit 2), not an internal error.
    inputs = keras.Input((None, 4), name="sequence")
    x = L.BatchNormalization(name="bn")(L.Reshape((-1, 12))(L.Conv1D(3, 1)(inputs)))
    model = keras.Model(inputs, x)
    short = rng.normal(size=(8, 50, 4)).astype("float32")
    with pytest.raises(KerasBNError, match=r"fails on batch 0 of the data .*\(8, 50, 4\)"):
        keras_bn.recalibrate(model, short, verbose=0)
    with pytest.raises(KerasBNError, match=r"fails on batch 0 of the data"):
        keras_bn.diagnose(model, short)
    # Cropping 40 positions from each side of 50: TF's compiled collection step slices to an
    # empty tensor after the BatchNorm (its statistics are fine), the eager run that measures
    # the output change raises; JAX and PyTorch raise in the collection step.
    cropping = keras.Model(
        inputs, L.Cropping1D((40, 40))(L.BatchNormalization()(L.Conv1D(3, 1)(inputs)))
    )
    with pytest.raises(KerasBNError, match=r"fails on (batch 0|the first batch) of the data"):
        keras_bn.diagnose(cropping, short)
    long = rng.normal(size=(8, 100, 4)).astype("float32")
    new, _ = keras_bn.recalibrate(model, long, verbose=0)  # the negative case: it runs
    assert new.get_layer("bn").moving_variance.shape == (12,)


def test_batch_mean_merges_a_trailing_remainder_smaller_than_half_a_batch(data):
    # 300 rows in batches of 299: the last batch holds one row (variance 0). As a batch of its
    # own it would halve the average variance; merged into the batch before it, the two are one
    # batch of all 300 rows: NumPy's statistics of the whole data.
    model = two_branch_model()
    new, report = keras_bn.recalibrate(
        model, data, batch_size=299, estimator="batch_mean", verbose=0
    )
    conv = activations(model, "conv", data)
    np.testing.assert_allclose(
        new.get_layer("bn_a").moving_variance.numpy(), conv.var(0), rtol=1e-5
    )
    np.testing.assert_allclose(
        new.get_layer("bn_a").moving_mean.numpy(), conv.mean(0), atol=1e-6 * conv.std()
    )
    assert report.batches == 2  # both batches were seen
    # Three batches of 140 + 140 + 20 rows: the remainder merges into the second, and the first
    # and the merged one weigh equally. Negative case: 150 + 150 rows, a remainder of half a
    # batch or more, stays a batch of its own (update_bn). Either way: two equal-weight halves.
    for batch_size, batches in ((140, 3), (150, 2)):
        new, report = keras_bn.recalibrate(
            model, data, batch_size=batch_size, estimator="batch_mean", verbose=0
        )
        head = activations(model, "conv", data[:batch_size])
        tail = activations(model, "conv", data[batch_size:])
        np.testing.assert_allclose(
            new.get_layer("bn_a").moving_variance.numpy(),
            (head.var(0) + tail.var(0)) / 2,
            rtol=1e-5,
            err_msg=f"batch_size={batch_size}",
        )
        assert report.batches == batches


def test_statistics_a_layer_cannot_store_or_cannot_estimate_are_refused(rng):
    # A float16 BatchNorm on data of std 300: variance 9e4 > 65504, float16's largest number.
    inputs = keras.Input((4,), name="x")
    model = keras.Model(inputs, keras_bn.BatchNorm(name="bn", dtype="float16")(inputs))
    before = [w.numpy().copy() for w in model.weights]
    wide = rng.normal(0.0, 300.0, size=(64, 4)).astype("float32")
    with pytest.raises(
        KerasBNError, match=r"BatchNorm 'bn' got statistics its float16 variables cannot hold"
    ):
        keras_bn.recalibrate(model, wide, verbose=0)
    # One row of data: one value per channel, no variance to estimate.
    with pytest.raises(KerasBNError, match=r"BatchNorm 'bn' saw too few values.*1 value"):
        keras_bn.recalibrate(model, wide[:1], verbose=0)
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(before, model.weights))
    # Within float16's range: recalibrated, in float16, finite.
    new, _ = keras_bn.recalibrate(model, wide / 10, verbose=0)
    variance = np.asarray(new.get_layer("bn").moving_variance)
    assert variance.dtype == np.float16 and np.all(np.isfinite(variance))
    np.testing.assert_allclose(variance, (wide / 10).astype(np.float64).var(0), rtol=2e-3)


def test_data_that_never_ends_needs_batches(rng):
    inputs = keras.Input((4,), name="x")
    model = keras.Model(inputs, keras_bn.BatchNorm(name="bn")(inputs))
    x = rng.normal(size=(16, 4)).astype("float32")
    endless = tf.data.Dataset.from_tensor_slices(x).batch(8).repeat()
    with pytest.raises(KerasBNError, match=r"The data never ends.*batches="):
        keras_bn.recalibrate(model, endless, verbose=0)
    new, report = keras_bn.recalibrate(model, endless, batches=3, verbose=0)
    assert report.batches == 3
    # Three batches: the two halves of x, then the first half again.
    seen = np.concatenate([x, x[:8]]).astype(np.float64)
    np.testing.assert_allclose(new.get_layer("bn").moving_variance.numpy(), seen.var(0), rtol=1e-5)


def test_data_that_overflows_the_input_dtype_is_refused_not_reported_as_nan(rng):
    # float64 data of 1e300 for a float32 input: cast, it would be inf, and the statistics
    # would be refused later as "NaN or Inf in its inputs" (which the data does not hold).
    inputs = keras.Input((4,), name="x")
    model = keras.Model(inputs, keras_bn.BatchNorm(name="bn")(inputs))
    data = rng.normal(size=(16, 4))
    data[3, 1] = 1e300
    with pytest.raises(KerasBNError, match=r"Data for input 'x' overflow float32"):
        keras_bn.recalibrate(model, data, verbose=0)
    # Within float32's range, float64 data is cast and used (the negative case).
    new, _ = keras_bn.recalibrate(model, data.clip(-10, 10), verbose=0)
    np.testing.assert_allclose(
        new.get_layer("bn").moving_variance.numpy(), data.clip(-10, 10).var(0), rtol=1e-5
    )


@pytest.mark.parametrize("caller", ["recalibrate", "diagnose"])
def test_subclassed_models_are_refused_naming_the_caller(caller, subclassed_model, rng):
    model = subclassed_model
    x = rng.normal(size=(8, 4)).astype("float32")
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(
        keras_bn.KerasBNError,
        match=rf"{caller} needs a graph it can read\. Expected: a Sequential or Functional "
        r"keras\.Model\. Received: SubclassedWithBatchNorm \(a subclassed model\)",
    ):
        getattr(keras_bn, caller)(model, x)
    for w, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(w, b)


jax_only = pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX tracers only")


@jax_only
def test_keras_loses_a_jax_tracers_mask_entry_when_another_thread_collects_it():
    # Why keras_bn keeps its work on the calling thread on JAX (the test below). A tracer takes
    # no attributes, so Keras keeps its mask in a thread-local dict keyed by id(tracer), removed
    # by a finalizer that looks in the collecting thread's dict. If this stops failing to remove
    # the entry, Keras has fixed it and the second thread may come back on JAX.
    import jax
    import jax.numpy as jnp
    from keras.src.backend.common import global_state  # where Keras keeps the dict

    class Cycle:  # garbage only the collector frees, on whichever thread runs it
        pass

    def leave_a_masked_tracer(x):
        cycle = Cycle()
        cycle.me, cycle.tracer = cycle, x * 2.0
        keras_bn._keras_internals.set_keras_mask(cycle.tracer, jnp.ones((6, 6), bool))
        keys.append(id(cycle.tracer))
        return x

    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for collect_on_another_thread, stale in ((True, True), (False, False)):
            keys = []
            jax.jit(lambda x: leave_a_masked_tracer(x))(jnp.ones((6, 6)))  # a new trace
            masks = global_state.get_global_attribute("_keras_mask_dict")
            assert keys[0] in masks  # the tracer is garbage, not yet collected
            if collect_on_another_thread:
                worker = threading.Thread(target=gc.collect)
                worker.start()
                worker.join()
            else:
                gc.collect()
            assert (keys[0] in masks) is stale
            masks.pop(keys[0], None)  # leave no stale entry to the tests after this one
    finally:
        if was_enabled:
            gc.enable()


def test_work_moves_to_a_second_thread_only_where_keras_keeps_masks_safely(data):
    # recalibrate copies the model, and fold_bn runs the original model, on a second thread
    # while the calling thread works (TensorFlow and PyTorch run kernels without the GIL). On
    # JAX, garbage collected on that thread would leave stale masks (the test above), and a
    # Concatenate fed a tracer with a reused id then failed with another model's mask shape:
    # both stay on the calling thread there.
    copied_on, called_on = [], set()

    class Recording(L.Layer):
        @classmethod
        def from_config(cls, config):
            copied_on.append(threading.get_ident())
            return super().from_config(config)

        def call(self, x):
            called_on.add(threading.get_ident())
            return x

    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, L.BatchNormalization()(Recording()(L.Conv2D(4, 3)(inputs))))
    keras_bn.recalibrate(model, data[:20], verbose=0)
    me, jax = threading.get_ident(), keras.backend.backend() == "jax"
    assert len(copied_on) == 1 and (copied_on[0] == me) is jax
    called_on.clear()
    keras_bn.fold_bn(model)
    assert me in called_on  # the folded model's check
    assert (called_on == {me}) is jax  # the original model's outputs: elsewhere, but on JAX
