"""Runs an ONNX file from outside in onnxruntime, in a process of its own (`onnx_file.run`).

Executed by path (`python ort_worker.py JOB_DIR`), never imported: it needs only NumPy and
onnxruntime, not Keras or TensorFlow. The parent sets its address-space limit and its time limit;
this process ends with its parent (PR_SET_PDEATHSIG), so a parent killed by a signal leaves no
onnxruntime running.

JOB_DIR holds `model.onnx`, `feeds.npz` (`"<feed>/<input name>"` arrays) and `job.json`
(`{"outputs": [names], "runs": [[feed, "disabled" | "enabled"], ...]}`). The outputs go to
`outputs.npz` as `"<run>/<output index>"`; an error to `error.json` (`{"type", "message"}`), with
exit status 3.
"""

import ctypes
import json
import os
import signal
import sys


def _die_with_parent():
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(job_dir):
    _die_with_parent()
    import numpy as np
    import onnxruntime as ort

    with open(os.path.join(job_dir, "job.json")) as f:
        job = json.load(f)
    with np.load(os.path.join(job_dir, "feeds.npz"), allow_pickle=False) as data:
        feeds = {}
        for key in data.files:
            feed, name = key.split("/", 1)
            feeds.setdefault(feed, {})[name] = data[key]
    sessions = {}
    results = {}
    try:
        for index, (feed, level) in enumerate(job["runs"]):
            if level not in sessions:
                options = ort.SessionOptions()
                options.graph_optimization_level = (
                    ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                    if level == "enabled"
                    else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                )
                options.log_severity_level = 3
                options.intra_op_num_threads = int(job.get("threads", 0))
                sessions[level] = ort.InferenceSession(
                    os.path.join(job_dir, "model.onnx"), options, providers=["CPUExecutionProvider"]
                )
            outputs = sessions[level].run(job["outputs"], feeds[feed])
            for k, value in enumerate(outputs):
                results[f"{index}/{k}"] = np.asarray(value)
    except Exception as error:  # onnxruntime's own exception types, MemoryError
        with open(os.path.join(job_dir, "error.json"), "w") as f:
            json.dump({"type": type(error).__name__, "message": str(error)[:4000]}, f)
        return 3
    np.savez(os.path.join(job_dir, "outputs.npz"), **results)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
