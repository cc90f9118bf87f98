"""Reading a Keras model as a graph, for every pass that needs one: which layers are BatchNorms,
whether a model has a graph to read, one walker over nodes and nesting, and one runner.

- `require_graph(model, caller)`: a built Sequential or a Functional model, or a `KerasBNError`
  that names the function the user called.
- `Graph`: nodes in topological order, consumers, call counts and outputs of one graph.
- `walk(model)`: every layer, nested models entered, with its path-qualified name
  (`"outer/inner/bn"`), whether the graph calls it with `training=False`, and the frozen nested
  model it sits in, if any.
- `run_inference(model, inputs, replace)`: the model on `inputs` with every layer in inference
  mode, nested graphs included, and some layers replaced (fold's lowering, recalibration's
  collection).
"""

from __future__ import annotations

import collections
import dataclasses

import keras

from keras_bn import _keras_internals as internals
from keras_bn.errors import KerasBNError, expected
from keras_bn.layer import BatchNorm

BATCHNORM_TYPES = (keras.layers.BatchNormalization, BatchNorm)


def require_graph(model, caller):
    """Raises KerasBNError unless `model` is a graph the passes can read (a built Sequential or a
    Functional model), naming `caller` (e.g. "fold_bn", "recalibrate") in the message."""
    if not isinstance(model, keras.Model):
        raise KerasBNError(
            expected(f"{caller} takes Keras models", "a keras.Model", type(model).__name__)
        )
    if isinstance(model, keras.Sequential):
        if internals.graph_model(model) is None:
            raise KerasBNError(
                expected(
                    "The Sequential model must be built",
                    "a model with a known input shape",
                    f"unbuilt model '{model.name}'",
                    "Call it on data or give it a keras.Input first.",
                )
            )
    elif not internals.is_functional(model):
        raise KerasBNError(
            expected(
                f"{caller} needs a graph it can read",
                "a Sequential or Functional keras.Model",
                f"{type(model).__name__} (a subclassed model)",
                "Rebuild the model with the Functional API.",
            )
        )


class Graph:
    """Nodes (topological order), consumers, call counts and outputs of one Functional model's
    graph."""

    def __init__(self, model):
        by_depth = internals.nodes_by_depth(model)
        self.nodes = [
            n
            for depth in sorted(by_depth, reverse=True)
            for n in by_depth[depth]
            if n.operation is not None and not n.is_input
        ]
        self.consumers = collections.defaultdict(list)
        for node in self.nodes:
            for tensor in node.input_tensors:
                self.consumers[id(tensor)].append(node)
        self.calls = collections.Counter(id(n.operation) for n in self.nodes)
        self.outputs = {id(t) for t in keras.tree.flatten(model.outputs)}
        # {id(layer): (clone with a bias, None) or (None, reason)}: fold targets, made while
        # planning, used by the rebuild.
        self.clones = {}

    def producer(self, tensor):
        node = internals.producer_node(tensor)
        return node if node in self.nodes else None


@dataclasses.dataclass
class Site:
    """One layer where `walk` found it."""

    layer: keras.layers.Layer
    path: str  # "outer/inner/bn": unique where layer names repeat across nested models
    inference_call: bool  # the graph calls it with training=False
    frozen_by: str | None  # the trainable=False nested model it sits in


def walk(model, prefix="", frozen_by=None):
    """Yields a `Site` per layer of `model`, nested models entered (not yielded themselves)."""
    graph = internals.graph_model(model)
    calls = {}
    if graph is not None and internals.is_functional(graph):
        for nodes in internals.nodes_by_depth(graph).values():
            for node in nodes:
                if node.operation is not None:
                    kwargs = node.arguments.kwargs if node.arguments else {}
                    calls.setdefault(id(node.operation), []).append(kwargs.get("training"))
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            frozen = frozen_by or (None if layer.trainable else layer.name)
            yield from walk(layer, f"{prefix}{layer.name}/", frozen)
        else:
            inference_call = any(t is False for t in calls.get(id(layer), []))
            yield Site(layer, prefix + layer.name, inference_call, frozen_by)


def run_inference(model, inputs, replace=lambda op: None):
    """Runs graph model `model` on `inputs` (a flat list, in the order of `model.inputs`) with every
    layer that takes `training` called with `training=False`, nested graph models walked through,
    and an operation `op` replaced by `replace(op)` wherever that is not None. Returns the
    outputs in the model's structure."""

    def operation_fn(op):
        new = replace(op)
        if new is not None:
            return new
        if isinstance(op, keras.Model) and internals.graph_model(op) is not None:
            inner = internals.graph_model(op)
            return lambda *args, **kwargs: internals.run_through_graph(inner, args[0], operation_fn)
        if isinstance(op, keras.layers.Layer) and internals.call_has_training_arg(op):
            return lambda *args, **kwargs: op(*args, **{**kwargs, "training": False})
        return op

    graph = internals.graph_model(model)
    structured = keras.tree.pack_sequence_as(internals.inputs_struct(graph), inputs)
    return internals.run_through_graph(graph, structured, operation_fn)
