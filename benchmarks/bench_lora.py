"""LoRA against full fine-tuning of the same checkpoint on the same data: trainable parameters,
optimizer-state bytes, step time, XLA's planned step memory and the dev metric.

Both runs fine-tune all-MiniLM-L6-v2 (``--model minilm``) with ``jaxloss-train`` for the same
number of epochs, one after the other, on WNUT-17 and SST-2 from ``../shared/data`` (the data
sets and settings of ``bench_finetune``). The full run uses that benchmark's learning rate;
the LoRA run ``--lora-rank 8`` (query and value, the head trained in full) and LoRA's default
learning rate, or ``--lora-learning-rate``. The figures come from each run's ``summary.json`` (trainable parameters,
``optimizer_state_bytes``: AdamW's moments, ``train_step_memory_bytes``: arguments + outputs +
temporaries - donated buffers of the compiled step, per device) and ``metrics.jsonl`` (the
median seconds per step over the logged windows after the first).

    python -m benchmarks.bench_lora                       # 1 epoch each, saves benchmarks/results/lora.json
    python -m benchmarks.bench_lora --tasks wnut17 --epochs 0.25
    python -m benchmarks.bench_lora --lora-learning-rate 2e-3 --out benchmarks/results/lora_lr2e-3.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from benchmarks._harness import format_table, save_json
from benchmarks.bench_finetune import ROOT, TASKS, train_minilm

LORA_FLAGS = ["--lora-rank", "8"]


def run(key: str, mode: str, shared: Path, runs: Path, epochs: float, lora_learning_rate: float | None) -> dict[str, Any]:
    """One ``jaxloss-train`` run, full or LoRA; its measured figures."""
    spec = TASKS[key]
    flags = ["--epochs", f"{epochs:g}", "--eval-every", "100000"]
    if mode == "lora":
        flags += LORA_FLAGS + (["--learning-rate", f"{lora_learning_rate:g}"] if lora_learning_rate else [])
    else:
        flags += ["--learning-rate", str(spec["learning_rate"])]
    result = train_minilm(key, shared, runs / f"{key}-{mode}", flags)
    summary = result.summary
    return {"task": key, "mode": mode, "steps": summary["final_step"],
            "trainable_parameters": summary["trainable_parameters"], "parameters": summary["parameters"],
            "optimizer_state_bytes": summary["optimizer_state_bytes"],
            "train_step_memory_bytes": summary["train_step_memory_bytes"],
            "seconds_per_step": result.seconds_per_step,
            "metric_name": spec["metric"], "metric": summary["final"][f"eval/{spec['task']}/{spec['metric']}"],
            "command": result.command}


def table(results: list[dict[str, Any]]) -> str:
    rows = []
    for key in dict.fromkeys(r["task"] for r in results):
        full = next(r for r in results if r["task"] == key and r["mode"] == "full")
        lora = next(r for r in results if r["task"] == key and r["mode"] == "lora")
        rows.append([key, "trainable parameters", full["trainable_parameters"], lora["trainable_parameters"],
                     lora["trainable_parameters"] / full["trainable_parameters"]])
        rows.append([key, "optimizer state (MiB)", full["optimizer_state_bytes"] / 2**20,
                     lora["optimizer_state_bytes"] / 2**20, lora["optimizer_state_bytes"] / full["optimizer_state_bytes"]])
        if full["train_step_memory_bytes"] and lora["train_step_memory_bytes"]:
            rows.append([key, "step memory, XLA (MiB)", full["train_step_memory_bytes"] / 2**20,
                         lora["train_step_memory_bytes"] / 2**20,
                         lora["train_step_memory_bytes"] / full["train_step_memory_bytes"]])
        if full["seconds_per_step"] and lora["seconds_per_step"]:
            rows.append([key, "seconds per step", full["seconds_per_step"], lora["seconds_per_step"],
                         lora["seconds_per_step"] / full["seconds_per_step"]])
        rows.append([key, f"dev {full['metric_name']} ({full['steps']} steps)", full["metric"], lora["metric"],
                     lora["metric"] - full["metric"]])
    return format_table(["task", "figure", "full", "LoRA r=8", "LoRA / full (metric: difference)"], rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared-data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--lora-learning-rate", type=float, default=None,
                    help="peak learning rate of the LoRA runs (default: jaxloss-train's LoRA default, train.config.LORA_LEARNING_RATE)")
    ap.add_argument("--runs-dir", default=str(ROOT / "runs" / "lora"))
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/lora.json)")
    args = ap.parse_args(argv)
    shared, runs = Path(args.shared_data).resolve(), Path(args.runs_dir).resolve()
    runs.mkdir(parents=True, exist_ok=True)
    results = [run(key, mode, shared, runs, args.epochs, args.lora_learning_rate) for key in args.tasks.split(",") if key
               for mode in ("full", "lora")]
    print(table(results))
    command = " ".join(["python -m benchmarks.bench_lora", *(argv if argv is not None else sys.argv[1:])])
    path = save_json("lora", {"command": command, "epochs": args.epochs, "results": results}, args.out)
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
