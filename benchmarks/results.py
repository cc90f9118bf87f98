"""Each benchmark's current results as data: `benchmarks/results/NAME.md`, replaced on every
complete run, with the machine, the date, the versions and the command. History lives in git.

    with results.recorded("fold"):
        ...  # everything printed goes to the terminal and, when the run completes, to the file

The documentation's benchmarks page includes these files.
"""

import contextlib
import datetime
import importlib.metadata
import io
import os
import platform
import sys

FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PACKAGES = ("keras", "tensorflow", "jax", "torch", "tf2onnx", "onnx", "onnxruntime", "numpy")


def machine() -> str:
    """CPU model, cores, memory and OS of this machine, in one line."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    memory = ""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as f:
            kib = int(next(l for l in f if l.startswith("MemTotal")).split()[1])
        memory = f", {kib / 2**20:.0f} GiB"
    return f"{cpu}, {os.cpu_count()} cores{memory}, {platform.system()} {platform.release()}"


def versions() -> str:
    """Python and the installed packages of PACKAGES that matter to these benchmarks."""
    found = [f"Python {platform.python_version()}"]
    for name in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found.append(f"{name} {importlib.metadata.version(name)}")
    return ", ".join(found)


class _Tee(io.TextIOBase):
    def __init__(self, stream):
        self.stream, self.buffer = stream, io.StringIO()

    def write(self, text):
        self.buffer.write(text)
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()


def as_markdown(text: str) -> str:
    """Printed output as Markdown: tables stay together, every other line is its own paragraph."""
    blocks, previous_table = [], False
    for line in text.strip().splitlines():
        table = line.startswith("|")
        if blocks and not (table and previous_table):
            blocks.append("")
        blocks.append(line)
        previous_table = table
    return "\n".join(blocks) + "\n"


@contextlib.contextmanager
def recorded(name: str):
    """Tees stdout while the block runs; on success writes `results/NAME.md` (atomically)."""
    tee = _Tee(sys.stdout)
    sys.stdout = tee
    try:
        yield
    finally:
        sys.stdout = tee.stream
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(["python", os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    header = (
        f"<!-- Written by {command}; replaced on every run. -->\n\n"
        f"- machine: {machine()}\n- date: {now}\n- versions: {versions()}\n"
        f"- command: `{command}`\n\n"
    )
    os.makedirs(FOLDER, exist_ok=True)
    path = os.path.join(FOLDER, f"{name}.md")
    with open(path + ".tmp", "w") as f:
        f.write(header + as_markdown(tee.buffer.getvalue()))
    os.replace(path + ".tmp", path)
    print(f"results written to {os.path.relpath(path)}", file=sys.stderr)
