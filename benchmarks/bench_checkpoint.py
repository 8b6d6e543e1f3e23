"""How long does a checkpoint pause training, and how does a tiny step scale over devices?

Part 1 saves and restores a BERT-base-sized training state (110M float32 parameters plus
Adam's two moments, 1.3 GB) with :class:`train.checkpoint.CheckpointManager`:
synchronous (the step waits for the files) versus asynchronous (the step waits only until
``save`` returns; the files are written in the background), and the restore time.

Part 2 times a tiny jitted training step on 1, 2, 4 and 8 simulated CPU devices (one
subprocess each, since the device count is fixed when JAX starts) with data-parallel and
FSDP meshes, and reports each time relative to one device.

Usage:
  python -m benchmarks.bench_checkpoint            # full size, writes results/checkpoint.json
  python -m benchmarks.bench_checkpoint --small    # 11M parameters, a quick check
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._harness import format_table, run_worker, save_json


# --------------------------------------------------------------------------- part 1


def bert_shapes(small: bool) -> dict[str, tuple[int, ...]]:
    """BERT-base's parameter shapes (vocab 30522, hidden 768, 12 layers, MLP 3072); ``small``: 4 layers, 256."""
    vocab, hidden, layers, mlp, positions = (30522, 768, 12, 3072, 512) if not small else (30522, 256, 4, 1024, 512)
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings/word": (vocab, hidden),
        "embeddings/position": (positions, hidden),
        "embeddings/type": (2, hidden),
        "embeddings/norm_scale": (hidden,),
        "embeddings/norm_bias": (hidden,),
        "pooler/kernel": (hidden, hidden),
        "pooler/bias": (hidden,),
    }
    for i in range(layers):
        for name in ("query", "key", "value", "output"):
            shapes[f"layer_{i}/attention/{name}/kernel"] = (hidden, hidden)
            shapes[f"layer_{i}/attention/{name}/bias"] = (hidden,)
        shapes[f"layer_{i}/mlp/up/kernel"] = (hidden, mlp)
        shapes[f"layer_{i}/mlp/up/bias"] = (mlp,)
        shapes[f"layer_{i}/mlp/down/kernel"] = (mlp, hidden)
        shapes[f"layer_{i}/mlp/down/bias"] = (hidden,)
        for norm in ("attention_norm", "output_norm"):
            shapes[f"layer_{i}/{norm}/scale"] = (hidden,)
            shapes[f"layer_{i}/{norm}/bias"] = (hidden,)
    return shapes


def make_state(small: bool) -> dict[str, Any]:
    """Random parameters (incompressible, like trained weights) and Adam moments."""
    import jax
    import jax.numpy as jnp

    shapes = bert_shapes(small)
    key = jax.random.key(0)
    params, mu, nu = {}, {}, {}
    for i, (name, shape) in enumerate(shapes.items()):
        k1, k2, k3 = jax.random.split(jax.random.fold_in(key, i), 3)
        params[name] = jax.random.normal(k1, shape, jnp.float32) * 0.02
        mu[name] = jax.random.normal(k2, shape, jnp.float32) * 1e-3
        nu[name] = jnp.abs(jax.random.normal(k3, shape, jnp.float32)) * 1e-6
    state = {"params": params, "opt_state": {"mu": mu, "nu": nu, "count": jnp.asarray(1000, jnp.int32)},
             "rng": jax.random.key(1)}
    return jax.block_until_ready(state)


def time_checkpoints(small: bool, repeats: int, directory: Path) -> dict[str, Any]:
    import jax

    from train.checkpoint import CheckpointManager, state_nbytes

    state = make_state(small)
    nbytes = state_nbytes(state)
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    rows: dict[str, Any] = {"params": int(n_params), "bytes": int(nbytes)}
    step = 0
    for mode in ("sync", "async"):
        pauses, totals, restores = [], [], []
        folder = directory / mode
        manager = CheckpointManager(folder, save_every=1, keep_last=1, async_save=(mode == "async"))
        for _ in range(repeats):
            step += 1
            start = time.perf_counter()
            manager.save(step, state, data_position={"index": step}, config={"bench": True})
            pauses.append(time.perf_counter() - start)
            manager.wait()
            totals.append(time.perf_counter() - start)
            target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
            start = time.perf_counter()
            restored = manager.restore(target)
            jax.block_until_ready(restored.state)
            restores.append(time.perf_counter() - start)
            del restored
        manager.close()
        size_on_disk = sum(p.stat().st_size for p in (folder / str(step)).rglob("*") if p.is_file())
        rows[mode] = {
            "pause_s": min(pauses),
            "save_total_s": min(totals),
            "restore_s": min(restores),
            "disk_bytes": int(size_on_disk),
            "all_pauses_s": pauses,
        }
        shutil.rmtree(folder, ignore_errors=True)
    return rows


# --------------------------------------------------------------------------- part 2


def scaling_worker(devices: int, steps: int) -> dict[str, Any]:
    """Times the tiny step on ``devices`` simulated devices (run in a fresh process)."""
    import jax
    import numpy as np
    import optax
    from flax import nnx

    import jaxloss
    from train import sharding

    vocab, embed, hidden, batch, length = 1024, 128, 512, 32, 64

    class Tiny(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            part, init = nnx.with_partitioning, nnx.initializers
            self.embed = nnx.Embed(vocab, embed, rngs=rngs, embedding_init=part(init.normal(1.0), ("vocab", "embed")))
            self.up = nnx.Linear(embed, hidden, rngs=rngs, kernel_init=part(init.lecun_normal(), ("embed", "mlp")))
            self.down = nnx.Linear(hidden, embed, rngs=rngs, kernel_init=part(init.lecun_normal(), ("mlp", "embed")))
            self.out = nnx.Linear(embed, vocab, rngs=rngs, kernel_init=part(init.lecun_normal(), ("embed", "vocab")))

        def __call__(self, t: jax.Array) -> jax.Array:
            h = self.embed(t)
            return self.out(h + self.down(jax.nn.gelu(self.up(h))))

    def init() -> tuple[Tiny, nnx.Optimizer]:
        model = Tiny(nnx.Rngs(0))
        return model, nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model: Tiny, opt: nnx.Optimizer, t: jax.Array, y: jax.Array) -> jax.Array:
        def loss_fn(m: Tiny) -> jax.Array:
            return jaxloss.cross_entropy(m(t), y, reduction="sum_count").mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (batch, length)).astype(np.int32)
    targets = rng.integers(0, vocab, (batch, length)).astype(np.int32)
    results = {}
    for mesh_spec in ("data=-1", "fsdp=-1"):
        mesh = sharding.make_mesh(mesh_spec)
        model, opt = sharding.create_sharded(init, mesh)
        b = sharding.shard_batch({"t": tokens, "y": targets}, mesh)
        for _ in range(3):
            jax.block_until_ready(step(model, opt, b["t"], b["y"]))
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            jax.block_until_ready(step(model, opt, b["t"], b["y"]))
            times.append(time.perf_counter() - start)
        results[mesh_spec.split("=")[0]] = statistics.median(times)
    return {"devices": devices, "step_s": results}


def run_scaling(device_counts: list[int], steps: int) -> list[dict[str, Any]]:
    return [
        run_worker("benchmarks.bench_checkpoint", ["--scaling-worker", str(n), "--steps", str(steps)],
                   env={"XLA_FLAGS": f"--xla_force_host_platform_device_count={n}", "JAX_PLATFORMS": "cpu"},
                   label=f"{n} devices")
        for n in device_counts
    ]


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="an 11M-parameter state instead of BERT-base's 110M")
    parser.add_argument("--repeats", type=int, default=2, help="saves and restores per mode (the fastest is kept)")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per device count")
    parser.add_argument("--devices", default="1,2,4,8", help="device counts for the scaling part")
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--skip-checkpoint", action="store_true")
    parser.add_argument("--dir", default=None, help="folder to write checkpoints in (default: a temporary one)")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/checkpoint[_small].json)")
    parser.add_argument("--scaling-worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.scaling_worker is not None:
        print(json.dumps(scaling_worker(args.scaling_worker, args.steps)))
        return

    payload: dict[str, Any] = {"small": args.small}
    if not args.skip_checkpoint:
        directory = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
        try:
            ck = time_checkpoints(args.small, args.repeats, directory)
        finally:
            if not args.dir:
                shutil.rmtree(directory, ignore_errors=True)
        payload["checkpoint"] = ck
        print(f"\nstate: {ck['params'] / 1e6:.1f}M parameters + 2 Adam moments = {ck['bytes'] / 1e9:.2f} GB")
        rows = [
            [mode, ck[mode]["pause_s"], ck[mode]["save_total_s"], ck[mode]["restore_s"],
             ck[mode]["disk_bytes"] / 1e9, ck["bytes"] / 1e9 / ck[mode]["save_total_s"]]
            for mode in ("sync", "async")
        ]
        print(format_table(["save", "step pause s", "save total s", "restore s", "disk GB", "write GB/s"], rows))
    if not args.skip_scaling:
        counts = [int(c) for c in args.devices.split(",")]
        scaling = run_scaling(counts, args.steps)
        payload["scaling"] = scaling
        base = scaling[0]["step_s"]
        rows = [
            [r["devices"], r["step_s"]["data"] * 1e3, f"{r['step_s']['data'] / base['data']:.2f}x",
             r["step_s"]["fsdp"] * 1e3, f"{r['step_s']['fsdp'] / base['fsdp']:.2f}x"]
            for r in scaling
        ]
        print("\ntiny training step (batch 32x64, vocab 1024, embed 128, mlp 512), simulated CPU devices")
        print(format_table(["devices", "data ms", "vs 1", "fsdp ms", "vs 1"], rows))
    name = "checkpoint_small" if args.small else "checkpoint"
    path = save_json(name, payload, args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
