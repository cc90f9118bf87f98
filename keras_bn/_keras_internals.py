"""Every private Keras, TensorFlow and PyTorch API that keras_bn and keras_bn.export use, in one
place.

Each function says why no public API does the job. `tests/test_keras_internals.py` calls each
one on a small model and fails with a clear message when a Keras or TF upgrade changes it; the
Keras versions that pass are the bounds in setup.cfg.
"""

import keras


def all_layers(model):
    """Every layer of `model`, nested models' layers included, depth first. `model.layers` is
    one level only; Keras's own recursive walk is `_flatten_layers`."""
    return list(model._flatten_layers(include_self=False, recursive=True))


def is_functional(model):
    """True for a Functional model (a graph of layers). The class is not exported by Keras."""
    from keras.src.models.functional import Functional

    return isinstance(model, Functional)


def graph_model(model):
    """The Functional graph of a built Sequential model (Keras keeps it in `_functional`, None
    while unbuilt), or `model` itself for a Functional model."""
    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    return model


def nodes_by_depth(model):
    """{depth: [Node]} of a Functional model: the graph itself, which Keras does not expose."""
    return model._nodes_by_depth


def producer_node(tensor):
    """The Node that made a symbolic tensor, or None for an input: `_keras_history` is the only
    link from a KerasTensor to its producer."""
    history = tensor._keras_history
    if isinstance(history.operation, keras.layers.InputLayer):
        return None
    return history.operation._inbound_nodes[history.node_index]


def inputs_struct(model):
    """The nested structure of a Functional model's inputs (dict, list or single), to rebuild a
    model with the same input structure. `model.inputs` is flattened."""
    return model._inputs_struct


def run_through_graph(model, inputs, operation_fn):
    """Calls the Functional graph of `model` on `inputs`, with every operation replaced by
    `operation_fn(op)`: `_graph.run_inference`, which runs a graph on real tensors, inside a
    traced step, with some layers replaced (recalibration's collection, the ONNX trace).
    `keras.models.clone_model(clone_function=, call_function=)` does that for symbolic inputs
    only: it builds a new model, layers and all. `fold_bn`'s rebuild, which builds a model, uses
    it; this remains for running one."""
    return model._run_through_graph(inputs, operation_fn=operation_fn)


def call_has_training_arg(layer):
    """Whether `layer.call` takes `training`: Keras inspects the signature once and keeps it."""
    return layer._call_has_training_arg


def current_tf_device():
    """The calling thread's TF device scope (`with tf.device(...)`), which TF keeps per thread
    and has no public getter for; None outside one."""
    from tensorflow.python.eager import context

    return context.context().device_name or None


def save_keras_to_file_object(model, handle):
    """`model.save` into an open binary file: the public API takes only paths ending in .keras,
    Keras's saving library takes file objects."""
    from keras.src.saving import saving_lib

    saving_lib.save_model(model, handle)


def keras_mask(tensor):
    """The Keras mask a tensor carries (set by the layer that made it), or None. A function that
    stands in for a layer in `run_through_graph` is not handed it by Keras. Imported from its
    home module: Keras 3.16 no longer re-exports it from `keras.src.backend`."""
    from keras.src.backend.common import masking

    return masking.get_keras_mask(tensor)


def set_keras_mask(tensor, mask):
    """Attaches `mask` to `tensor`, as Layer.__call__ does, so the layers after a stand-in
    function still see it."""
    from keras.src.backend.common import masking

    if mask is not None:
        masking.set_keras_mask(tensor, mask)
    return tensor


def masks_kept_per_thread() -> bool:
    """Whether Keras keeps some tensors' masks where a second Python thread can corrupt them.

    A JAX tracer takes no attributes, so Keras stores its mask in a dict keyed by `id(tensor)`
    in its *thread-local* global state, and registers a finalizer that deletes the entry when
    the tracer dies. The finalizer looks in the dict of whichever thread runs it: when Python's
    garbage collector happens to run on another thread (any thread that allocates), the entry
    stays in the first thread's dict, and a later tracer that gets the same id inherits that
    mask (a `Concatenate` then fails with shapes from another model). Work we would put on a
    second thread runs on the calling thread instead on this backend."""
    return keras.backend.backend() == "jax"


def traced_by_jax(x) -> bool:
    """True while jax.jit (or jax.grad) traces `x`. Keras has no public test for a tracer."""
    import jax

    return isinstance(x, jax.core.Tracer)


def concrete_bool(flag):
    """The value of `flag` (a scalar boolean tensor) as a Python bool when it has one now, or None
    while a compiled step traces it (tf.function or XLA, jax.jit, torch.compile), where reading
    it would be a host callback or an error. No public Keras API says whether a tensor is
    concrete."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(flag) if tf.executing_eagerly() else None
    if backend == "jax":
        return None if traced_by_jax(flag) else bool(flag)
    if backend == "torch":
        import torch

        return None if torch.compiler.is_compiling() else bool(flag)
    return bool(flag)


def torch_all_reduce_sum(tensor):
    """The sum of `tensor` over every process of the default torch.distributed group, with a
    gradient: backward sums the gradients over the processes as well, which is what a
    synchronized BatchNorm needs (each process's inputs shape the global statistics).

    Private: the public differentiable collective, `torch.distributed.nn.functional.all_reduce`,
    is deprecated (torch 2.13 warns to use this one instead) and refuses `torch.compile`; the
    plain `torch.distributed.all_reduce` works in place, without a gradient."""
    import torch.distributed as dist
    from torch.distributed import _functional_collectives as collectives

    return collectives.all_reduce(tensor, "sum", dist.group.WORLD)


def require_tensorflow(what: str, command: str) -> None:
    """Refuses `what` on another Keras backend, naming the command that works."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return
    from keras_bn.errors import KerasBNError, expected

    raise KerasBNError(
        expected(
            f"{what} runs on the TensorFlow backend in this version",
            "KERAS_BACKEND=tensorflow",
            f"KERAS_BACKEND={backend}",
            f"Run it there: `KERAS_BACKEND=tensorflow {command}`.",
        )
    )


def litert_delegate_partitions(interpreter) -> int:
    """How many partitions of the graph a LiteRT interpreter handed to its default delegate
    (XNNPACK on CPU), after `allocate_tensors`: each is one DELEGATE node. A graph the delegate
    takes whole is one partition; ops it cannot run split it. Private: `ai_edge_litert`'s
    interpreter has no public call that lists its nodes after delegation."""
    return sum(op["op_name"] == "DELEGATE" for op in interpreter._get_ops_details())
