"""Model files as untrusted input, and atomic writes. No half-written output is ever left.

Reading: a `.keras` archive is bounded before anything in it is read or decompressed (member
count, declared sizes, overlapping entries, the weights' declared dataset sizes), then loaded by
Keras with `safe_mode=True`. Limits are in `ArchiveLimits`; the command line can raise them.

Writing: the new file is written as an unnamed file in the destination directory (Linux
`O_TMPFILE`), so a process killed while writing, even by SIGKILL, leaves no trace. Once complete
it is linked to its name (`linkat`); a file it replaces is replaced by `rename` from a temporary
name. A kill in the instant between those two leaves a `.keras-bn-<pid>-<tag>-*` file, which a
later write into that directory removes once it is stale (`remove_stale_temporaries`).
"""

import contextlib
import contextvars
import dataclasses
import errno
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import socket
import stat
import tempfile
import threading
import time
import warnings
import zipfile

from keras_bn.errors import KerasBNError, expected, one_line

GiB = 1 << 30
MiB = 1 << 20


@dataclasses.dataclass(frozen=True)
class ArchiveLimits:
    """Bounds checked on a `.keras` archive before any of it is decompressed.

    Defaults fit models of up to about 2 billion float32 parameters; raise them for bigger ones
    (`keras-bn --max-archive-gib N`)."""

    max_members: int = 1000  # Keras writes 3 (config.json, metadata.json, model.weights.h5)
    max_total_bytes: int = 8 * GiB  # sum of the members' declared uncompressed sizes
    max_config_bytes: int = 64 * MiB  # config.json and metadata.json
    max_config_depth: int = 200  # nesting of config.json (Keras's own reader recurses)
    max_layers: int = 5_000  # layers in config.json, nested models included (NASNetLarge: 1041)
    max_ratio: float = 100.0  # declared / stored bytes of a member over 64 MiB (Keras writes 1)


DEFAULT_LIMITS = ArchiveLimits()


def _refuse(what, expected_value, received, fix=None):
    raise KerasBNError(expected(what, expected_value, received, fix))


def _check_directory(infos, limits):
    """Checks a .keras archive's zip directory against `limits`: member count, declared size,
    overlapping entries, config size, compression ratio. Returns the members by name."""
    raise_limit = (
        "If the file is trusted and really this large, raise the limit (--max-archive-gib)."
    )
    if len(infos) > limits.max_members:
        _refuse(
            "The .keras archive has too many members",
            f"at most {limits.max_members}",
            f"{len(infos)} members",
        )
    total = sum(i.file_size for i in infos)
    if total > limits.max_total_bytes:
        _refuse(
            "The .keras archive declares more data than allowed",
            f"at most {limits.max_total_bytes / GiB:g} GiB uncompressed",
            f"{total / GiB:.3g} GiB in {len(infos)} members",
            raise_limit,
        )
    by_offset = sorted(infos, key=lambda i: i.header_offset)
    for a, b in zip(by_offset, by_offset[1:]):
        if a.header_offset + a.compress_size > b.header_offset:
            _refuse(
                "The .keras archive has overlapping entries (a zip bomb)",
                "a zip archive whose members do not share data",
                f"'{a.filename}' and '{b.filename}' overlap",
            )
    names = {i.filename: i for i in infos}
    if "config.json" not in names:
        _refuse(
            "The .keras archive is damaged",
            "config.json and weights",
            f"members {sorted(names)[:10]}",
        )
    for name in ("config.json", "metadata.json"):
        if name in names and names[name].file_size > limits.max_config_bytes:
            _refuse(
                f"The archive's {name} is too large",
                f"at most {limits.max_config_bytes / MiB:g} MiB",
                f"{names[name].file_size / MiB:.4g} MiB",
            )
    for info in infos:
        if info.file_size > 64 * MiB and info.file_size > limits.max_ratio * max(
            info.compress_size, 1
        ):
            _refuse(
                "The .keras archive has a member compressed beyond any real data (a zip bomb)",
                f"at most {limits.max_ratio:g} times its stored bytes",
                f"'{info.filename}': {info.file_size} bytes from {info.compress_size}",
            )
    return names


def check_archive(path, limits=DEFAULT_LIMITS):
    """Refuses a `.keras` archive whose directory promises more than `limits` allow, or whose
    entries overlap (a zip bomb), reading only the zip directory and the HDF5 metadata of the
    weights. Returns the parsed config.json."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            names = _check_directory(infos, limits)
            config_text = archive.read("config.json")
            weight_bytes = None
            if "model.weights.h5" in names:
                with _member_file(path, archive, names["model.weights.h5"]) as stream:
                    weight_bytes = _check_weights(stream, names["model.weights.h5"].file_size)
            elif "model.weights.npz" in names:  # Keras reads this form too
                member = names["model.weights.npz"]
                with (
                    _member_file(path, archive, member) as stream,
                    zipfile.ZipFile(stream) as inner,
                ):
                    weight_bytes = check_npz(
                        inner,
                        "archive's model.weights.npz",
                        ArrayLimits(max_total_bytes=limits.max_total_bytes),
                    )
    except (zipfile.BadZipFile, OSError, EOFError, KeyError) as error:
        raise KerasBNError(
            expected(
                "The .keras archive is damaged",
                "a complete zip archive",
                f"{type(error).__name__}: {one_line(error)}",
            )
        ) from error
    try:
        config = json.loads(config_text)
    except (ValueError, RecursionError) as error:
        raise KerasBNError(
            expected(
                "The archive's config.json is not JSON Keras can read",
                "a file written by model.save('x.keras')",
                f"{type(error).__name__}: {one_line(error)}",
            )
        ) from None
    _check_config(config, limits, weight_bytes)
    return config


# Values a layer's weights hold at least, from its config and its build_config's input shape:
# a config declaring a layer of 2.5 GB behind 892 bytes is refused before Keras builds it.
def _implied_values(layer):
    config = layer.get("config") or {}
    shape = (layer.get("build_config") or {}).get("input_shape")
    last = shape[-1] if isinstance(shape, list) and shape and isinstance(shape[-1], int) else None
    kind = layer.get("class_name")
    try:
        if kind == "Embedding":
            return int(config["input_dim"]) * int(config["output_dim"])
        if kind == "Dense" and last:
            return last * int(config["units"])
        if kind in ("Conv1D", "Conv2D", "Conv3D") and last:
            kernel = 1
            for k in config["kernel_size"]:
                kernel *= int(k)
            return kernel * last // max(int(config.get("groups", 1)), 1) * int(config["filters"])
    except (KeyError, TypeError, ValueError):
        return 0
    return 0


def _check_config(config, limits, weight_bytes):
    """Refuses a config.json nested deeper than `limits.max_config_depth`, with more than
    `limits.max_layers` layers, or declaring layers whose weights would hold more values than
    the archive's weights file holds (at least 1 byte a value: float8 is the smallest)."""
    layers, implied = 0, 0
    stack = [(config, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > limits.max_config_depth:
            _refuse(
                "The archive's config.json is nested too deeply",
                f"at most {limits.max_config_depth} levels",
                "deeper",
            )
        if isinstance(node, dict):
            if isinstance(node.get("layers"), list):  # a model's config: its layers
                members = [layer for layer in node["layers"] if isinstance(layer, dict)]
                layers += len(members)
                implied += sum(_implied_values(layer) for layer in members)
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
    if layers > limits.max_layers:
        _refuse(
            "The archive's config.json declares too many layers",
            f"at most {limits.max_layers}",
            f"{layers}",
        )
    if weight_bytes is not None and implied > max(weight_bytes, MiB):
        _refuse(
            "The archive's config.json declares layers larger than its weights",
            f"layers whose weights fit in the {weight_bytes} bytes of weights the archive holds",
            f"at least {implied} values",
        )


class _Window(io.RawIOBase):
    """Bytes `start` to `start + size` of the open binary file `handle`, as a seekable file."""

    def __init__(self, handle, start, size):
        self.handle, self.start, self.size, self.position = handle, start, size, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.position

    def seek(self, offset, whence=io.SEEK_SET):
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, buffer):
        count = max(0, min(len(buffer), self.size - self.position))
        self.handle.seek(self.start + self.position)
        data = self.handle.read(count)
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)


@contextlib.contextmanager
def _member_file(path, archive, info):
    """A seekable file object over archive member `info` that never holds it whole in memory.

    A stored member (Keras writes .keras archives uncompressed) is a window on the archive file
    itself: h5py's random reads cost nothing (ZipExtFile would re-read the member from its start
    at every backward seek, an order of magnitude slower on a model's weights). A compressed
    one is read into memory, which its ratio check has bounded."""
    if info.compress_type != zipfile.ZIP_STORED:
        yield io.BytesIO(archive.read(info))
        return
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        header = handle.read(30)  # the local file header: its name and extra field lengths
        if len(header) < 30 or header[:4] != b"PK\x03\x04":
            raise zipfile.BadZipFile(f"bad local header for {info.filename!r}")
        start = info.header_offset + 30 + int.from_bytes(header[26:28], "little")
        start += int.from_bytes(header[28:30], "little")
        yield _Window(handle, start, info.file_size)


def _check_weights(stream, size):
    """Every HDF5 dataset must fit in the bytes the file holds: a dataset declared larger than
    its file has no data behind it (HDF5 would fill it), and reading it would allocate the
    declared size. h5py reads shapes without reading data, from `stream` (a seekable file
    object, `_member_file`). Returns the declared bytes."""
    import h5py

    try:
        handle = h5py.File(stream, "r")
    except Exception as error:  # h5py raises OSError subclasses with long texts
        raise KerasBNError(
            expected(
                "The archive's model.weights.h5 is not an HDF5 file",
                "weights written by model.save('x.keras')",
                one_line(error),
            )
        ) from error
    declared = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            count = 1
            for d in obj.shape or ():
                count *= d
            declared.append((name, count * obj.dtype.itemsize))

    with handle:
        handle.visititems(visit)
    total = sum(n for _, n in declared)
    if total > size:
        name, largest = max(declared, key=lambda x: x[1])
        _refuse(
            "The archive's weights declare more data than the file holds",
            f"at most {size} bytes of weights",
            f"{total} bytes declared, the largest '{name}' with {largest} bytes",
        )
    return total


def check_regular_file(path, what):
    """Refuses a path that is not a regular file (a FIFO, which would block for ever, a device
    such as /dev/zero, which never ends, a socket, a folder) before anything opens it."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        _refuse(f"The {what} does not exist", "a path to an existing file", repr(path))
    except OSError as error:
        _refuse(f"The {what} cannot be read", "a readable file", f"{path!r}: {error.strerror}")
    if not stat.S_ISREG(info.st_mode):
        kind = (
            "a folder"
            if stat.S_ISDIR(info.st_mode)
            else "a FIFO"
            if stat.S_ISFIFO(info.st_mode)
            else "a device or socket"
        )
        _refuse(f"The {what} is not a regular file", "a regular file", f"{path!r}, {kind}")
    return info


# ------------------------------------------------------------------------------------------------
# Arrays (samples, calibration data, labels): .npy and .npz files


@dataclasses.dataclass(frozen=True)
class ArrayLimits:
    """Bounds checked on a `.npy`/`.npz` file before any array in it is read: what the arrays
    declare (shape x dtype), in all and against the bytes behind them (`keras-bn
    --max-samples-gib` raises `max_total_bytes`)."""

    max_total_bytes: int = 4 * GiB  # declared bytes of all the arrays of one file
    max_arrays: int = 1000  # members of an .npz
    max_ratio: float = 1000.0  # declared bytes / stored bytes of a compressed .npz member


DEFAULT_ARRAY_LIMITS = ArrayLimits()


def _array_header(stream, where):
    """`(shape, dtype)` from the header of the .npy data in `stream`; a `KerasBNError` for a
    damaged header or a dtype that is not plain numbers (object arrays would need pickle)."""
    import numpy as np

    try:
        version = np.lib.format.read_magic(stream)
        read = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, _, dtype = read(stream)
    except zipfile.BadZipFile:
        raise  # a damaged .npz member: "could not be read" (load_arrays)
    except Exception as error:  # ValueError for a bad magic string or header, EOFError
        raise KerasBNError(
            expected(
                f"{where} is not .npy data",
                "arrays written by numpy.save / numpy.savez",
                f"{type(error).__name__}: {one_line(error)}",
            )
        ) from None
    if dtype.hasobject or dtype.kind not in "biuf":
        raise KerasBNError(
            expected(
                f"{where} does not hold numbers",
                "an array of integers or floats (no objects, strings or records)",
                f"dtype {dtype}",
            )
        )
    return tuple(shape), dtype


def _declared(shape, dtype):
    count = 1
    for d in shape:
        count *= int(d)
    return count * dtype.itemsize


def check_npz(archive, what, limits=DEFAULT_ARRAY_LIMITS):
    """Checks the open `.npz` `archive` (a `zipfile.ZipFile`) against `limits`, reading only the
    zip directory and each array's header; returns the declared bytes of all its arrays."""
    infos = archive.infolist()
    if len(infos) > limits.max_arrays:
        _refuse(
            f"The {what} holds too many arrays", f"at most {limits.max_arrays}", f"{len(infos)}"
        )
    total = 0
    for info in infos:
        where = f"Member '{info.filename}' of the {what}"
        if not info.filename.endswith(".npy"):
            _refuse(f"{where} is not an array", "an .npz of .npy members", info.filename)
        with archive.open(info) as member:
            shape, dtype = _array_header(member, where)
        declared = _declared(shape, dtype)
        if declared > info.file_size:
            _refuse(
                f"{where} declares more data than it holds",
                f"at most {info.file_size} bytes",
                f"shape {shape} of {dtype}: {declared} bytes",
            )
        if declared > MiB and declared > limits.max_ratio * max(info.compress_size, 1):
            _refuse(
                f"{where} is compressed beyond any real data (a zip bomb)",
                f"at most {limits.max_ratio:g} times its {info.compress_size} stored bytes",
                f"{declared} bytes",
            )
        total += declared
    if total > limits.max_total_bytes:
        _refuse(
            f"The {what} declares more data than allowed",
            f"at most {limits.max_total_bytes / GiB:g} GiB",
            f"{total / GiB:.3g} GiB",
            f"If the file is trusted and really this large, raise the limit ({_SAMPLES_FLAG}).",
        )
    return total


def load_arrays(path, what="samples file", limits=DEFAULT_ARRAY_LIMITS):
    """The array of a `.npy` file, or {name: array} of a `.npz` file, at `path`, read only after
    its declared sizes are checked against `limits` and against the bytes the file holds (a
    1 MB .npz can declare gigabytes). Never unpickles. Anything wrong is a `KerasBNError`."""
    import numpy as np

    path = os.fspath(path)
    size = check_regular_file(path, what).st_size
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                check_npz(archive, what, limits)
                data = np.load(path, allow_pickle=False)
                with data:
                    return {name: data[name] for name in data.files}
        with open(path, "rb") as f:
            shape, dtype = _array_header(f, f"The {what}")
            declared, header = _declared(shape, dtype), f.tell()
        if header + declared > size:
            _refuse(
                f"The {what} is shorter than its header declares (truncated?)",
                f"{header + declared} bytes",
                f"{size} bytes",
            )
        if declared > limits.max_total_bytes:
            _refuse(
                f"The {what} declares more data than allowed",
                f"at most {limits.max_total_bytes / GiB:g} GiB",
                f"{declared / GiB:.3g} GiB",
                f"If the file is trusted and really this large, raise the limit ({_SAMPLES_FLAG}).",
            )
        return np.load(path, allow_pickle=False)
    except KerasBNError:
        raise
    except Exception as error:  # a bad CRC (BadZipFile), a damaged member, a read error
        raise KerasBNError(
            expected(
                f"The {what} could not be read",
                "a .npy or .npz file of numbers (no pickles)",
                f"{type(error).__name__}: {one_line(error)}",
            )
        ) from None


_SAMPLES_FLAG = "--max-samples-gib"


def _load_legacy_h5(path, unsafe):
    """A legacy `.h5` model, only with `unsafe=True`: its loader can run code from the file."""
    import keras

    check_regular_file(path, "model file")
    if not unsafe:
        raise KerasBNError(
            expected(
                "Refusing to load a legacy HDF5 file: its loader ignored safe_mode in several "
                "Keras releases, so code stored in it can run",
                "a .keras file",
                repr(path),
                "Re-save it as .keras from trusted code, or pass --unsafe if you trust the file.",
            )
        )
    warnings.warn(
        f"loading legacy HDF5 file {path!r} without safe_mode: code in it can run",
        RuntimeWarning,
        stacklevel=3,
    )
    try:
        return keras.saving.load_model(path, safe_mode=False, compile=False)
    except Exception as error:  # an unknown custom layer, a file Keras cannot read
        raise KerasBNError(
            expected(
                "The model could not be loaded",
                "an HDF5 model file Keras 3 can rebuild (custom layers need their code: "
                "load it yourself with custom_objects and save it as .keras)",
                f"{type(error).__name__}: {one_line(error, limit=None)}",
            )
        ) from error


def load_model_file(path, *, unsafe=False, limits=DEFAULT_LIMITS):
    """Loads a model file as untrusted input; `.keras` always with `safe_mode=True`, after
    `check_archive` has bounded what the archive declares.

    Legacy `.h5` files (whose loader ignored safe_mode in several Keras releases) and SavedModel
    directories can run code from the file; they are refused unless `unsafe=True`.

    Args:
        path: A `.keras` file (or, with `unsafe=True`, a legacy `.h5` file).
        unsafe: Allow legacy `.h5` files.
        limits: An `ArchiveLimits`: members, sizes, config depth and layers the archive may
            declare.

    Returns:
        The `keras.Model`.

    Raises:
        KerasBNError: A missing or unreadable file, an archive beyond `limits`, a format that
            can run code (without `unsafe=True`), or a model Keras cannot load; one line that
            names the problem.

    Example:
        ```python
        from keras_bn import export

        model = export.load_model_file("downloaded.keras")
        ```
    """
    import keras

    path = os.fspath(path)
    if not os.path.exists(path):
        raise KerasBNError(
            expected("The model file does not exist", "a path to a .keras file", repr(path))
        )
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "saved_model.pb")):
        # Keras 3 reads a SavedModel only as an opaque TFSMLayer: no layers to fold or inspect.
        raise KerasBNError(
            expected(
                "A SavedModel directory cannot be folded or exported: Keras 3 loads it as one opaque "
                "layer, and its loader can run code from the files",
                "a .keras file",
                repr(path),
                "Re-save the model from its source code with model.save('model.keras').",
            )
        )
    if path.endswith((".h5", ".hdf5")):
        return _load_legacy_h5(path, unsafe)
    if os.path.isdir(path):
        raise KerasBNError(expected("The model path is a directory", "a .keras file", repr(path)))
    check_regular_file(path, "model file")  # a FIFO would block, /dev/zero never end
    if not path.endswith(".keras"):
        raise KerasBNError(expected("Unknown model file type", "a .keras file", repr(path)))
    if not zipfile.is_zipfile(path):
        raise KerasBNError(
            expected(
                "The file is not a valid .keras archive (a zip file)",
                "a file written by model.save('x.keras')",
                f"{os.path.getsize(path)} bytes that are not a zip archive (corrupt or truncated?)",
            )
        )
    config = check_archive(path, limits)
    try:
        return keras.saving.load_model(path, safe_mode=True, compile=False)
    except Exception as error:  # Keras raises ValueError/TypeError with long texts
        from keras_bn.errors import plain_text

        text = plain_text(error)
        if "safe_mode" in text or "safe mode" in text:
            has_lambda = '"Lambda"' in json.dumps(config)
            raise KerasBNError(
                expected(
                    "Keras's safe mode refused part of the model; nothing in it was run"
                    + (
                        " (the model contains a Lambda layer, which holds Python code)"
                        if has_lambda
                        else ""
                    ),
                    "a model Keras loads with safe_mode=True",
                    one_line(text),
                    "Replace the Lambda by a registered custom layer."
                    if has_lambda
                    else "Load it yourself with keras.saving.load_model(..., safe_mode=False) only if "
                    "you trust the file.",
                )
            ) from error
        raise KerasBNError(
            expected(
                "The model could not be loaded",
                "a loadable .keras file",
                f"{type(error).__name__}: {one_line(text, limit=None)}",
            )
        ) from error


def check_output_path(output, *, inputs=(), suffix=None):
    """Refuses, before any work, an output that would overwrite an input, lacks `suffix`, or lands
    in a missing, read-only or unwritable directory, or on a read-only file."""
    output = os.path.abspath(os.fspath(output))
    for source in inputs:
        if source is None:
            continue
        source = os.path.abspath(os.fspath(source))
        same = source == output or (
            os.path.exists(source) and os.path.exists(output) and os.path.samefile(source, output)
        )
        if same:
            raise KerasBNError(
                expected(
                    "The output would overwrite an input",
                    "an output path different from every input",
                    f"{output!r}, which is also an input",
                )
            )
    if suffix and not output.endswith(suffix):
        raise KerasBNError(
            expected(
                f"The output must be a {suffix} file", f"a path ending in {suffix}", repr(output)
            )
        )
    directory = os.path.dirname(output)
    if not os.path.isdir(directory):
        raise KerasBNError(
            expected(
                "The output directory does not exist",
                "an existing directory",
                repr(directory),
                "Create it first.",
            )
        )
    if os.path.isdir(output):
        raise KerasBNError(expected("The output path is a directory", "a file path", repr(output)))
    if os.path.lexists(output) and not stat.S_ISREG(os.lstat(output).st_mode):
        raise KerasBNError(
            expected(
                "The output path exists and is not a regular file (a FIFO, device, socket or link)",
                "a new path or a regular file to replace",
                repr(output),
            )
        )
    # Mode bits too: root may write anywhere, but a directory or file made read-only says no.
    if not os.access(directory, os.W_OK | os.X_OK) or not os.stat(directory).st_mode & 0o222:
        raise KerasBNError(
            expected(
                "The output directory is not writable",
                "a directory this user can write",
                repr(directory),
            )
        )
    if os.path.exists(output) and not os.stat(output).st_mode & 0o222:
        raise KerasBNError(
            expected(
                "The output file is read-only",
                "a writable file or a new path",
                repr(output),
                "Remove it or make it writable first.",
            )
        )
    return output


_TEMP_PREFIX = ".keras-bn-"
# How long a temporary of a dead writer is left alone before a write into its directory removes
# it: long enough that no file of a run in progress (a clock skewed on a network filesystem, a
# writer in another PID namespace whose PID happens to be free here) is ever touched.
STALE_AFTER_S = 600
_pending = set()  # named temporary files of writes in progress (fallback path, rename window)
_umask_lock = threading.Lock()
_inputs = contextvars.ContextVar("keras_bn_run_inputs", default=())


@contextlib.contextmanager
def run_inputs(paths):
    """Within the block, the removal of stale temporaries never touches `paths` (the files a run
    reads), whatever their names: the command line wraps each command in it."""
    token = _inputs.set(tuple(os.fspath(p) for p in paths if p is not None))
    try:
        yield
    finally:
        _inputs.reset(token)


def _writer_tag():
    """8 hex digits naming this machine's boot and PID namespace: a PID in a temporary's name
    says whether its writer still runs only where this tag matches."""
    parts = [socket.gethostname()]
    for source in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        with contextlib.suppress(OSError):
            parts.append(
                os.readlink(source) if source.endswith("/pid") else open(source).read().strip()
            )
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:8]


_WRITER_TAG = _writer_tag()
# .keras-bn-<pid>-<writer tag>-<12 random hex digits><suffix>: nothing else is ever removed.
_TEMP_NAME = re.compile(r"\.keras-bn-(\d{1,10})-([0-9a-f]{8})-[0-9a-f]{12}(\.[A-Za-z0-9]{1,8})?\Z")


def remove_pending():
    """Removes the named temporary files of writes in progress and the private temporary folder
    of a Keras load or save (`private_tempdir`), for a signal handler that is about to end the
    process."""
    for tmp in list(_pending):
        try:
            if os.path.isdir(tmp) and not os.path.islink(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                os.remove(tmp)
        except OSError:
            pass


_TEMPDIR_SUFFIX = ".tmp"  # a private temporary folder: .keras-bn-<pid>-<tag>-<12 hex>.tmp


@contextlib.contextmanager
def private_tempdir():
    """Within the block, Python's `tempfile`, and so Keras's saving library, works in a folder
    of its own under $TMPDIR, `.keras-bn-<pid>-<tag>-<12 hex>.tmp`, removed when the block ends,
    by the command line's SIGTERM/SIGINT handler (`remove_pending`), or, after a SIGKILL, by a
    later run once stale (`remove_stale_temporaries`). Keras extracts a whole `.keras` archive
    with assets into `tempfile.mkdtemp()` while it loads it, and removes it only if it is not
    killed. The environment's TMPDIR points there too, for native code (onnxruntime writes a
    `.ses` file into $TMPDIR for each session). For the command line: both are process-wide."""
    base = tempfile.gettempdir()
    remove_stale_temporaries(base)
    path = _temp_name(base, _TEMPDIR_SUFFIX)
    try:
        os.mkdir(path, 0o700)
    except OSError:  # an unwritable $TMPDIR: Keras's own temporaries go where they would
        yield base
        return
    _pending.add(path)
    previous, previous_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = path
    os.environ["TMPDIR"] = path  # for native code: onnxruntime writes $TMPDIR/.ses per session
    try:
        yield path
    finally:
        tempfile.tempdir = previous
        if previous_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = previous_env
        shutil.rmtree(path, ignore_errors=True)
        _pending.discard(path)


def _writer_runs(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's live process, or not a PID we can ask about
    return True


def remove_stale_temporaries(directory, keep=()):
    """Removes the temporary files a killed keras-bn writer left in `directory` (killed in the
    instant between naming its output and renaming it). A file is removed only when all hold:

    - its name is exactly `_TEMP_NAME`: `.keras-bn-<pid>-<tag>-<12 hex digits><suffix>`;
    - its tag is this machine's boot and PID namespace (`_writer_tag`), so the PID means here
      what it meant to the writer;
    - no process with that PID runs;
    - it is a regular file, or a `.tmp` folder (`private_tempdir`), unchanged for
      `STALE_AFTER_S` seconds;
    - it is none of `keep`, nor of the paths of an enclosing `run_inputs` (the run's inputs).
    """
    keep = [os.fspath(k) for k in keep if k is not None] + list(_inputs.get())
    now = time.time()
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        match = _TEMP_NAME.match(name)
        if match is None or match.group(2) != _WRITER_TAG:
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or _writer_runs(pid):
            continue
        path = os.path.join(directory, name)
        try:
            info = os.lstat(path)
            folder = stat.S_ISDIR(info.st_mode) and name.endswith(_TEMPDIR_SUFFIX)
            if not (stat.S_ISREG(info.st_mode) or folder) or now - info.st_mtime < STALE_AFTER_S:
                continue
            if any(os.path.exists(k) and os.path.samefile(k, path) for k in keep):
                continue
            if folder:
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)
        except OSError:
            continue


def _new_file_mode(path):
    """The mode of the file being replaced, or 0o666 less the umask for a new one."""
    if os.path.exists(path):
        return stat.S_IMODE(os.stat(path).st_mode)
    with _umask_lock:  # os.umask can only be read by setting it
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def _temp_name(directory, suffix):
    name = f"{_TEMP_PREFIX}{os.getpid()}-{_WRITER_TAG}-{secrets.token_hex(6)}{suffix}"
    return os.path.join(directory, name)


def _link_unnamed_file(handle, target, directory_fd):
    """`linkat(AT_SYMLINK_FOLLOW)` of the O_TMPFILE file `handle` to `target`. CPython calls
    `linkat` only when given a directory fd: plain `os.link` calls `link(2)`, which does not
    follow /proc's magic link and fails with EXDEV on Linux."""
    os.link(
        f"/proc/self/fd/{handle.fileno()}", target, src_dir_fd=directory_fd, follow_symlinks=True
    )


def _publish_unnamed_file(handle, path, directory, directory_fd, suffix, mode):
    """Gives the complete O_TMPFILE file `handle` the name `path`.

    A new `path` is linked directly: no other name ever exists. An existing one is replaced by a
    link under a temporary name, then `rename`: a kill in that instant leaves a
    `.keras-bn-<pid>-<tag>-*` file that a later write into the directory removes once stale
    (`remove_stale_temporaries`). Where the kernel refuses the link (some sandboxes), a copy into
    a named temporary file, then `rename`."""
    if not os.path.lexists(path):
        try:
            _link_unnamed_file(handle, path, directory_fd)
            return
        except FileExistsError:
            pass  # created meanwhile: replace it below
        except OSError as error:
            if error.errno not in (errno.EXDEV, errno.EPERM, errno.ENOENT, errno.EOPNOTSUPP):
                raise
    named = _temp_name(directory, suffix)
    _pending.add(named)
    try:
        try:
            _link_unnamed_file(handle, named, directory_fd)
        except OSError as error:
            if error.errno not in (errno.EXDEV, errno.EPERM, errno.ENOENT, errno.EOPNOTSUPP):
                raise
            fd = os.open(named, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            with os.fdopen(fd, "wb") as copy:
                handle.seek(0)
                shutil.copyfileobj(handle, copy, 16 * MiB)
                copy.flush()
                os.fchmod(copy.fileno(), mode)
                os.fsync(copy.fileno())
        os.replace(named, path)
    finally:
        _pending.discard(named)
        with contextlib.suppress(OSError):
            os.remove(named)


def _write_failed(path, error):
    """The `KerasBNError` for the filesystem refusing a write: the machine's problem, not ours."""
    return KerasBNError(
        expected(
            f"Could not write {path!r}; nothing was written",
            "room to write the output (disk space, quota, file size limit)",
            f"{type(error).__name__}: {error.strerror or error}",
            "Free some space or write elsewhere.",
        )
    )


@contextlib.contextmanager
def atomic_output(path, suffix="", keep=()):
    """Yields a binary file object; on success its content becomes `path` atomically (fsynced, with
    the mode of the file it replaces or 0o666 less the umask). On failure, or if the process is
    killed at any moment, `path` and its directory stay as they were. `keep`: the run's input
    files, which the removal of stale temporaries never touches, whatever their names."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    remove_stale_temporaries(directory, keep)
    mode = _new_file_mode(path)
    named = None
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR, mode)
    except (AttributeError, OSError) as error:  # not Linux, or a filesystem without O_TMPFILE
        if isinstance(error, OSError) and error.errno not in (
            errno.EOPNOTSUPP,
            errno.EISDIR,
            errno.EINVAL,
            errno.ENOENT,
        ):
            raise
        named = _temp_name(directory, suffix)
        fd = os.open(named, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
        _pending.add(named)
    directory_fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            # Closing flushes what is still buffered: a full disk can fail there too.
            with os.fdopen(fd, "w+b") as handle:
                yield handle
                handle.flush()
                os.fchmod(handle.fileno(), mode)
                os.fsync(handle.fileno())
                if named is None:
                    _publish_unnamed_file(handle, path, directory, directory_fd, suffix, mode)
        except OSError as error:  # a full disk, a quota, a file size limit
            raise _write_failed(path, error) from None
        if named is not None:
            os.replace(named, path)
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)
        if named is not None:
            _pending.discard(named)
            with contextlib.suppress(OSError):
                os.remove(named)


def save_keras(model, handle):
    """`model` as a `.keras` archive into the open binary file `handle`."""
    from keras_bn import _keras_internals as internals

    internals.save_keras_to_file_object(model, handle)
