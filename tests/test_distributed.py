"""Two processes x two CPU devices compute the same global loss and step as one process x four.

Run as a script, this file is the worker: ``python tests/test_distributed.py WORKER_ID N PORT``.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script, the worker imports tests.processes
from tests.processes import read_result, run_together, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GLOBAL_BATCH, LENGTH, VOCAB = 8, 5, 16


def make_batch() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, VOCAB, (GLOBAL_BATCH, LENGTH)).astype(np.int32)
    targets = rng.integers(0, VOCAB, (GLOBAL_BATCH, LENGTH)).astype(np.int32)
    targets[rng.random((GLOBAL_BATCH, LENGTH)) < 0.4] = -100
    targets[:2] = -100  # process 0's first rows count nothing: the global count must decide
    return tokens, targets


def train_two_steps(mesh_spec: str) -> dict:
    """Builds the tiny model on the mesh, runs two steps on the global batch; returns losses and
    the rows of the batch that this process's devices hold."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import jaxloss
    from train import sharding

    class Tiny(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            part = nnx.with_partitioning
            self.embed = nnx.Embed(
                VOCAB, 8, rngs=rngs, embedding_init=part(nnx.initializers.normal(1.0), ("vocab", "embed"))
            )
            self.out = nnx.Linear(
                8, VOCAB, rngs=rngs, kernel_init=part(nnx.initializers.lecun_normal(), ("embed", "vocab")),
                bias_init=part(nnx.initializers.zeros, ("vocab",)),
            )

        def __call__(self, tokens: jax.Array) -> jax.Array:
            return self.out(jnp.tanh(self.embed(tokens)))

    def init() -> tuple[Tiny, nnx.Optimizer]:
        model = Tiny(nnx.Rngs(0))
        return model, nnx.Optimizer(model, optax.adamw(1e-1), wrt=nnx.Param)

    @nnx.jit
    def step(model: Tiny, opt: nnx.Optimizer, tokens: jax.Array, targets: jax.Array) -> jax.Array:
        def loss_fn(m: Tiny) -> jax.Array:
            return jaxloss.cross_entropy(m(tokens), targets, reduction="sum_count").mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    mesh = sharding.make_mesh(mesh_spec)
    model, opt = sharding.create_sharded(init, mesh)
    tokens, targets = make_batch()
    losses = []
    for _ in range(2):
        batch = sharding.shard_batch({"tokens": tokens, "targets": targets}, mesh)
        with jax.numpy_dtype_promotion("standard"):
            loss = step(model, opt, batch["tokens"], batch["targets"])
        losses.append(float(loss))
    from jax.experimental import multihost_utils

    kernel = multihost_utils.process_allgather(model.out.kernel.get_value(), tiled=True)
    rows = sorted({r for shard in batch["tokens"].addressable_shards for r in range(*shard.index[0].indices(GLOBAL_BATCH))})
    return {"losses": losses, "rows": [rows[0], rows[-1] + 1], "kernel_sum": float(np.asarray(kernel).sum())}


def worker(process_id: int, num_processes: int, port: int) -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_num_cpu_devices", 2)
    from train import distributed

    assert distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id, timeout_s=40)
    assert jax.process_count() == num_processes and len(jax.devices()) == 2 * num_processes
    result = train_two_steps("data=2,fsdp=2")
    # agreement: only process 1 asks to stop; everyone must see it. Steps 10 vs 11 -> 11.
    result["any_stop"] = distributed.any_process(process_id == 1)
    result["none_stop"] = distributed.any_process(False)
    result["max_step"] = distributed.all_reduce_max(10 + process_id)
    result["main"] = distributed.is_main_process()
    distributed.barrier("done")
    try:
        distributed.assert_same_everywhere(process_id, "process id")
        result["same_raised"] = False
    except RuntimeError as err:
        result["same_raised"] = "process id differs" in str(err)
    write_result(result)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- tests


def test_resolve_config_from_env_and_errors() -> None:
    from train.distributed import ProcessConfig, resolve_config

    env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert resolve_config(env=env) == ProcessConfig("h:1", 4, 3)
    assert resolve_config(process_id=1, env=env) == ProcessConfig("h:1", 4, 1)
    assert resolve_config(env={}) == ProcessConfig(None, 1, 0)
    with pytest.raises(ValueError, match="coordinator"):
        resolve_config(num_processes=2, process_id=0, env={})
    with pytest.raises(ValueError, match="process_id"):
        resolve_config("h:1", 2, env={})
    with pytest.raises(ValueError, match="outside"):
        resolve_config("h:1", 2, 2, env={})
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
        resolve_config(env={"JAX_NUM_PROCESSES": "two"})


def test_single_process_helpers_are_trivial() -> None:
    import jax

    from train import distributed

    assert distributed.initialize() is False
    assert distributed.is_main_process()
    assert distributed.any_process(True) and not distributed.any_process(False)
    assert distributed.all_reduce_max(5) == 5
    distributed.barrier("x")
    distributed.assert_same_everywhere(1, "x")
    assert jax.process_count() == 1


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path: Path) -> None:
    port = free_port()
    env = dict(os.environ)
    env["XLA_FLAGS"] = ""
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    files = [tmp_path / f"result{i}.json" for i in range(2)]
    done = run_together([([sys.executable, __file__, str(i), "2", str(port)], {**env, "RESULT_FILE": str(files[i])})
                         for i in range(2)], cwd=ROOT, timeout_s=90)
    results = []
    for (code, out), file in zip(done, files):
        assert code == 0, out[-3000:]
        results.append(read_result(file, out))

    # the reference: this process, 4 devices, one process, same mesh
    reference = train_two_steps("data=2,fsdp=2")
    assert reference["rows"] == [0, GLOBAL_BATCH]
    assert [r["rows"] for r in results] == [[0, 4], [4, 8]]
    for r in results:
        np.testing.assert_allclose(r["losses"], reference["losses"], rtol=2e-6)
        np.testing.assert_allclose(r["kernel_sum"], reference["kernel_sum"], rtol=1e-5, atol=1e-5)
        assert r["any_stop"] is True and r["none_stop"] is False and r["max_step"] == 11
        assert r["same_raised"] is True
    assert [r["main"] for r in results] == [True, False]
    # and an independent float64 check of the first loss
    losses0 = first_loss_float64()
    np.testing.assert_allclose(reference["losses"][0], losses0, rtol=1e-5)


def first_loss_float64() -> float:
    """The first step's loss recomputed in numpy float64 from the unsharded initial weights."""
    from flax import nnx

    from train import sharding

    with sharding.unsharded():
        rngs = nnx.Rngs(0)
        # the same draw order as the worker's module: embedding first, then the output kernel
        embed = nnx.Embed(VOCAB, 8, rngs=rngs, embedding_init=nnx.initializers.normal(1.0))
        out = nnx.Linear(8, VOCAB, rngs=rngs, kernel_init=nnx.initializers.lecun_normal())
    tokens, targets = make_batch()
    table = np.asarray(embed.embedding.get_value(), np.float64)
    kernel = np.asarray(out.kernel.get_value(), np.float64)
    logits = np.tanh(table[tokens]) @ kernel
    shift = logits.max(-1, keepdims=True)
    logp = logits - shift - np.log(np.exp(logits - shift).sum(-1, keepdims=True))
    counted = targets != -100
    nll = -np.take_along_axis(logp, np.where(counted, targets, 0)[..., None], -1)[..., 0]
    return float(nll[counted].mean())


def cluster_worker() -> None:
    """Started as SLURM's srun would start it: no flags, the job in SLURM_* variables."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_num_cpu_devices", 2)
    from train import distributed

    assert distributed.initialize(timeout_s=40)
    agreed = distributed.all_reduce_max(10 + jax.process_index())
    write_result({"index": jax.process_index(), "count": jax.process_count(), "devices": len(jax.devices()),
                  "agreed": agreed})


def free_port_in(low: int, high: int) -> int:
    """A port in ``[low, high]`` that nothing listens on now."""
    for port in np.random.default_rng().permutation(np.arange(low, high + 1)):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", int(port)))
            except OSError:
                continue
            return int(port)
    raise RuntimeError(f"no free port in [{low}, {high}]")


def test_processes_started_by_slurm_connect_without_flags(tmp_path: Path) -> None:
    """jax.distributed.initialize() finds the job in SLURM's variables: the coordinator on the
    first node of SLURM_STEP_NODELIST, at a port derived from SLURM_JOB_ID."""
    low = 65535 - 2**12 + 1
    job_id = free_port_in(low, 65535) - low  # the port JAX derives: job_id % 4096 + low
    commands, files = [], [tmp_path / f"result{i}.json" for i in range(2)]
    for i in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROCESS"))}
        env.update(XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
                   SLURM_JOB_ID=str(job_id), SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
                   SLURM_PROCID=str(i), SLURM_LOCALID=str(i), SLURM_STEP_NUM_NODES="1", RESULT_FILE=str(files[i]))
        commands.append(([sys.executable, __file__, "cluster"], env))
    results = []
    for (code, out), file in zip(run_together(commands, cwd=ROOT, timeout_s=90), files):
        assert code == 0, out[-3000:]
        results.append(read_result(file, out))
    assert results == [{"index": i, "count": 2, "devices": 4, "agreed": 11} for i in range(2)]


def test_a_cluster_is_detected_from_its_variables_and_flags_still_win(monkeypatch) -> None:
    from train import distributed

    assert distributed.detect_cluster({}) is None
    assert distributed.detect_cluster({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "8"}) == ("Open MPI", 8)
    assert distributed.detect_cluster({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}) is None
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    # explicit flags (here: one process) win over the cluster's variables: nothing to connect
    assert distributed.initialize(num_processes=1) is False
    monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
    assert distributed.initialize() is False


if __name__ == "__main__":
    if sys.argv[1] == "cluster":
        cluster_worker()
    else:
        worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
