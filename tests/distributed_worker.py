"""One process of a two-process run for tests/test_distributed.py, on a backend's own engine:

    python tests/distributed_worker.py ENGINE RANK ADDRESS OUT

ENGINE is `torch` (a gloo process group), `jax` (`keras.distribution.initialize`, then
`DataParallel` over both processes' devices) or `tf` (`MultiWorkerMirroredStrategy` from
TF_CONFIG; ADDRESS holds both workers' addresses, comma-separated). It recalibrates and
diagnoses one model on its shard of the data and writes what it got to OUT/RANK.json; the test
computes the references with NumPy. Not a test module itself."""

import json
import os
import sys
import time

engine, rank, address, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
os.environ["KERAS_BACKEND"] = {"torch": "torch", "jax": "jax", "tf": "tensorflow"}[engine]
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
if engine == "tf":
    os.environ["TF_CONFIG"] = json.dumps(
        {
            "cluster": {"worker": address.split(",")},
            "task": {"type": "worker", "index": rank},
        }
    )

import contextlib  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_bn  # noqa: E402

scope = contextlib.nullcontext()
if engine == "torch":
    import datetime

    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{address}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=120),
    )
elif engine == "jax":
    keras.distribution.initialize(job_addresses=address, num_processes=2, process_id=rank)
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=keras.distribution.list_devices())
    )
else:
    import tensorflow as tf

    scope = tf.distribute.MultiWorkerMirroredStrategy().scope()

# The data and the weights, as tests/test_distributed.py makes them for its references.
data = np.random.default_rng(1).normal(3.0, 2.0, size=(43, 6)).astype("float32")
weights = [w.astype("float32") for w in np.load(os.path.join(out, "weights.npz")).values()]
shards = json.load(open(os.path.join(out, "shards.json")))


def build():
    L = keras.layers
    inputs = keras.Input((6,))
    x = L.BatchNormalization(name="bn1")(L.Dense(4, name="d1")(inputs))
    x = keras_bn.BatchNorm(name="bn2", unbiased_variance=True)(L.Dense(3, name="d2")(x))
    model = keras.Model(inputs, x)
    model.set_weights(weights)
    return model


def statistics(model):
    return {
        name: [
            keras.ops.convert_to_numpy(getattr(model.get_layer(name), part)).tolist()
            for part in ("moving_mean", "moving_variance")
        ]
        for name in ("bn1", "bn2")
    }


result = {}
with scope:
    model = build()
    for case, ranges in shards.items():
        shard = data[slice(*ranges[rank])]
        for estimator in ("population", "batch_mean"):
            new, report = keras_bn.recalibrate(
                model, shard, batch_size=8, estimator=estimator, verbose=0
            )
            result[f"{case}/{estimator}"] = {
                "statistics": statistics(new),
                "report": report.to_dict(),
                "text": str(report),
            }
    uneven = data[slice(*shards["uneven"][rank])]
    try:
        local, report = keras_bn.recalibrate(
            model, uneven, batch_size=8, distributed=False, verbose=0
        )
        result["local"] = {"statistics": statistics(local), "report": report.to_dict()}
    except keras_bn.KerasBNError as error:  # JAX: the model's variables span both processes
        result["local"] = {"error": str(error)}
    if engine == "jax":  # the same model built without keras.distribution: its own variables
        distribution = keras.distribution.distribution()
        keras.distribution.set_distribution(None)
        plain = build()
        local, report = keras_bn.recalibrate(
            plain, uneven, batch_size=8, distributed=False, verbose=0
        )
        result["local-plain"] = {"statistics": statistics(local), "report": report.to_dict()}
        keras.distribution.set_distribution(distribution)
    result["diagnose"] = keras_bn.diagnose(model, uneven, batch_size=8).to_dict()
    # One process's data is unusable (a wrong feature count): every process raises, none hangs.
    bad = uneven if rank == 0 or engine == "tf" else np.zeros((5, 7), "float32")
    started = time.perf_counter()
    try:
        keras_bn.recalibrate(model, bad, batch_size=8, verbose=0)
        result["failure"] = None
    except keras_bn.KerasBNError as error:
        result["failure"] = str(error)
    result["failure_seconds"] = time.perf_counter() - started
    result["model_unchanged"] = statistics(model)

if engine == "torch":
    # The layer itself on the same process group: synchronized=True takes the statistics of both
    # processes' 4 rows, and its input gradient carries the global statistics' back; False,
    # each process its own half. One row each: the global batch of 2 still trains.
    import torch

    sync_data = np.random.default_rng(0).normal(3.0, 2.0, size=(8, 5)).astype("float32")
    sync_data[4:] += 10.0
    upstream = np.random.default_rng(1).normal(size=sync_data.shape).astype("float32")
    for sync in (True, False):
        layer = keras_bn.BatchNorm(momentum=0.0, synchronized=sync)
        x = torch.tensor(sync_data[4 * rank : 4 * rank + 4], requires_grad=True)
        y = layer(x, training=True)
        (y * torch.tensor(upstream[4 * rank : 4 * rank + 4])).sum().backward()
        result[f"synchronized={sync}"] = {
            "mean": layer.moving_mean.numpy().tolist(),
            "var": layer.moving_variance.numpy().tolist(),
            "out": y.detach().numpy().tolist(),
            "grad": x.grad.numpy().tolist(),
        }
    one = keras_bn.BatchNorm(momentum=0.0, synchronized=True)
    one(torch.tensor(sync_data[rank : rank + 1]), training=True)
    result["one_each"] = one.moving_variance.numpy().tolist()

if engine in ("torch", "tf"):
    # The command line as its launcher starts it (torchrun's WORLD_SIZE; TF_CONFIG, already set
    # here): it joins the run, reads its rows of the file (torch: its block; TensorFlow: all,
    # each batch split across the workers); each command's exit code and stdout.
    import io

    from keras_bn.export.cli import main

    if engine == "torch":
        os.environ["WORLD_SIZE"] = "2"
    os.chdir(os.path.join(out, "cli"))
    result["cli"] = []
    for argv in (
        ["doctor", "model.keras", "--data", "data.npy", "--batch-size", "8", "--json"],
        ["recalibrate", "model.keras", "--data", "data.npy", "-o", "new.keras", "--json"],
    ):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            code = main(argv)
        result["cli"].append([code, printed.getvalue()])

with open(os.path.join(out, f"{rank}.json"), "w") as f:
    json.dump(result, f)
