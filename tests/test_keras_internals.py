"""Every private Keras/TF API keras_bn relies on (keras_bn/_keras_internals.py), checked on a small
model: when a Keras or TensorFlow upgrade changes one, the failure names it."""

import io
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_bn import _keras_internals as internals

L = keras.layers
UPGRADE = (
    "keras_bn._keras_internals.{} no longer works with Keras {} / TF {}: update it (and the "
    "Keras bound in setup.cfg)"
)


def _fail(name):
    return UPGRADE.format(name, keras.__version__, tf.__version__)


@pytest.fixture
def nested():
    inner_in = keras.Input((4,), name="inner_in")
    inner = keras.Model(inner_in, L.Dense(3, name="inner_dense")(inner_in), name="inner")
    inputs = {"a": keras.Input((4,), name="a"), "b": keras.Input((4,), name="b")}
    x = L.BatchNormalization(name="bn")(inner(inputs["a"]))
    return keras.Model(inputs, [x, L.Dense(2, name="head")(inputs["b"])], name="outer")


def test_all_layers_recurses_into_nested_models(nested):
    names = [layer.name for layer in internals.all_layers(nested)]
    assert {"inner", "inner_dense", "bn", "head"} <= set(names), _fail("all_layers")
    assert "outer" not in names, _fail("all_layers")


def test_graph_model_and_is_functional(nested):
    seq = keras.Sequential([keras.Input((3,)), L.Dense(2)])
    assert internals.is_functional(nested) and internals.is_functional(
        internals.graph_model(seq)
    ), _fail("is_functional/graph_model")
    assert internals.graph_model(keras.Sequential([L.Dense(2)])) is None, _fail("graph_model")

    class Sub(keras.Model):
        def call(self, x):
            return x

    assert not internals.is_functional(Sub()), _fail("is_functional")


def test_nodes_and_producers(nested):
    by_depth = internals.nodes_by_depth(nested)
    ops = {n.operation.name for nodes in by_depth.values() for n in nodes if n.operation}
    assert {"inner", "bn", "head"} <= ops, _fail("nodes_by_depth")
    bn_out = nested.outputs[0]
    node = internals.producer_node(bn_out)
    assert node.operation.name == "bn", _fail("producer_node")
    assert internals.producer_node(nested.inputs[0]) is None, _fail("producer_node")


def test_inputs_struct_and_run_through_graph(nested):
    struct = internals.inputs_struct(nested)
    assert isinstance(struct, dict) and set(struct) == {"a", "b"}, _fail("inputs_struct")
    x = {"a": np.ones((2, 4), np.float32), "b": np.ones((2, 4), np.float32)}
    seen = []

    def operation_fn(op):
        seen.append(op.name)
        return op

    out = internals.run_through_graph(nested, x, operation_fn)
    assert {"inner", "bn", "head"} <= set(seen), _fail("run_through_graph")
    ref = nested(x)
    for a, b in zip(out, ref):
        np.testing.assert_allclose(a, b, err_msg=_fail("run_through_graph"))


def test_call_has_training_arg():
    assert internals.call_has_training_arg(L.BatchNormalization()), _fail("call_has_training_arg")
    assert not internals.call_has_training_arg(L.ReLU()), _fail("call_has_training_arg")


def test_current_tf_device():
    assert internals.current_tf_device() is None, _fail("current_tf_device")
    with tf.device("/CPU:0"):
        assert internals.current_tf_device().endswith("CPU:0"), _fail("current_tf_device")


def test_save_keras_to_file_object(nested):
    handle = io.BytesIO()
    internals.save_keras_to_file_object(nested, handle)
    assert "config.json" in zipfile.ZipFile(io.BytesIO(handle.getvalue())).namelist(), _fail(
        "save_keras_to_file_object"
    )


def test_concrete_bool_is_none_while_a_step_traces():
    assert internals.concrete_bool(tf.constant(False)) is False, _fail("concrete_bool")
    seen = []
    tf.function(lambda x: seen.append(internals.concrete_bool(x)) or x)(tf.constant(True))
    assert seen == [None], _fail("concrete_bool")


def test_traced_by_jax_tells_a_tracer_from_an_array():
    jax = pytest.importorskip("jax", reason='JAX not installed: pip install -e ".[dev]"')
    import jax.numpy as jnp

    seen = []
    jax.jit(lambda x: seen.append(internals.traced_by_jax(x)) or x)(jnp.ones(2))
    assert seen == [True] and not internals.traced_by_jax(jnp.ones(2)), _fail("traced_by_jax")


def test_backend_guard_passes_on_tensorflow():
    # The refusals on JAX and PyTorch are checked there (tests/test_backends.py).
    internals.require_tensorflow("x", "y")


def test_torch_all_reduce_sum_has_a_gradient(tmp_path):
    # One process here (two in tests/test_backends.py): the sum over one process is the tensor.
    torch = pytest.importorskip("torch")
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        x = torch.tensor([1.0, 2.0], requires_grad=True)
        y = internals.torch_all_reduce_sum(x * 3.0)
        (y * torch.tensor([1.0, 10.0])).sum().backward()
    finally:
        dist.destroy_process_group()
    assert y.tolist() == [3.0, 6.0] and x.grad.tolist() == [3.0, 30.0], _fail(
        "torch_all_reduce_sum"
    )


def test_litert_delegate_partitions(tmp_path):
    # A real LiteRT file: XNNPACK takes the whole graph (1), and an interpreter without default
    # delegates has none (0).
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="relu")])
    path = str(tmp_path / "m.tflite")
    model.export(path, format="litert", verbose=False)
    with_delegate = Interpreter(model_path=path)
    with_delegate.allocate_tensors()
    assert internals.litert_delegate_partitions(with_delegate) == 1
    plain = Interpreter(
        model_path=path,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    plain.allocate_tensors()
    assert internals.litert_delegate_partitions(plain) == 0
