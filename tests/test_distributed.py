"""recalibrate and diagnose across two processes on each backend's own engine (torch.distributed
with gloo, jax.distributed under keras.distribution, tf.distribute's MultiWorkerMirroredStrategy),
on localhost, each process in its own Python (tests/distributed_worker.py). Every process must
end with the statistics one process computes over all the data, identical on both; the
references are NumPy's, in float64, from the same weights and data."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # two Pythons with a backend each

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "distributed_worker.py")
EPSILON = (1e-3, 1e-3)  # bn1 (Keras's layer) and bn2 (keras_bn.BatchNorm), both defaults
BATCH = 8


def weights():
    """d1, bn1, d2, bn2, in the model's weight order."""
    rng = np.random.default_rng(2)
    w = []
    for fan_in, units in ((6, 4), (4, 3)):
        w += [rng.normal(0, 0.5, (fan_in, units)), rng.normal(0, 1, units)]  # Dense
        w += [rng.uniform(0.5, 2, units), rng.normal(0, 1, units)]  # gamma, beta
        w += [np.zeros(units), np.ones(units)]  # moving statistics, never read here
    return [v.astype("float32") for v in w]


DATA = np.random.default_rng(1).normal(3.0, 2.0, size=(43, 6)).astype("float32")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two(engine, tmp_path, shards, timeout=300):
    """Both processes of one run; their results, in rank order."""
    np.savez(tmp_path / "weights.npz", **{f"w{i:02d}": w for i, w in enumerate(weights())})
    (tmp_path / "shards.json").write_text(json.dumps(shards))
    if engine == "tf":
        address = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    else:
        address = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_XDIST_WORKER", "TF_CONFIG")}
    env["JAX_PLATFORMS"] = "cpu"
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, engine, str(rank), address, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        for rank in (0, 1)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=timeout))
    finally:
        for proc in procs:
            proc.kill()
    for proc, (_, err) in zip(procs, logs):
        assert proc.returncode == 0, err[-4000:]
    return [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]


def forward(batch, w):
    """One batch through d1 -> bn1 (batch statistics) -> d2, in float64: bn1's and bn2's
    inputs."""
    x = batch.astype(np.float64)
    w = [v.astype(np.float64) for v in w]
    h1 = x @ w[0] + w[1]
    normalized = (h1 - h1.mean(0)) / np.sqrt(h1.var(0) + EPSILON[0]) * w[2] + w[3]
    return h1, normalized @ w[6] + w[7]


def process_batches(shard):
    """One process's batches of its shard, each as (bn1 inputs, bn2 inputs); the trailing
    remainder below half a batch marked for batch_mean's merge."""
    return [forward(shard[i : i + BATCH], weights()) for i in range(0, len(shard), BATCH)]


def reference(shards, estimator):
    """{bn: (mean, variance)} over every process's batches: bn1 biased, bn2 unbiased
    (`unbiased_variance=True`). batch_mean: the equal-weight average of per-batch statistics,
    each process's remainder under half a batch merged into its previous batch."""
    groups = [process_batches(shard) for shard in shards if len(shard)]
    result = {}
    for index, (name, ddof) in enumerate((("bn1", 0), ("bn2", 1))):
        if estimator == "population":
            values = np.concatenate([b[index] for group in groups for b in group])
            result[name] = (values.mean(0), values.var(0, ddof=ddof))
            continue
        means, variances = [], []
        for group in groups:
            batches = [b[index] for b in group]
            if len(batches) >= 2 and 2 * len(batches[-1]) < len(batches[0]):
                batches = [*batches[:-2], np.concatenate(batches[-2:])]
            means += [b.mean(0) for b in batches]
            variances += [b.var(0, ddof=ddof) for b in batches]
        result[name] = (np.mean(means, 0), np.mean(variances, 0))
    return result


def std_units(statistics, expected):
    """max |mean - mean_ref| / std_ref and |var - var_ref| / var_ref over both BatchNorms."""
    worst = 0.0
    for name, (mean, var) in expected.items():
        got_mean, got_var = (np.asarray(v, np.float64) for v in statistics[name])
        worst = max(
            worst,
            float(np.max(np.abs(got_mean - mean) / np.sqrt(var))),
            float(np.max(np.abs(got_var - var) / var)),
        )
    return worst


# Which rows each process reads. torch and JAX: every process its own shard (3 batches and 3;
# 6 and none). TensorFlow: every worker the same data, each global batch split across the
# workers (the last one of 3 rows 2 + 1, then of 1 row: 1 + 0).
SHARDS = {
    "torch": {"uneven": [[0, 24], [24, 43]], "empty": [[0, 43], [43, 43]]},
    "jax": {"uneven": [[0, 24], [24, 43]], "empty": [[0, 43], [43, 43]]},
    "tf": {"uneven": [[0, 43], [0, 43]], "empty": [[0, 41], [0, 41]]},
}
ENGINES = {
    "torch": "torch.distributed (gloo)",
    "jax": "jax.distributed",
    "tf": "tf.distribute (MultiWorkerMirroredStrategy)",
}


@pytest.mark.parametrize("engine", ["torch", "jax", "tf"])
def test_two_processes_end_with_the_statistics_of_all_their_data_and_agree_everywhere(
    engine, tmp_path
):
    shards = SHARDS[engine]
    if engine in ("torch", "tf"):
        cli_model = command_line_files(tmp_path / "cli")
    ranks = run_two(engine, tmp_path, shards)
    if engine in ("torch", "tf"):
        check_command_line(ranks, tmp_path / "cli", cli_model)
    if engine == "torch":
        check_synchronized_layer(ranks)
    for case, ranges in shards.items():
        if engine == "tf":  # the same data on both workers: one process over it
            union = [DATA[slice(*ranges[0])]]
        else:
            union = [DATA[slice(*r)] for r in ranges]
        for estimator in ("population", "batch_mean"):
            key = f"{case}/{estimator}"
            expected = reference(union, estimator)
            for rank in ranks:
                assert std_units(rank[key]["statistics"], expected) < 1e-6, (key, rank[key])
                report = rank[key]["report"]
                assert report["processes"] == 2 and report["engine"].startswith(ENGINES[engine])
                rows = sum(len(u) for u in union)
                assert [r["values_per_channel"] for r in report["rows"]] == [rows, rows]
                assert "values per channel count all of them" in rank[key]["text"]
            # Merged in the same order from the same numbers: identical on both processes.
            assert ranks[0][key]["statistics"] == ranks[1][key]["statistics"], key
            if engine != "tf":
                batches = [-(-(r[1] - r[0]) // BATCH) for r in ranges]
                assert ranks[0][key]["report"]["process_batches"] == batches
                assert ranks[0][key]["report"]["batches"] == sum(batches)
    # distributed=False: each process its own shard, which is not all the data.
    all_data = reference([DATA[slice(*r)] for r in shards["uneven"]], "population")
    own = reference([DATA[slice(*shards["uneven"][0])]], "population")
    local = ranks[0]["local"]
    if engine == "jax":
        # Under keras.distribution a weight is one value on both processes: refused, said why.
        assert "variables span 2 processes" in local["error"], local
        local = ranks[0]["local-plain"]
    assert local["report"]["processes"] == 1 and local["report"]["engine"] is None
    assert std_units(local["statistics"], own) < 1e-6
    if engine != "tf":
        assert std_units(local["statistics"], all_data) > 1e-3
    # diagnose with data: the same verdicts, drifts and output change on every process.
    assert ranks[0]["diagnose"] == ranks[1]["diagnose"]
    assert [r["verdict"] for r in ranks[0]["diagnose"]["rows"]] == ["stale", "stale"]
    assert ranks[0]["diagnose"]["output_error"] > 0.1
    if engine != "tf":
        # Process 1's data has 7 features where the model takes 6: it says so, process 0 says
        # which process failed, and neither waits for the other.
        assert "wrong shape" in ranks[1]["failure"], ranks[1]["failure"]
        assert ranks[0]["failure"].startswith("Process 1 of 2"), ranks[0]["failure"]
        assert max(rank["failure_seconds"] for rank in ranks) < 60
    # The caller's model keeps its statistics on every process.
    for rank in ranks:
        assert rank["model_unchanged"] == {
            "bn1": [[0.0] * 4, [1.0] * 4],
            "bn2": [[0.0] * 3, [1.0] * 3],
        }


def command_line_files(folder):
    """A model with one BatchNorm after a Dense layer, and the data, for the command line."""
    import keras

    folder.mkdir()
    inputs = keras.Input((6,))
    dense = keras.layers.Dense(4, name="d1")
    model = keras.Model(inputs, keras.layers.BatchNormalization(name="bn")(dense(inputs)))
    model.set_weights(weights()[:6])
    model.save(folder / "model.keras")
    np.save(folder / "data.npy", DATA)
    return model


def check_command_line(ranks, folder, model):
    """`keras-bn doctor --data` and `keras-bn recalibrate` as a launcher starts them (torchrun's
    WORLD_SIZE, or TF_CONFIG; the worker runs them through the command line's `main`): each
    process reads its rows of the file, both report the same, and only process 0 writes."""
    import keras

    import keras_bn

    (doctor_0, recalibrate_0), (doctor_1, recalibrate_1) = (rank["cli"] for rank in ranks)
    # doctor: statistics still 0/1 (exit 1, a problem found), the same report on both.
    assert doctor_0[0] == doctor_1[0] == 1
    assert json.loads(doctor_0[1]) == json.loads(doctor_1[1])
    report = json.loads(doctor_0[1])
    single = keras_bn.diagnose(model, DATA, batch_size=8).to_dict()
    assert [r["verdict"] for r in report["rows"]] == [r["verdict"] for r in single["rows"]]
    np.testing.assert_allclose(report["rows"][0]["drift"], single["rows"][0]["drift"], 1e-6)
    # recalibrate: process 0 writes, process 1 says so; the file holds the whole file's statistics.
    assert recalibrate_0[0] == recalibrate_1[0] == 0
    written = [json.loads(r[1])["output"] for r in (recalibrate_0, recalibrate_1)]
    assert written == [str(folder / "new.keras"), None]
    assert sorted(p.name for p in folder.iterdir()) == ["data.npy", "model.keras", "new.keras"]
    bn = keras.saving.load_model(folder / "new.keras").get_layer("bn")
    h1 = DATA.astype(np.float64) @ weights()[0].astype(np.float64) + weights()[1]
    np.testing.assert_allclose(bn.moving_mean.numpy(), h1.mean(0), atol=1e-6 * h1.std())
    np.testing.assert_allclose(bn.moving_variance.numpy(), h1.var(0), rtol=1e-6)


def check_synchronized_layer(ranks):
    """`BatchNorm(synchronized=True)` over the torch workers' gloo group, each with 4 of 8 rows:
    the moving statistics, outputs and input gradients of one batch of 8 (NumPy's, the
    gradient by the textbook formula), once; `synchronized=False`, each process its half."""
    data = np.random.default_rng(0).normal(3.0, 2.0, size=(8, 5)).astype(np.float64)
    data[4:] += 10.0
    upstream = np.random.default_rng(1).normal(size=data.shape).astype("float32")
    upstream = upstream.astype(np.float64)
    data = data.astype("float32").astype(np.float64)
    mean, var = data.mean(0), data.var(0)
    inv = 1.0 / np.sqrt(var + 1e-3)
    xhat = (data - mean) * inv
    # d/dx of sum(upstream * xhat), gamma 1: inv * (g - mean(g) - xhat * mean(g * xhat)).
    grad = inv * (upstream - upstream.mean(0) - xhat * (upstream * xhat).mean(0))
    for rank in ranks:
        synced = rank["synchronized=True"]
        np.testing.assert_allclose(synced["mean"], mean, rtol=1e-5)
        np.testing.assert_allclose(synced["var"], var, rtol=1e-5)
        np.testing.assert_allclose(rank["one_each"], data[:2].var(0), rtol=1e-4)
    for key, expected in (("out", xhat), ("grad", grad)):
        joined = np.concatenate([rank["synchronized=True"][key] for rank in ranks])
        np.testing.assert_allclose(joined, expected, rtol=1e-4, atol=1e-5, err_msg=key)
    # synchronized=False: each process its own half (the negative case).
    for rank, half in zip(ranks, (data[:4], data[4:])):
        np.testing.assert_allclose(rank["synchronized=False"]["var"], half.var(0), rtol=1e-5)
        assert not np.allclose(rank["synchronized=False"]["var"], var, rtol=0.1)
    local_grad = np.concatenate([rank["synchronized=False"]["grad"] for rank in ranks])
    assert not np.allclose(local_grad, grad, atol=1e-3)
