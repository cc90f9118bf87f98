"""What the `keras-bn` command prints on stderr: its own progress and errors, not TensorFlow's C++
log. Started by `keras_bn/__init__.py` before Keras (and so TensorFlow) is imported, when the
process is the command line.

TensorFlow 2.21 writes its C++ log through absl before any log configuration exists, so
`TF_CPP_MIN_LOG_LEVEL` no longer silences it: every process that imports TensorFlow prints lines
such as `I0000 00:00:1796 port.cc:153] oneDNN custom operations are on` and
`E0000 ... failed call to cuInit`. The console script therefore points file descriptor 2 at a pipe
and forwards every line except those log lines to the real stderr. `--verbose`, `--debug` or a
`TF_CPP_MIN_LOG_LEVEL` set by the user turns the filter off. In-process callers of
`keras_bn.export.cli.main` (a notebook, a test) keep their own stderr.
"""

import atexit
import os
import re
import sys
import threading

# absl's C++ prefix: severity, MMDD (0000 before absl::InitializeLog), time, thread, file:line.
_CPP_LOG = re.compile(
    rb"^(?:[IWEF]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [\w.+-]+:\d+\] "
    rb"|WARNING: All log messages before absl::InitializeLog\(\) is called"
    # cpu_feature_guard's second line, which has no prefix of its own.
    rb"|To enable the following instructions: .* rebuild TensorFlow"
    # The LiteRT interpreter's own notices.
    rb"|INFO: (?:Created TensorFlow Lite XNNPACK delegate for CPU|Initialized TensorFlow Lite runtime)\.$"
    # The LiteRT converter's quantizer, printed unprefixed.
    rb"|fully_quantize: \d+, inference_type: \d+, input_inference_type: \w+, output_inference_type: \w+$)"
)


def is_cpp_log(line: bytes) -> bool:
    """Whether `line` (bytes, one line) is a line of TensorFlow's C++ log."""
    return _CPP_LOG.match(line) is not None


def wants_quiet(argv, environ=None) -> bool:
    """Whether the command line filters TensorFlow's C++ log: not with `--verbose` or `--debug`,
    and not when the user set `TF_CPP_MIN_LOG_LEVEL` (they chose a level themselves)."""
    environ = os.environ if environ is None else environ
    return not ({"--verbose", "--debug"} & set(argv)) and "TF_CPP_MIN_LOG_LEVEL" not in environ


class _Filter:
    def __init__(self):
        sys.stderr.flush()
        self.real = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        self.read = read
        self.thread = threading.Thread(target=self._forward, name="keras-bn-stderr", daemon=True)
        self.thread.start()

    def _forward(self):
        pending = b""
        while chunk := os.read(self.read, 65536):
            *lines, pending = (pending + chunk).split(b"\n")
            kept = b"".join(line + b"\n" for line in lines if not is_cpp_log(line))
            if kept:
                os.write(self.real, kept)
        if pending and not is_cpp_log(pending):
            os.write(self.real, pending)
        os.close(self.read)

    def restore(self):
        """Points stderr back at the real one; lines still in the pipe are forwarded first."""
        sys.stderr.flush()
        os.dup2(self.real, 2)  # closes the pipe's last write end: the reader sees its end
        self.thread.join(timeout=5)
        os.close(self.real)


_active = None


def filter_stderr(argv) -> None:
    """Starts filtering TensorFlow's C++ log lines out of file descriptor 2, unless `argv` or the
    environment asks for them (`wants_quiet`). Ended by `restore_stderr`, at the latest at exit."""
    global _active
    if _active is None and wants_quiet(argv):
        _active = _Filter()
        atexit.register(restore_stderr)


def restore_stderr() -> None:
    """Ends the filter: lines still in the pipe are forwarded, then stderr is the real one again
    (the command is done, or a signal handler is about to `os._exit`)."""
    global _active
    if _active is not None:
        active, _active = _active, None
        active.restore()
