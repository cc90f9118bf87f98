"""Model files as untrusted input, and atomic writes. No half-written output is ever left."""

import contextlib
import os
import tempfile
import warnings
import zipfile

import keras

from keras_bn.errors import KerasBNError, expected


def load_model_file(path, *, unsafe=False):
    """Loads a model file; `.keras` always with `safe_mode=True`.

    Legacy `.h5` files (whose loader ignored safe_mode in several Keras releases) and SavedModel
    directories can run code from the file; they are refused unless `unsafe=True`.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise KerasBNError(expected("The model file does not exist", "a path to a .keras file",
                                    repr(path)))
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "saved_model.pb")):
        # Keras 3 reads a SavedModel only as an opaque TFSMLayer: no layers to fold or inspect.
        raise KerasBNError(expected(
            "A SavedModel directory cannot be folded or exported: Keras 3 loads it as one opaque "
            "layer, and its loader can run code from the files", "a .keras file", repr(path),
            "Re-save the model from its source code with model.save('model.keras')."))
    if path.endswith((".h5", ".hdf5")):
        if not unsafe:
            raise KerasBNError(expected(
                "Refusing to load a legacy HDF5 file: its loader ignored safe_mode in several "
                "Keras releases, so code stored in it can run", "a .keras file", repr(path),
                "Re-save it as .keras from trusted code, or pass --unsafe if you trust the file."))
        warnings.warn(f"loading legacy HDF5 file {path!r} without safe_mode: code in it can run",
                      RuntimeWarning, stacklevel=2)
        return keras.saving.load_model(path, safe_mode=False, compile=False)
    if os.path.isdir(path):
        raise KerasBNError(expected("The model path is a directory", "a .keras file", repr(path)))
    if not path.endswith(".keras"):
        raise KerasBNError(expected("Unknown model file type", "a .keras file", repr(path)))
    if not zipfile.is_zipfile(path):
        raise KerasBNError(expected("The file is not a valid .keras archive (a zip file)",
                                    "a file written by model.save('x.keras')",
                                    f"{os.path.getsize(path)} bytes that are not a zip archive "
                                    "(corrupt or truncated?)"))
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            names = set(archive.namelist())
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise KerasBNError(expected("The .keras archive is damaged", "a complete zip archive",
                                    f"{type(error).__name__}: {error}")) from error
    if bad is not None or "config.json" not in names:
        raise KerasBNError(expected("The .keras archive is damaged", "config.json and weights",
                                    f"damaged member {bad!r}" if bad else f"members {sorted(names)}"))
    try:
        return keras.saving.load_model(path, safe_mode=True, compile=False)
    except Exception as error:  # Keras raises ValueError/TypeError with long texts
        text = str(error)
        if "safe_mode" in text or "Lambda" in text:
            raise KerasBNError(expected(
                "The model contains a Lambda layer (Python code); it is not loaded and its code "
                "does not run", "a model without Lambda layers", repr(path),
                "Replace the Lambda by a registered custom layer.")) from error
        raise KerasBNError(expected("The model could not be loaded", "a loadable .keras file",
                                    f"{type(error).__name__}: {text.splitlines()[0][:300]}")) from error


def check_output_path(output, *, inputs=()):
    """Refuses an output that would overwrite an input or lands in a missing directory."""
    output = os.path.abspath(os.fspath(output))
    for source in inputs:
        if source is None:
            continue
        source = os.path.abspath(os.fspath(source))
        same = source == output or (os.path.exists(source) and os.path.exists(output)
                                    and os.path.samefile(source, output))
        if same:
            raise KerasBNError(expected("The output would overwrite an input",
                                        "an output path different from every input", repr(output)))
    directory = os.path.dirname(output)
    if not os.path.isdir(directory):
        raise KerasBNError(expected("The output directory does not exist", "an existing directory",
                                    repr(directory), "Create it first."))
    if os.path.isdir(output):
        raise KerasBNError(expected("The output path is a directory", "a file path", repr(output)))
    return output


_pending = set()  # temporary files being written now


def remove_pending():
    """Removes the temporary files of writes in progress (for a signal handler that is about to
    end the process)."""
    for tmp in list(_pending):
        try:
            os.remove(tmp)
        except OSError:
            pass


@contextlib.contextmanager
def atomic_output(path, suffix):
    """Yields a temporary path in the destination directory; on success it is flushed, fsynced
    and renamed onto `path` with os.replace; on any failure it is removed."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".keras-bn-", suffix=suffix, dir=directory)
    os.close(fd)
    _pending.add(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        _pending.discard(tmp)
        if os.path.exists(tmp):
            os.remove(tmp)
