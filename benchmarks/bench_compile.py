"""Compile time of the training step, with layers looped or scanned, against depth and --grad-accum.

For each model the step of ``train.step.make_train_step`` (forward, loss, backward, AdamW) is
traced and lowered (``jax.jit(step).lower``: Python runs the model once per traced layer and
micro-batch), then compiled by XLA (``.compile()``), without the persistent cache:

- ``looped``: ``scan_layers=False``, every layer traced and compiled on its own;
- ``scanned``: ``scan_layers=True``, one layer traced and compiled, run by ``jax.lax.scan``.

Gradient accumulation is always a scan over micro-batches (``train.step.micro_batches``), so
``--grad-accum 8`` costs what 1 does plus the loop. The depth sweep (BERT-base width, 2 / 6 / 12
layers) shows whether compile time grows with the number of layers. The step time (fastest of
``--repeats``, after one warm-up) is what each program costs to run, measured side by side.

    python -m benchmarks.bench_compile            # BERT-base NER, GPT-2 LM, 8 x 128; saves results/compile.json
    python -m benchmarks.bench_compile --quick    # narrow models, a smoke test
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from benchmarks._harness import format_table, save_json, time_interleaved


def _model_configs(quick: bool) -> dict[str, tuple[dict[str, Any], str]]:
    from transformers import BertConfig, GPT2Config

    width = dict(hidden_size=64, num_attention_heads=4, intermediate_size=256) if quick else \
        dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072)
    bert = BertConfig(vocab_size=30522, num_hidden_layers=12, num_labels=9, **width).to_dict()
    gpt2 = GPT2Config(vocab_size=50257, n_embd=width["hidden_size"], n_head=width["num_attention_heads"],
                      n_layer=12, n_positions=1024).to_dict()
    return {"bert-base NER": (bert, "BertForTokenClassification"), "gpt2-small LM": (gpt2, "GPT2LMHeadModel")}


def _task(architecture: str) -> Any:
    from train.tasks import LmTask, NerTask

    if architecture == "GPT2LMHeadModel":
        return LmTask(name="lm", train_file=None, eval_file=None)
    task = NerTask(name="ner", train_file=None, eval_file=None)
    task.labels = ["O"] + [f"{p}-{t}" for t in ("PER", "ORG", "LOC", "MISC") for p in "BI"]
    return task


def _batch(architecture: str, rows: int, length: int) -> dict[str, Any]:
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    batch = {"input_ids": jnp.asarray(rng.integers(5, 1000, (rows, length)), jnp.int32),
             "attention_mask": jnp.ones((rows, length), jnp.int32), "example_mask": jnp.ones((rows,), bool)}
    if architecture != "GPT2LMHeadModel":
        batch["labels"] = jnp.asarray(rng.integers(0, 9, (rows, length)), jnp.int32)
    return batch


def measure(config: dict[str, Any], architecture: str, *, layers: int, scan: bool, grad_accum: int, rows: int,
            length: int) -> dict[str, Any]:
    """Trace + lower and compile seconds of one training step; the compiled step and its inputs."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import jaxloss
    from train import sharding
    from train.models import from_config
    from train.step import make_train_step

    depth_key = "n_layer" if architecture == "GPT2LMHeadModel" else "num_hidden_layers"
    with sharding.unsharded():
        model = from_config({**config, depth_key: layers}, architecture, scan_layers=scan)
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    task = _task(architecture)
    optimizer = optax.adamw(1e-4)
    step = make_train_step(graphdef, [task], jaxloss.CompositeLoss((jaxloss.Term(task.name),)), optimizer, grad_accum)
    opt_state = optimizer.init((params, {}))
    args = (params, {}, opt_state, rest, jnp.asarray(0), jnp.asarray(1.0, jnp.float32),
            {task.name: _batch(architecture, rows, length)}, jax.random.key(0))
    start = time.perf_counter()
    lowered = jax.jit(step).lower(*args)
    traced = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compiled_s = time.perf_counter() - start
    return {"trace_lower_s": traced, "compile_s": compiled_s, "total_s": traced + compiled_s,
            "run": lambda: jax.block_until_ready(compiled(*args))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="narrow models (64 wide): a smoke test")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per program")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/compile[_quick].json)")
    args = parser.parse_args(argv)

    cases = []  # (model, layers, grad_accum)
    for name in _model_configs(args.quick):
        cases += [(name, 12, 1), (name, 12, 8)]
    cases += [("bert-base NER", 2, 1), ("bert-base NER", 6, 1)]
    rows, runs = [], {}
    for name, layers, accum in cases:
        config, arch = _model_configs(args.quick)[name]
        row = {"model": name, "layers": layers, "grad_accum": accum}
        for mode in ("looped", "scanned"):
            result = measure(config, arch, layers=layers, scan=mode == "scanned", grad_accum=accum, rows=args.rows,
                             length=args.length)
            runs[(name, layers, accum, mode)] = result.pop("run")
            row[mode] = result
            print(f"{name}, {layers} layers, grad_accum {accum}, {mode}: trace+lower {result['trace_lower_s']:.1f} s, "
                  f"compile {result['compile_s']:.1f} s", flush=True)
        if accum == 1 and layers == 12:
            times = time_interleaved({mode: runs[(name, layers, accum, mode)] for mode in ("looped", "scanned")},
                                     repeats=args.repeats)
            for mode, seconds in times.items():
                row[mode]["step_s"] = seconds
        for mode in ("looped", "scanned"):
            runs.pop((name, layers, accum, mode))  # free the compiled programs and their inputs
        rows.append(row)

    table = []
    for row in rows:
        looped, scanned = row["looped"], row["scanned"]
        table.append([row["model"], row["layers"], row["grad_accum"], looped["trace_lower_s"], looped["compile_s"],
                      scanned["trace_lower_s"], scanned["compile_s"],
                      f"{looped['total_s'] / scanned['total_s']:.2f}x",
                      f"{scanned['step_s'] / looped['step_s']:.2f}x" if "step_s" in looped else "-"])
    print()
    print(f"batch {args.rows} x {args.length}; seconds; speed-up = looped / scanned total; step = scanned / looped step time")
    print(format_table(["model", "layers", "accum", "looped trace", "looped compile", "scanned trace", "scanned compile",
                        "speed-up", "step time"], table))
    path = save_json("compile_quick" if args.quick else "compile",
                     {"rows": args.rows, "length": args.length, "results": rows}, args.output)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
