"""Fine-tuning one checkpoint with jaxloss-train and with a plain PyTorch loop, side by side.

The packaged all-MiniLM-L6-v2 is fine-tuned on WNUT-17 NER and SST-2 (from ``../shared/data``)
by ``jaxloss-train`` and by ``benchmarks/torch_finetune.py`` (transformers' BERT classes,
``torch.optim.AdamW``, dynamic padding), one after the other on the same machine, with the same
hyperparameters (learning rate, batch 32, max length 128, AdamW with decay on matrices, clipping
at 1.0, 6% warmup then linear decay, float32, the checkpoint's dropout):

- ``budget``: an equal wall-clock budget (``--minutes``, 8 by default) per run;
- ``contended``: the same while another process keeps one core busy;
- ``epoch``: one epoch each;
- ``floor``: one training step of each at a fixed batch shape, float32 and bfloat16, against its
  FLOPs (XLA's cost analysis), the time of its matrix products alone and the step's FLOPs at the
  machine's fastest product rate, with glibc's default allocator and with huge pages.

Each run reports the time from launch to its first step, its steady examples per second
(median step), its evaluation time on the dev set and its dev metric (entity F1, accuracy):

    python -m benchmarks.bench_finetune                           # everything, about 90 minutes
    python -m benchmarks.bench_finetune --parts floor             # the step against its floor
    python -m benchmarks.bench_finetune --parts budget --tasks wnut17 --minutes 4

Results merge into ``benchmarks/results/finetune.json`` (a part run again replaces its rows).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._harness import ALLOCATORS, RESULTS_DIR, format_table, machine_info, run_worker

ROOT = Path(__file__).resolve().parent.parent

TASKS = {
    "wnut17": {"task": "ner", "metric": "f1", "learning_rate": 2e-4,
               "train": "wnut17/wnut17train.conll", "eval": "wnut17/emerging.dev.conll", "flags": []},
    "sst2": {"task": "classify", "metric": "accuracy", "learning_rate": 1e-4,
             "train": "sst2_sentence_level/stsa.binary.train", "eval": "sst2_sentence_level/stsa.binary.dev",
             "flags": ["--format", "label-first"]},
}
COMMON = {"batch_size": 32, "max_length": 128}


def _hog() -> subprocess.Popen:
    """Another process that keeps one core busy."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


@dataclasses.dataclass(frozen=True)
class TrainRun:
    """A finished ``jaxloss-train`` run of :func:`train_minilm`."""

    command: str  # as typed, the data under ../shared/data
    launched: float  # time.time() at launch
    out: Path  # its output folder
    summary: dict[str, Any]  # its summary.json
    seconds_per_step: float | None  # the median over the logged windows after the first


def train_minilm(key: str, shared: Path, out: Path, flags: list[str]) -> TrainRun:
    """Fine-tunes all-MiniLM-L6-v2 with ``jaxloss-train`` on the data set ``key`` of :data:`TASKS`
    (its task, files and flags; batch size and max length of :data:`COMMON`) with ``flags`` added,
    into ``out`` (removed first), its log beside it as ``<out>.log``."""
    spec = TASKS[key]
    if out.exists():
        shutil.rmtree(out)
    cmd = ["jaxloss-train", spec["task"], "--model", "minilm", "--train-file", str(shared / spec["train"]),
           "--eval-file", str(shared / spec["eval"]), *spec["flags"], "--batch-size", str(COMMON["batch_size"]),
           "--max-length", str(COMMON["max_length"]), "--output-dir", str(out), "--no-progress", "--log-every", "10",
           *flags]
    print("$ " + shlex.join(cmd), file=sys.stderr, flush=True)
    launched = time.time()
    proc = subprocess.run([sys.executable, "-m", "train", *cmd[1:]], cwd=ROOT, capture_output=True, text=True)
    (out.parent / f"{out.name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"jaxloss-train failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    windows = [r["train/seconds_per_step"] for r in records if "train/seconds_per_step" in r][1:]
    return TrainRun(shlex.join(cmd).replace(str(shared), "../shared/data"), launched, out,
                    json.loads((out / "summary.json").read_text()), float(np.median(windows)) if windows else None)


def run_jax(key: str, shared: Path, runs: Path, *, minutes: float | None, epochs: float | None,
            seed: int = 0) -> dict[str, Any]:
    """One ``jaxloss-train`` run on ``key`` for ``minutes`` of wall clock or ``epochs``."""
    spec = TASKS[key]
    stop = ["--max-minutes", f"{minutes:g}", "--epochs", "1000"] if minutes else ["--epochs", f"{epochs:g}"]
    name = f"jax-{key}-{'budget' if minutes else 'epoch'}" + (f"-seed{seed}" if seed else "")
    run = train_minilm(key, shared, runs / name, ["--learning-rate", str(spec["learning_rate"]), *stop,
                                                   "--seed", str(seed)])
    timing = json.loads((run.out / "timing.json").read_text())
    metric = f"eval/{spec['task']}/{spec['metric']}"
    return {"framework": "jaxloss", "steps": run.summary["final_step"], "horizon": run.summary["horizon"],
            "time_to_first_step": timing["first_step_at"] - run.launched,
            "examples_per_second": COMMON["batch_size"] / run.seconds_per_step if run.seconds_per_step else None,
            "eval_seconds": timing["final_eval_seconds"], "metric": run.summary["final"][metric],
            "best_metric": run.summary["best_value"], "total_seconds": time.time() - run.launched,
            "compile_seconds": timing["compile_seconds"], "command": run.command}


def run_torch(key: str, shared: Path, *, minutes: float | None, epochs: float | None, seed: int = 0) -> dict[str, Any]:
    """One run of the PyTorch loop on ``key`` for ``minutes`` of wall clock or ``epochs``."""
    spec = TASKS[key]
    args = [spec["task"], "--model", "minilm", "--train-file", str(shared / spec["train"]),
            "--eval-file", str(shared / spec["eval"]), "--learning-rate", str(spec["learning_rate"]),
            "--batch-size", str(COMMON["batch_size"]), "--max-length", str(COMMON["max_length"]), "--seed", str(seed)]
    args += ["--minutes", f"{minutes:g}"] if minutes else ["--epochs", f"{epochs:g}"]
    print("$ python -m benchmarks.torch_finetune " + shlex.join(args), file=sys.stderr, flush=True)
    launched = time.time()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.torch_finetune", *args], cwd=ROOT, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"torch loop failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["time_to_first_step"] = result.pop("first_step_at") - launched
    result["total_seconds"] = time.time() - launched
    return result


def part_runs(part: str, keys: list[str], shared: Path, runs: Path, minutes: float) -> list[dict[str, Any]]:
    rows = []
    for key in keys:
        for framework in ("torch", "jaxloss"):
            hog = _hog() if part == "contended" else None
            try:
                kwargs = dict(minutes=minutes, epochs=None) if part in ("budget", "contended") else dict(minutes=None, epochs=1.0)
                result = (run_jax(key, shared, runs, **kwargs) if framework == "jaxloss"
                          else run_torch(key, shared, **kwargs))
            finally:
                if hog is not None:
                    hog.kill()
            result.update(part=part, data=key, minutes=minutes if part != "epoch" else None, cpu=machine_info()["cpu"])
            print(f"  {part} {key} {framework}: {result['metric']:.4f} after {result['steps']} steps, "
                  f"{result['examples_per_second']:.1f} ex/s, first step at {result['time_to_first_step']:.0f} s",
                  file=sys.stderr, flush=True)
            rows.append(result)
    return rows


def part_floor() -> list[dict[str, Any]]:
    """One training step at a fixed shape, jaxloss-train's and PyTorch's, at float32 and bfloat16,
    against FLOPs, the products alone and the machine's fastest product, once per allocator
    setting (each in a process of its own: glibc reads ``GLIBC_TUNABLES`` at start-up)."""
    rows = []
    for allocator in ALLOCATORS:
        for row in run_worker("benchmarks.bench_finetune", ["--floor-worker"],
                              env={"GLIBC_TUNABLES": None, **ALLOCATORS[allocator]}, label=f"{allocator} allocator"):
            rows.append({"allocator": allocator, **row, "cpu": machine_info()["cpu"]})
    return rows


def floor_worker(batch: int = 32, length: int = 48, repeats: int = 9) -> list[dict[str, Any]]:
    """The timings of :func:`part_floor` in this process, for float32 and bfloat16.

    - the jaxloss step: ``jaxloss-train``'s model, loss, clipping and AdamW in one compiled
      program (bfloat16: ``dtype="bfloat16"``, float32 parameters and moments);
    - the PyTorch step: transformers' ``BertForTokenClassification``, ``clip_grad_norm_``,
      ``torch.optim.AdamW`` (bfloat16: the forward under ``torch.autocast``);
    - the products alone: every matrix product of the step, forward and both gradients, at
      its shape, with operands already in the layout each product reads fastest (``a @ b``
      row-major), in one compiled program;
    - the machine's fastest product: 2048 x 2048 x 2048 in JAX and in PyTorch, the faster
      taken; the step's FLOPs at that rate bound any step from below;
    - the optimizer alone: clipping by the global norm and AdamW over the 22.7M float32
      parameters (the same program for both dtypes: parameters and moments are float32).
    """
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx
    from transformers import BertForTokenClassification

    import jaxloss
    from benchmarks._harness import time_interleaved
    from train.models import load_pretrained
    from train.models.sources import resolve_checkpoint
    from train.optim import make_optimizer

    folder = resolve_checkpoint("minilm")
    labels = 13
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 30000, (batch, length)).astype(np.int32)
    tags = rng.integers(0, labels, (batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    t_ids, t_mask, t_tags = (torch.tensor(a, dtype=torch.long) for a in (ids, mask, tags))
    fns: dict[str, Any] = {}
    flops: dict[str, float] = {}

    optimizer = make_optimizer(weight_decay=0.01, clip_norm=1.0)

    def apply_update(grads: Any, opt_state: Any, params: Any) -> tuple[Any, Any]:
        """Clipping and AdamW, and the update at learning rate 5e-5: the new parameters and state."""
        with jax.numpy_dtype_promotion("standard"):
            updates, new_state = optimizer.update(grads, opt_state, params)
            return jax.tree.map(lambda p, u: p + 5e-5 * u, params, updates), new_state

    def jax_step_fn(dtype: str) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """The step, the model's config, and the state the step advances (parameters donated)."""
        model = load_pretrained(folder, "BertForTokenClassification", strict=False, num_labels=labels, dtype=dtype)
        model.train()
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def step(params, opt_state, rest):
            def loss(p):
                m = nnx.merge(graphdef, p, rest, copy=True)
                return jaxloss.cross_entropy(m(input_ids=ids, attention_mask=mask).logits.astype(jnp.float32), tags)
            return apply_update(jax.grad(loss)(params), opt_state, params)

        state = {"p": params, "o": optimizer.init(params)}
        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(state["p"], state["o"], rest).compile()
        flops[dtype] = float(compiled.cost_analysis().get("flops", float("nan")))

        def run() -> None:
            state["p"], state["o"] = compiled(state["p"], state["o"], rest)
            jax.block_until_ready(state["p"])
        return run, model.config, state

    def optimizer_fn(params: Any, opt_state: Any) -> Any:
        """Clipping and AdamW alone, on copies of ``params`` and ``opt_state`` and gradients as large."""
        args = (jax.tree.map(lambda p: p * 1e-3, params), jax.tree.map(jnp.copy, opt_state),
                jax.tree.map(jnp.copy, params))
        compiled = jax.jit(apply_update).lower(*args).compile()
        return lambda: jax.block_until_ready(compiled(*args))

    def torch_step_fn(dtype: str) -> Any:
        torch.manual_seed(0)
        reference = BertForTokenClassification.from_pretrained(folder, num_labels=labels).train()
        optimizer = torch.optim.AdamW(reference.parameters(), lr=5e-5, weight_decay=0.01)

        def run() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                loss = reference(input_ids=t_ids, attention_mask=t_mask, labels=t_tags).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return run

    def products_fn(cfg: dict[str, Any], dtype: Any) -> tuple[Any, float]:
        # each dense layer: y = x w (m,k)(k,n), dx = g w^T (m,n)(n,k), dw = x^T g (k,m)(m,n);
        # attention per layer: scores q k^T, y = p v and their gradients, as batched products
        d, ff, heads = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"]
        tokens, hd = batch * length, d // heads
        dense = [(tokens, d, d)] * 4 + [(tokens, d, ff), (tokens, ff, d)]
        shapes = [s for s in dense for _ in range(cfg["num_hidden_layers"])] + [(tokens, d, labels)]
        pairs = [p for m, k, n in shapes for p in (((m, k), (k, n)), ((m, n), (n, k)), ((k, m), (m, n)))]
        bh = (batch, heads)
        scores, weighted = (bh + (length, hd), bh + (hd, length)), (bh + (length, length), bh + (length, hd))
        attention = [scores] * 2 + [weighted] * 4  # forward: one of each; backward: dp, and dq, dk, dv
        attention = attention * cfg["num_hidden_layers"]
        key = jax.random.key(1)
        operands = [(jax.random.normal(key, a, dtype), jax.random.normal(key, b, dtype)) for a, b in pairs + attention]

        def products(operands):
            return [jnp.matmul(a, b, preferred_element_type=jnp.float32) for a, b in operands]

        compiled = jax.jit(products).lower(operands).compile()
        return (lambda: jax.block_until_ready(compiled(operands))), float(compiled.cost_analysis().get("flops", 0.0))

    product_flops: dict[str, float] = {}
    for dtype, jdt, tdt in (("float32", jnp.float32, torch.float32), ("bfloat16", jnp.bfloat16, torch.bfloat16)):
        fns[f"jax step {dtype}"], cfg, state = jax_step_fn(dtype)
        if dtype == "float32":  # the same program for both dtypes: parameters and moments are float32
            fns["optimizer alone"] = optimizer_fn(state["p"], state["o"])
        fns[f"torch step {dtype}"] = torch_step_fn(dtype)
        fns[f"products {dtype}"], product_flops[dtype] = products_fn(cfg, jdt)
        a = jnp.ones((2048, 2048), jdt)
        square = jax.jit(lambda a: jnp.matmul(a, a, preferred_element_type=jnp.float32)).lower(a).compile()
        fns[f"jax 2048 {dtype}"] = lambda square=square, a=a: jax.block_until_ready(square(a))
        ta = torch.ones(2048, 2048, dtype=tdt)
        fns[f"torch 2048 {dtype}"] = lambda ta=ta: ta @ ta
    times = time_interleaved(fns, repeats=repeats)
    rows = []
    for dtype in ("float32", "bfloat16"):
        peak = 2 * 2048**3 / min(times[f"jax 2048 {dtype}"], times[f"torch 2048 {dtype}"])
        rows.append({"batch": batch, "length": length, "dtype": dtype, "step_flops": flops[dtype],
                     "product_flops": product_flops[dtype], "jax_step_seconds": times[f"jax step {dtype}"],
                     "torch_step_seconds": times[f"torch step {dtype}"], "products_seconds": times[f"products {dtype}"],
                     "peak_product_flops_per_second": peak, "optimizer_seconds": times["optimizer alone"],
                     "peak_product_by": "jax" if times[f"jax 2048 {dtype}"] <= times[f"torch 2048 {dtype}"] else "torch",
                     "torch_threads": torch.get_num_threads()})
    return rows


def load_results() -> dict[str, Any]:
    path = RESULTS_DIR / "finetune.json"
    return json.loads(path.read_text()) if path.exists() else {"runs": [], "floor": []}


def print_tables(results: dict[str, Any]) -> None:
    rows = []
    by = {(r["part"], r["data"], r["framework"]): r for r in results["runs"]}
    for part in ("budget", "contended", "epoch"):
        for key in TASKS:
            j, t = by.get((part, key, "jaxloss")), by.get((part, key, "torch"))
            if not (j and t):
                continue
            rows.append([part, key, j.get("cpu", "").split(" (")[0], TASKS[key]["metric"], f"{j['metric']:.4f}", f"{t['metric']:.4f}", j["steps"],
                         t["steps"], f"{j['time_to_first_step']:.0f}", f"{t['time_to_first_step']:.0f}",
                         f"{j['examples_per_second']:.1f}", f"{t['examples_per_second']:.1f}",
                         f"{j['examples_per_second'] / t['examples_per_second']:.2f}x",
                         f"{j['eval_seconds']:.1f}", f"{t['eval_seconds']:.1f}"])
    if rows:
        print(format_table(["run", "data", "cpu", "metric", "jaxloss", "torch", "steps jax", "steps torch",
                            "first step jax s", "torch s", "ex/s jax", "ex/s torch", "jax/torch", "eval jax s",
                            "eval torch s"], rows))
    floor = results.get("floor", [])
    if floor:
        print(format_table(
            ["allocator", "dtype", "batch x length", "GFLOP/step", "jax step s", "torch step s", "products s",
             "FLOPs at peak s", "AdamW alone s", "jax/products", "torch/products", "torch/jax", "2x torch needs s"],
            [[f.get("allocator", "default"), f.get("dtype", "float32"), f"{f['batch']}x{f['length']}",
              f"{f['step_flops'] / 1e9:.0f}", f"{f['jax_step_seconds']:.3f}", f"{f['torch_step_seconds']:.3f}",
              f"{f['products_seconds']:.3f}",
              f"{f['step_flops'] / f['peak_product_flops_per_second']:.3f}" if "peak_product_flops_per_second" in f else "",
              f"{f['optimizer_seconds']:.3f}" if "optimizer_seconds" in f else "",
              f"{f['jax_step_seconds'] / f['products_seconds']:.2f}x",
              f"{f['torch_step_seconds'] / f['products_seconds']:.2f}x",
              f"{f['torch_step_seconds'] / f['jax_step_seconds']:.2f}x", f"{f['torch_step_seconds'] / 2:.3f}"]
             for f in floor]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared-data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--parts", default="floor,budget,contended,epoch")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--runs-dir", default=str(ROOT / "runs" / "finetune"))
    ap.add_argument("--floor-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.floor_worker:
        print(json.dumps(floor_worker()))
        return 0
    shared = Path(args.shared_data).resolve()
    runs = Path(args.runs_dir).resolve()
    runs.mkdir(parents=True, exist_ok=True)
    results = load_results()
    keys = [k for k in args.tasks.split(",") if k]
    for part in args.parts.split(","):
        if part == "floor":
            results["floor"] = part_floor()
        else:
            if not shared.is_dir():
                print(f"{shared} not found: the fine-tuning runs need the full data sets", file=sys.stderr)
                return 1
            new = part_runs(part, keys, shared, runs, args.minutes)
            done = {(r["part"], r["data"], r["framework"]) for r in new}
            results["runs"] = [r for r in results["runs"] if (r["part"], r["data"], r["framework"]) not in done] + new
        results["machine"] = machine_info()
        results["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                           text=True).stdout.strip()
        (RESULTS_DIR / "finetune.json").write_text(json.dumps(results, indent=2) + "\n")
    print_tables(results)
    print(f"saved {os.path.relpath(RESULTS_DIR / 'finetune.json', ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
