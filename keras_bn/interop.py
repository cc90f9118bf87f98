"""PyTorch state dicts into Keras models and back: layouts transposed, BatchNorm conventions
converted, every tensor used exactly once.

A PyTorch model and its Keras twin (the same layers, written in Keras) share their trained
values once each tensor is put in Keras's layout:

| PyTorch module | tensor | Keras layer | weight | layout |
|---|---|---|---|---|
| `Linear` | `weight` (out, in) | `Dense` | `kernel` (in, out) | transposed |
| `Conv{1,2,3}d`, any `groups` | `weight` (out, in / groups, *k) | `Conv{1,2,3}D` | `kernel` (*k, in / groups, out) | axes (2, ..., 1, 0) |
| `Conv{1,2}d`, `groups = in` | `weight` (in * m, 1, *k) | `DepthwiseConv{1,2}D` | `kernel` (*k, in, m) | (in, m, *k), then axes (2, ..., 0, 1) |
| `ConvTranspose{1,2,3}d` | `weight` (in, out, *k) | `Conv{1,2,3}DTranspose` | `kernel` (*k, out, in) | axes (2, ..., 1, 0) |
| `BatchNorm{1,2,3}d`, `SyncBatchNorm`, `FrozenBatchNorm2d` | `weight`, `bias`, `running_mean`, `running_var`, `num_batches_tracked` | `keras_bn.BatchNorm`, `keras.layers.BatchNormalization` | `gamma`, `beta`, `moving_mean`, `moving_variance`, `num_batches_tracked` | as they are |

Biases are copied as they are. A state dict holds tensors only: a BatchNorm's momentum and
epsilon are attributes of the module. Given the module (`torch_module=`), the BatchNorms of the
imported model take PyTorch's conventions: momentum `1 - m` (Keras's is the weight of the old
value), PyTorch's epsilon, `momentum=None` as the cumulative average, the unbiased moving
variance, `affine=False` as no gamma and beta, `SyncBatchNorm` as `synchronized=True`,
`FrozenBatchNorm2d` as `trainable=False`. Without it, momentum and epsilon stay the Keras
layers' and the report says so.

Nothing here imports torch: state dicts may hold torch tensors or NumPy arrays.
"""

from __future__ import annotations

import collections
import dataclasses

import keras
import numpy as np

from keras_bn._graph import require_graph, walk
from keras_bn.conventions import keras_momentum_to_torch, torch_momentum_to_keras
from keras_bn.errors import KerasBNError, VerificationError, expected
from keras_bn.layer import BatchNorm
from keras_bn.verification import compare

L = keras.layers
# Prefixes that wrappers put before every key: DataParallel / DistributedDataParallel
# ("module."), torch.compile ("_orig_mod.").
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
BATCHNORM_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# PyTorch modules by class name -> the kind of Keras layer they become.
TORCH_KINDS = {
    "Linear": "dense",
    **{f"Conv{n}d": "conv" for n in (1, 2, 3)},
    **{f"ConvTranspose{n}d": "conv_transpose" for n in (1, 2, 3)},
    **{f"BatchNorm{n}d": "batchnorm" for n in (1, 2, 3)},
    "SyncBatchNorm": "batchnorm",
    "FrozenBatchNorm2d": "batchnorm",
}


def _keras_kind(layer) -> str | None:
    """The kind of a Keras layer this module reads or writes, or None."""
    if isinstance(layer, (BatchNorm, L.BatchNormalization)):
        return "batchnorm"
    if isinstance(layer, L.Dense):
        return "dense"
    if isinstance(layer, (L.DepthwiseConv1D, L.DepthwiseConv2D)):
        return "depthwise"
    if isinstance(layer, (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose)):
        return "conv_transpose"
    if isinstance(layer, (L.Conv1D, L.Conv2D, L.Conv3D)) and not isinstance(
        layer, (L.SeparableConv1D, L.SeparableConv2D)
    ):
        return "conv"
    return None


@dataclasses.dataclass
class InteropRow:
    """One Keras layer and the PyTorch module it was paired with."""

    keras: str  # the layer's path, "outer/inner/layer"
    torch: str  # the module's key prefix, "features.0"
    kind: str  # "batchnorm", "conv", "conv_transpose", "depthwise", "dense"
    keys: list[str]  # the state-dict keys used
    conversions: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class InteropReport:
    """What `from_torch_state_dict` paired, converted and checked.

    Attributes:
        rows: One `InteropRow` per Keras layer that received tensors.
        stripped_prefix: The wrapper prefix removed from every key ("module."), or None.
        unused_keys: State-dict keys no layer took (only with `strict=False`).
        unmatched_layers: Keras layers that took no tensor (only with `strict=False`).
        conventions: Where the BatchNorm conventions came from ("torch module" or "Keras
            layers").
        verification: {"max_abs", "max_rel", "scale", "passed"} against the PyTorch module's
            outputs, when `torch_module` and `samples` were given.
    """

    rows: list[InteropRow] = dataclasses.field(default_factory=list)
    stripped_prefix: str | None = None
    unused_keys: list[str] = dataclasses.field(default_factory=list)
    unmatched_layers: list[str] = dataclasses.field(default_factory=list)
    conventions: str = "Keras layers"
    verification: dict | None = None

    def __str__(self) -> str:
        lines = [f"{'Keras layer':<32} {'PyTorch module':<32} conversions"]
        for row in self.rows:
            lines.append(f"{row.keras:<32} {row.torch:<32} {'; '.join(row.conversions)}")
        if self.stripped_prefix:
            lines.append(f"removed the prefix {self.stripped_prefix!r} from every key")
        if self.unused_keys:
            lines.append(f"unused keys: {', '.join(self.unused_keys)}")
        if self.unmatched_layers:
            lines.append(f"layers without tensors: {', '.join(self.unmatched_layers)}")
        lines.append(f"BatchNorm momentum and epsilon from the {self.conventions}")
        if self.verification is not None:
            v = self.verification
            lines.append(
                f"verified against PyTorch: max |diff| {v['max_abs']:.3g} "
                f"({v['max_rel']:.3g} of the largest output)"
            )
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Reading the two sides.


def _as_array(value, key: str) -> np.ndarray:
    """A torch tensor or array-like as a NumPy array, without importing torch."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise KerasBNError(
            expected(
                f"State-dict entry '{key}' is not numeric",
                "a tensor or array of numbers",
                f"{type(value).__name__} of dtype {array.dtype}",
            )
        )
    return array


def _tensors(state_dict) -> tuple[dict[str, np.ndarray], str | None, dict | None]:
    """(arrays by key with any wrapper prefix removed, the prefix, the modules by key prefix when
    `state_dict` is a torch module)."""
    modules = None
    if hasattr(state_dict, "state_dict") and hasattr(state_dict, "named_modules"):
        modules = dict(state_dict.named_modules())
        state_dict = state_dict.state_dict()
    if not hasattr(state_dict, "items"):
        raise KerasBNError(
            expected(
                "from_torch_state_dict reads a state dict",
                "a mapping of names to tensors (module.state_dict(), torch.load(path, "
                "weights_only=True)) or a torch.nn.Module",
                type(state_dict).__name__,
            )
        )
    arrays = {str(k): _as_array(v, str(k)) for k, v in state_dict.items()}
    stripped = None
    for prefix in WRAPPER_PREFIXES:
        if arrays and all(k.startswith(prefix) for k in arrays):
            arrays = {k[len(prefix) :]: v for k, v in arrays.items()}
            stripped = (stripped or "") + prefix
    return arrays, stripped, None if modules is None else _modules(modules, stripped)


def _modules(named_modules, stripped):
    """{key prefix: module} with the state dict's wrapper prefix removed where a name has it
    (a DataParallel checkpoint loads into the bare module as well as into the wrapped one)."""
    if not stripped:
        return dict(named_modules)
    return {
        k[len(stripped) :] if k.startswith(stripped) else k: m for k, m in named_modules.items()
    }


def _groups(arrays) -> collections.OrderedDict:
    """{module prefix: {parameter name: array}}, in the state dict's order."""
    groups = collections.OrderedDict()
    for key, array in arrays.items():
        prefix, _, name = key.rpartition(".")
        groups.setdefault(prefix, {})[name] = array
    return groups


def _torch_kind(group, module) -> str:
    if module is not None and type(module).__name__ in TORCH_KINDS:
        return TORCH_KINDS[type(module).__name__]
    if "running_mean" in group or "running_var" in group:
        return "batchnorm"
    weight = group.get("weight")
    if weight is None:
        return "unknown"
    return {1: "batchnorm", 2: "dense"}.get(weight.ndim, "conv")


def _compatible(keras_kind: str, torch_kind: str) -> bool:
    if keras_kind in ("conv", "conv_transpose", "depthwise"):
        return torch_kind in ("conv", "conv_transpose")
    return keras_kind == torch_kind


def _describe_group(prefix, group) -> str:
    return f"'{prefix}' ({', '.join(f'{k} {tuple(v.shape)}' for k, v in group.items())})"


def _describe_layer(path, layer) -> str:
    shapes = ", ".join(f"{w.name} {tuple(w.shape)}" for w in layer.weights)
    return f"'{path}' ({type(layer).__name__}: {shapes})"


def _pairs(sites, groups, modules, mapping, strict, report):
    """[(site, torch prefix)] by `mapping` (torch prefix -> Keras path) or by order of kinds."""
    targets = [site for site in sites if _keras_kind(site.layer) is not None and site.layer.weights]
    others = [s for s in sites if _keras_kind(s.layer) is None and s.layer.weights]
    if others and strict:
        raise KerasBNError(
            expected(
                "Every Keras layer with weights takes them from the state dict (strict=True)",
                "Dense, Conv{1,2,3}D, DepthwiseConv{1,2}D, Conv{1,2,3}DTranspose and BatchNorm "
                "layers",
                ", ".join(f"'{s.path}' ({type(s.layer).__name__})" for s in others)
                + ", which from_torch_state_dict cannot take",
                "Pass strict=False to import the others and set these yourself.",
            )
        )
    if mapping is not None:
        by_path = {site.path: site for site in targets}
        pairs = []
        for prefix, path in mapping.items():
            if prefix not in groups:
                raise KerasBNError(
                    expected(
                        f"mapping names PyTorch module '{prefix}'",
                        "a key prefix of the state dict",
                        f"none of its {len(groups)} modules ({', '.join(list(groups)[:8])}"
                        f"{', ...' if len(groups) > 8 else ''})",
                    )
                )
            if path not in by_path:
                raise KerasBNError(
                    expected(
                        f"mapping names Keras layer '{path}'",
                        "the path of a Dense, Conv, ConvTranspose, DepthwiseConv or BatchNorm "
                        "layer with weights",
                        f"none of {', '.join(list(by_path)[:8])}{', ...' if len(by_path) > 8 else ''}",
                    )
                )
            pairs.append((by_path[path], prefix))
        left_groups = [p for p in groups if p not in mapping]
        taken = set(mapping.values())
        left_layers = [site for site in targets if site.path not in taken]
    else:
        pairs, order = [], list(groups)
        for index, site in enumerate(targets):
            if index >= len(order):
                left_layers = targets[index:]
                break
            prefix = order[index]
            kind = _torch_kind(groups[prefix], (modules or {}).get(prefix))
            if not _compatible(_keras_kind(site.layer), kind):
                raise KerasBNError(
                    expected(
                        f"Pairing by order: Keras layer {_describe_layer(site.path, site.layer)} "
                        f"is number {index + 1} of the layers with weights",
                        f"module number {index + 1} of the state dict of the same kind",
                        f"{_describe_group(prefix, groups[prefix])}, a {kind}",
                        "Write the Keras model's layers in the order of the PyTorch modules, or "
                        "pass mapping={torch prefix: Keras layer path}.",
                    )
                )
            pairs.append((site, prefix))
        else:
            left_layers = []
        left_groups = order[len(pairs) :]
    if strict and (left_groups or left_layers):
        raise KerasBNError(
            expected(
                "Every tensor is used exactly once (strict=True)",
                "as many PyTorch modules as Keras layers with weights, each paired once",
                f"left over in the state dict: {[k for p in left_groups for k in _keys(p, groups[p])] or 'none'}; "
                f"Keras layers without tensors: {[s.path for s in left_layers] or 'none'}",
                "Pass mapping= to pair them, or strict=False to leave them as they are.",
            )
        )
    report.unused_keys = [k for p in left_groups for k in _keys(p, groups[p])]
    report.unmatched_layers = [site.path for site in [*left_layers, *others]]
    return pairs


def _key(prefix, name):
    return f"{prefix}.{name}" if prefix else name


def _keys(prefix, group):
    return [_key(prefix, name) for name in group]


# ----------------------------------------------------------------------------------------------
# Layouts.


def _kernel_from_torch(kind, weight, layer):
    """PyTorch's weight in the Keras layer's kernel layout (see the module's table)."""
    n = weight.ndim
    if kind == "dense":
        return weight.T
    if kind == "depthwise":
        channels = weight.shape[0] // max(int(layer.depth_multiplier), 1)
        grouped = weight.reshape(channels, -1, *weight.shape[2:])  # (in, m, *k)
        return np.transpose(grouped, (*range(2, n), 0, 1))
    return np.transpose(weight, (*range(2, n), 1, 0))  # conv and conv_transpose


def _kernel_to_torch(kind, kernel):
    n = kernel.ndim
    if kind == "dense":
        return kernel.T
    if kind == "depthwise":
        grouped = np.transpose(kernel, (n - 2, n - 1, *range(n - 2)))  # (in, m, *k)
        return grouped.reshape(-1, 1, *kernel.shape[: n - 2])
    return np.transpose(kernel, (n - 1, n - 2, *range(n - 2)))


def _check_finite(key, array):
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise KerasBNError(
            expected(
                f"State-dict entry '{key}' holds {bad} NaN or Inf values",
                "finite weights and statistics",
                f"{bad} of {array.size} values non-finite",
                "Import from a checkpoint saved before the values diverged.",
            )
        )


def _shaped(key, array, variable, path):
    if tuple(array.shape) != tuple(variable.shape):
        raise KerasBNError(
            expected(
                f"Shapes differ between '{key}' and Keras layer '{path}' {variable.name}",
                f"{tuple(variable.shape)} (Keras layout)",
                f"{tuple(array.shape)} after the layout conversion",
                "Check that the Keras layer has the PyTorch module's channels and kernel size.",
            )
        )
    return array


# ----------------------------------------------------------------------------------------------
# Import.


def _weighted_plan(site, prefix, group, kind, module, row):
    layer, path = site.layer, site.path
    if kind == "conv_transpose" and module is not None and getattr(module, "groups", 1) != 1:
        raise KerasBNError(
            expected(
                f"PyTorch module '{prefix}' is a grouped transposed convolution",
                "groups=1 (Keras's Conv*DTranspose has no groups)",
                f"groups={module.groups}",
            )
        )
    if module is not None and (TORCH_KINDS.get(type(module).__name__) == "conv_transpose") != (
        kind == "conv_transpose"
    ):
        raise KerasBNError(
            expected(
                f"Keras layer '{path}' ({type(layer).__name__}) and PyTorch module '{prefix}'",
                "both transposed convolutions or neither",
                f"a {type(module).__name__}",
            )
        )
    values = {}
    weight = group.get("weight")
    if weight is None:
        raise KerasBNError(
            expected(f"PyTorch module '{prefix}' has a weight", "'weight'", f"keys {list(group)}")
        )
    key = _key(prefix, "weight")
    _check_finite(key, weight)
    values["kernel"] = _shaped(key, _kernel_from_torch(kind, weight, layer), layer.kernel, path)
    row.keys.append(key)
    layout = {
        "dense": "transposed (out, in) -> (in, out)",
        "depthwise": "(in*m, 1, *k) -> (*k, in, m)",
        "conv_transpose": "(in, out, *k) -> (*k, out, in)",
    }.get(kind, "(out, in/groups, *k) -> (*k, in/groups, out)")
    row.conversions.append(f"weight {layout}")
    bias = group.get("bias")
    has_bias = getattr(layer, "bias", None) is not None
    if (bias is None) != (not has_bias):
        raise KerasBNError(
            expected(
                f"Bias of PyTorch module '{prefix}' and Keras layer '{path}'",
                "both with a bias or both without",
                f"PyTorch {'with' if bias is not None else 'without'}, Keras use_bias={has_bias}",
            )
        )
    if bias is not None:
        _check_finite(_key(prefix, "bias"), bias)
        values["bias"] = _shaped(_key(prefix, "bias"), bias, layer.bias, path)
        row.keys.append(_key(prefix, "bias"))
    extra = set(group) - {"weight", "bias"}
    if extra:
        raise KerasBNError(
            expected(
                f"PyTorch module '{prefix}' holds weight and bias",
                "no other tensor",
                f"also {sorted(extra)}",
            )
        )
    return values, {}


def _batchnorm_plan(site, prefix, group, module, row):
    """(values by Keras weight name, config changes) for a BatchNorm."""
    changes, notes = _batchnorm_conventions(site, prefix, group, module)
    values = _batchnorm_values(site, prefix, group, changes, notes, row)
    row.conversions.extend(notes)
    return values, changes


def _batchnorm_conventions(site, prefix, group, module):
    """(config changes, report notes): PyTorch's conventions for the Keras layer, from the
    module where given, else what the state dict's keys say (affine)."""
    layer, path = site.layer, site.path
    ours = isinstance(layer, BatchNorm)
    name = type(module).__name__ if module is not None else "BatchNorm"
    if set(group) - set(BATCHNORM_KEYS):
        raise KerasBNError(
            expected(
                f"PyTorch BatchNorm '{prefix}' holds BatchNorm tensors",
                f"only {', '.join(BATCHNORM_KEYS)}",
                f"also {sorted(set(group) - set(BATCHNORM_KEYS))}",
            )
        )
    tracks = "running_mean" in group and "running_var" in group
    if (module is not None and getattr(module, "track_running_stats", True) is False) or not tracks:
        raise KerasBNError(
            expected(
                f"PyTorch BatchNorm '{prefix}' has running statistics",
                "track_running_stats=True (running_mean and running_var in the state dict)",
                "track_running_stats=False: it normalizes with each batch's statistics at "
                "inference too, which a Keras BatchNorm never does (its inference is "
                "y = x*s + t, what fold_bn and export rely on)",
                "Use a normalization without running statistics in Keras (e.g. "
                "keras.layers.GroupNormalization for per-sample statistics), or train the "
                "PyTorch model with track_running_stats=True.",
            )
        )
    affine = "weight" in group
    if affine != ("bias" in group):
        raise KerasBNError(
            expected(
                f"PyTorch BatchNorm '{prefix}' has both weight and bias or neither",
                "affine=True (both) or affine=False (neither)",
                f"keys {sorted(group)}",
            )
        )
    changes, notes = {}, []
    if layer.scale != affine or layer.center != affine:
        changes.update(center=affine, scale=affine)
        notes.append(f"affine={affine}: center and scale set to {affine}")
    frozen = name == "FrozenBatchNorm2d"
    eps = None if module is None else float(module.eps)
    if frozen:
        changes["trainable"] = False
        notes.append("FrozenBatchNorm2d: trainable=False")
    elif module is not None:
        momentum = module.momentum
        keras_momentum = torch_momentum_to_keras(momentum)
        if keras_momentum is None and not ours:
            raise KerasBNError(
                expected(
                    f"PyTorch BatchNorm '{prefix}' (momentum=None, a cumulative average) into "
                    f"Keras layer '{path}'",
                    "a keras_bn.BatchNorm, the Keras layer with a cumulative average",
                    "keras.layers.BatchNormalization",
                    "Build that layer as keras_bn.BatchNorm.from_torch(momentum=None).",
                )
            )
        if keras_momentum != layer.momentum:
            changes["momentum"] = keras_momentum
        notes.append(
            f"momentum {momentum:g} -> Keras {keras_momentum:g}"
            if momentum is not None
            else "momentum=None: cumulative average"
        )
    if eps is not None:
        if eps != layer.epsilon:
            changes["epsilon"] = eps
        notes.append(f"eps {eps!r}")
    if name == "SyncBatchNorm":
        changes["synchronized"] = True
        notes.append("SyncBatchNorm: synchronized=True")
    if ours and module is not None and not frozen:
        if not layer.unbiased_variance:
            changes["unbiased_variance"] = True
        notes.append("unbiased running variance")
    elif not ours and module is not None and not frozen:
        notes.append(
            "Keras's layer updates a biased moving variance in further training (PyTorch's is "
            "unbiased); keras_bn.BatchNorm has both"
        )
    return changes, notes


def _batchnorm_values(site, prefix, group, changes, notes, row):
    """{Keras weight name: array} for a BatchNorm, each checked (finite, variances >= 0, one
    value per channel, a whole batch count)."""
    layer, path = site.layer, site.path
    ours = isinstance(layer, BatchNorm)
    values = {}
    for torch_name, keras_name in (
        ("weight", "gamma"),
        ("bias", "beta"),
        ("running_mean", "moving_mean"),
        ("running_var", "moving_variance"),
    ):
        if torch_name in group:
            key = _key(prefix, torch_name)
            array = group[torch_name]
            _check_finite(key, array)
            if torch_name == "running_var" and np.any(array < 0):
                raise KerasBNError(
                    expected(
                        f"State-dict entry '{key}' is a variance",
                        "values >= 0",
                        f"minimum {float(array.min()):g}",
                    )
                )
            channels = (layer.moving_mean.shape[0],)
            if tuple(array.shape) != channels:
                raise KerasBNError(
                    expected(
                        f"Shapes differ between '{key}' and Keras layer '{path}' {keras_name}",
                        str(channels),
                        str(tuple(array.shape)),
                        "Check that the Keras layer normalizes the PyTorch module's channels.",
                    )
                )
            values[keras_name] = array
            row.keys.append(key)
    if "num_batches_tracked" in group:
        key = _key(prefix, "num_batches_tracked")
        count = group["num_batches_tracked"]
        if count.shape != () or not np.isfinite(count) or count < 0 or count != np.round(count):
            raise KerasBNError(
                expected(
                    f"State-dict entry '{key}' counts batches",
                    "a whole number >= 0",
                    f"{count!r}",
                )
            )
        row.keys.append(key)
        if ours:
            values["num_batches_tracked"] = np.asarray(count, np.int64)
            if not layer.count_batches and (changes.get("momentum", layer.momentum) is not None):
                changes["count_batches"] = True
            notes.append(
                f"num_batches_tracked {int(count)}"
                + (f" (stored as {count.dtype}, read as int64)" if count.dtype.kind == "f" else "")
            )
        else:
            notes.append(
                f"num_batches_tracked {int(count)} not kept: Keras's layer has no batch count "
                "(PyTorch reads it only for momentum=None)"
            )
    return values


def from_torch_state_dict(
    keras_model: keras.Model,
    state_dict,
    *,
    mapping: dict[str, str] | None = None,
    strict: bool = True,
    torch_module=None,
    samples=None,
    channels_last: bool = True,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> tuple[keras.Model, InteropReport]:
    """Imports a PyTorch state dict into a copy of a Keras model with the same layers.

    Pairs each Keras layer that has weights (`Dense`, `Conv{1,2,3}D`, `DepthwiseConv{1,2}D`,
    `Conv{1,2,3}DTranspose`, `keras_bn.BatchNorm`, `keras.layers.BatchNormalization`) with a
    PyTorch module: by `mapping`, else in order (the state dict's order of modules against the
    Keras model's order of layers, kinds and shapes checked). Every tensor is used exactly once:
    a tensor or a layer left over is an error naming both sides (`strict=True`). Everything is
    checked before the copy is made; `keras_model` is never modified.

    Args:
        keras_model: A Sequential or Functional model, the PyTorch model's twin.
        state_dict: `module.state_dict()`, `torch.load(path, weights_only=True)`, a mapping of
            names to NumPy arrays, or the `torch.nn.Module` itself. A "module." prefix on every
            key (DataParallel) is removed.
        mapping: {PyTorch module key prefix: Keras layer path ("outer/inner/name")}.
        strict: If False, left-over tensors and layers are listed in the report instead.
        torch_module: The PyTorch model (given or implied when `state_dict` is a module). Its
            BatchNorms' momentum, eps, class and `track_running_stats` are converted; with
            `samples`, outputs are compared.
        samples: Inputs in PyTorch's layout (N, C, ...) for the comparison, one array or a list.
        channels_last: Whether the Keras model takes channels last: samples are moved there,
            and outputs of rank >= 3 back, for the comparison.
        rtol: Accepted difference, relative to the largest |output| of PyTorch.
        atol: Accepted absolute difference.

    Returns:
        `(model, report)`: the Keras model with PyTorch's values and conventions, and an
        `InteropReport`.

    Raises:
        KerasBNError: a shape or kind mismatch, a missing or left-over tensor, a non-finite
            value, a BatchNorm without running statistics, a layer type it cannot take.
        VerificationError: outputs differ from PyTorch's by more than the tolerance.

    Example:
        ```python
        state = torch.load("unet.pth", map_location="cpu", weights_only=True)
        keras_unet, report = keras_bn.from_torch_state_dict(keras_twin, state)
        print(report)
        ```
    """
    require_graph(keras_model, "from_torch_state_dict")
    report = InteropReport()
    arrays, report.stripped_prefix, modules = _tensors(state_dict)
    if torch_module is None and modules is not None:
        torch_module = state_dict
    elif torch_module is not None:
        modules = _modules(dict(torch_module.named_modules()), report.stripped_prefix)
    if modules is not None:
        report.conventions = "torch module"
    groups = _groups(arrays)
    sites = list(walk(keras_model))
    pairs = _pairs(sites, groups, modules, mapping, strict, report)
    plans = {}
    for site, prefix in pairs:
        kind = _keras_kind(site.layer)
        module = None if modules is None else modules.get(prefix)
        row = InteropRow(keras=site.path, torch=prefix, kind=kind, keys=[])
        if kind == "batchnorm":
            values, changes = _batchnorm_plan(site, prefix, groups[prefix], module, row)
        else:
            values, changes = _weighted_plan(site, prefix, groups[prefix], kind, module, row)
        plans[site.path] = (values, changes)
        report.rows.append(row)
    model = _rebuilt(keras_model, sites, plans)
    if torch_module is not None and samples is not None:
        report.verification = verify_against_torch(
            model, torch_module, samples, channels_last=channels_last, rtol=rtol, atol=atol
        )
    return model, report


def _rebuilt(keras_model, sites, plans):
    """A copy of `keras_model` whose planned layers have their config changes and values, and
    whose other layers have their own values."""
    changes_by_id = {id(site.layer): plans[site.path][1] for site in sites if site.path in plans}

    def clone_function(layer):
        changes = changes_by_id.get(id(layer))
        config = layer.get_config()
        if changes:
            config.update(changes)
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(keras_model, clone_function=clone_function, recursive=True)
    copy.name = keras_model.name
    for old, new in zip(sites, walk(copy)):
        if old.path in plans:
            values = plans[old.path][0]
            for variable in new.layer.weights:
                name = variable.name
                if name in values:
                    variable.assign(np.asarray(values[name]).astype(variable.dtype))
                else:  # a weight the state dict has no value for (a count): its own
                    original = [w for w in old.layer.weights if w.name == name]
                    if original:
                        variable.assign(original[0].numpy())
            new.layer.trainable = changes_by_id[id(old.layer)].get("trainable", old.layer.trainable)
        else:
            new.layer.set_weights(old.layer.get_weights())
    return copy


# ----------------------------------------------------------------------------------------------
# Export.


def to_torch_state_dict(keras_model: keras.Model, *, mapping: dict[str, str] | None = None,
                        as_numpy: bool = False, strict: bool = True) -> dict:  # fmt: skip
    """The weights of a Keras model as a PyTorch state dict, in PyTorch's layouts.

    The inverse of `from_torch_state_dict`: `Dense`, convolutions, transposed and depthwise
    convolutions and BatchNorms become `weight`/`bias`/`running_mean`/`running_var`/
    `num_batches_tracked` entries (0 where the Keras layer keeps no count).

    Args:
        keras_model: A Sequential or Functional model.
        mapping: {PyTorch module key prefix: Keras layer path}. Without it each layer's path is
            its prefix, with "/" as ".".
        as_numpy: NumPy arrays instead of torch tensors (no torch needed).
        strict: If True, a layer with weights of a kind this cannot write (LayerNormalization,
            Embedding, ...) is an error naming it; if False it is left out.

    Returns:
        An ordered {key: tensor} for `torch_module.load_state_dict`. The PyTorch BatchNorms must
        be built with the Keras layers' conventions: `momentum=keras_bn.keras_momentum_to_torch(
        layer.momentum)`, `eps=layer.epsilon`.

    Example:
        ```python
        torch_net.load_state_dict(keras_bn.to_torch_state_dict(keras_net, mapping=names))
        ```
    """
    require_graph(keras_model, "to_torch_state_dict")
    every = list(walk(keras_model))
    others = [s for s in every if s.layer.weights and not _keras_kind(s.layer)]
    if strict and others:
        raise KerasBNError(
            expected(
                "to_torch_state_dict writes every layer with weights (strict=True)",
                "Dense, Conv{1,2,3}D, DepthwiseConv{1,2}D, Conv{1,2,3}DTranspose and BatchNorm "
                "layers",
                ", ".join(f"'{s.path}' ({type(s.layer).__name__})" for s in others),
                "Pass strict=False to write the others and convert these yourself.",
            )
        )
    sites = [s for s in every if _keras_kind(s.layer) and s.layer.weights]
    names = {path: prefix for prefix, path in (mapping or {}).items()}
    if mapping is not None:
        unknown = set(names) - {s.path for s in sites}
        if unknown:
            raise KerasBNError(
                expected(
                    "mapping names Keras layers with weights",
                    f"paths among {[s.path for s in sites][:8]}",
                    f"{sorted(unknown)}",
                )
            )
    out = collections.OrderedDict()
    for site in sites:
        if mapping is not None and site.path not in names:
            continue
        prefix = names.get(site.path, site.path.replace("/", "."))
        layer, kind = site.layer, _keras_kind(site.layer)
        if kind == "batchnorm":
            for keras_name, torch_name in (
                ("gamma", "weight"),
                ("beta", "bias"),
                ("moving_mean", "running_mean"),
                ("moving_variance", "running_var"),
            ):
                variable = getattr(layer, keras_name, None)
                if variable is not None:
                    out[_key(prefix, torch_name)] = np.asarray(variable.numpy())
            tracked = getattr(layer, "num_batches_tracked", None)
            out[_key(prefix, "num_batches_tracked")] = np.asarray(
                0 if tracked is None else tracked.numpy(), np.int64
            )
        else:
            out[_key(prefix, "weight")] = np.ascontiguousarray(
                _kernel_to_torch(kind, np.asarray(layer.kernel.numpy()))
            )
            if getattr(layer, "bias", None) is not None:
                out[_key(prefix, "bias")] = np.asarray(layer.bias.numpy())
    if as_numpy:
        return out
    from keras_bn._environment import require_extra

    require_extra("torch", "to_torch_state_dict (as_numpy=False)")
    import torch

    return collections.OrderedDict((k, torch.from_numpy(np.array(v))) for k, v in out.items())


def torch_batchnorm_arguments(layer) -> dict:
    """The `torch.nn.BatchNorm*d` arguments that reproduce a Keras BatchNorm layer's conventions:
    {"eps", "momentum", "affine"}.

    Example:
        ```python
        torch.nn.BatchNorm2d(32, **keras_bn.torch_batchnorm_arguments(keras_layer))
        ```
    """
    if _keras_kind(layer) != "batchnorm":
        raise KerasBNError(
            expected("torch_batchnorm_arguments takes a BatchNorm", "a BatchNorm layer",
                     type(layer).__name__)
        )  # fmt: skip
    if layer.center != layer.scale:
        raise KerasBNError(
            expected(
                f"Keras BatchNorm '{layer.name}' has center and scale both on or both off",
                "center == scale (PyTorch's affine)",
                f"center={layer.center}, scale={layer.scale}",
            )
        )
    return {
        "eps": layer.epsilon,
        "momentum": keras_momentum_to_torch(layer.momentum),
        "affine": layer.scale,
    }


# ----------------------------------------------------------------------------------------------
# Verification.


def verify_against_torch(
    keras_model, torch_module, samples, *, channels_last=True, rtol=1e-5, atol=1e-6
) -> dict:
    """Compares a Keras model's inference outputs with a PyTorch module's (`eval()` mode,
    `torch.no_grad()`) on `samples` in PyTorch's layout; raises `VerificationError` beyond
    `atol + rtol * max|PyTorch output|`. The module's mode is restored afterwards."""
    import torch

    inputs = samples if isinstance(samples, (list, tuple)) else [samples]
    inputs = [np.asarray(x, np.float32) for x in inputs]
    was_training = torch_module.training
    torch_module.eval()
    try:
        with torch.no_grad():
            reference = torch_module(*[torch.from_numpy(x) for x in inputs])
    finally:
        torch_module.train(was_training)
    reference = [
        r.detach().cpu().numpy()
        for r in (reference if isinstance(reference, (list, tuple)) else [reference])
    ]
    keras_inputs = [np.moveaxis(x, 1, -1) if channels_last and x.ndim >= 3 else x for x in inputs]
    outputs = keras_model(
        keras_inputs if len(keras_inputs) > 1 else keras_inputs[0], training=False
    )
    outputs = [np.asarray(keras.ops.convert_to_numpy(o)) for o in keras.tree.flatten(outputs)]
    outputs = [np.moveaxis(o, -1, 1) if channels_last and o.ndim >= 3 else o for o in outputs]
    worst = None
    for ref, out in zip(reference, outputs):
        result = compare(ref, out)
        if worst is None or result.max_rel > worst.max_rel:
            worst = result
    passed = bool(np.isfinite(worst.max_abs) and worst.max_abs <= atol + rtol * worst.scale)
    summary = {
        "max_abs": worst.max_abs,
        "max_rel": worst.max_rel,
        "scale": worst.scale,
        "passed": passed,
    }
    if not passed:
        raise VerificationError(
            expected(
                "The Keras model's outputs match the PyTorch module's",
                f"max |diff| <= {atol:g} + {rtol:g} * {worst.scale:.4g}",
                f"max |diff| {worst.max_abs:.4g} ({worst.max_rel:.3g} relative)",
                "Check the pairing (mapping=), each layer's padding and activation, and "
                "channels_last.",
            )
        )
    return summary


__all__ = [
    "InteropReport",
    "InteropRow",
    "from_torch_state_dict",
    "to_torch_state_dict",
    "torch_batchnorm_arguments",
    "verify_against_torch",
]
