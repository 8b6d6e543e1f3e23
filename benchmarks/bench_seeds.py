"""How much of a fine-tuning gap is seed noise: one run per seed, jaxloss-train and PyTorch.

The packaged all-MiniLM-L6-v2 is fine-tuned for one epoch by ``jaxloss-train`` and by
``benchmarks/torch_finetune.py`` with the hyperparameters of ``bench_finetune`` (its ``TASKS``
table: batch 32, max length 128, 6% warmup then linear decay), once per seed. The seed sets the
new head's initial values, the dropout masks and the data order on both sides. A one-epoch run
is defined in steps, so its metric does not depend on the machine's speed or load. With
``--minutes M`` each run has an equal wall-clock budget instead (``bench_finetune``'s
``budget`` runs, once per seed); that metric depends on the machine.

For each framework the table gives the mean dev metric over the seeds, its sample standard
deviation, and the range; the last row is the difference of the means with its standard error
``sqrt(s_a^2 / n_a + s_b^2 / n_b)``. A difference within two standard errors is not told apart
from noise by these seeds.

    python -m benchmarks.bench_seeds --shared-data ../shared/data --tasks wnut17 --seeds 0,1,2,3,4
    python -m benchmarks.bench_seeds --tasks wnut17 --seeds 0,1,2 --minutes 8 \
        --out benchmarks/results/finetune_seeds_budget.json

Results go to ``benchmarks/results/finetune_seeds.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from benchmarks._harness import RESULTS_DIR, format_table, machine_info
from benchmarks.bench_finetune import TASKS, run_jax, run_torch

ROOT = Path(__file__).resolve().parent.parent


def metrics(key: str, shared: Path, runs: Path, seed: int, minutes: float | None) -> dict[str, float]:
    """The dev metric of each side's final evaluation, both run with ``--seed seed`` for one
    epoch, or for ``minutes`` of wall clock (``bench_finetune``'s runs)."""
    length = dict(minutes=minutes, epochs=None) if minutes else dict(minutes=None, epochs=1.0)
    return {"jaxloss": float(run_jax(key, shared, runs, seed=seed, **length)["metric"]),
            "torch": float(run_torch(key, shared, seed=seed, **length)["metric"])}


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation and range of ``values``.

    >>> spread([0.5, 0.7])["std"]
    0.1414...
    """
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def difference(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """``mean_a - mean_b`` and its standard error ``sqrt(s_a^2 / n_a + s_b^2 / n_b)``.

    >>> difference({"mean": 0.5, "std": 0.0, "n": 3}, {"mean": 0.4, "std": 0.0, "n": 3})["difference"]
    0.09999...
    """
    return {"difference": a["mean"] - b["mean"], "standard_error": (a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"]) ** 0.5}


def table(key: str, runs: dict[str, list[float]]) -> tuple[list[str], list[list[str]]]:
    rows = []
    stats = {name: spread(values) for name, values in runs.items()}
    for name, values in runs.items():
        s = stats[name]
        rows.append([key, name, " ".join(f"{v:.3f}" for v in values), f"{s['mean']:.3f}", f"{s['std']:.3f}",
                     f"{s['min']:.3f}-{s['max']:.3f}"])
    d = difference(stats["jaxloss"], stats["torch"])
    rows.append([key, "jaxloss - torch", "", f"{d['difference']:+.3f}", f"se {d['standard_error']:.3f}", ""])
    return ["data", "framework", "per seed", "mean", "std", "range"], rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared-data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--tasks", default="wnut17")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--runs-dir", default=str(ROOT / "runs" / "seeds"))
    ap.add_argument("--minutes", type=float, help="an equal wall-clock budget per run instead of one epoch")
    ap.add_argument("--out", default=str(RESULTS_DIR / "finetune_seeds.json"))
    args = ap.parse_args(argv)
    shared, runs = Path(args.shared_data), Path(args.runs_dir)
    runs.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, Any] = {"machine": machine_info(), "seeds": seeds, "minutes": args.minutes, "tasks": {}}
    for key in args.tasks.split(","):
        values: dict[str, list[float]] = {"jaxloss": [], "torch": []}
        for seed in seeds:
            for name, value in metrics(key, shared, runs, seed, args.minutes).items():
                values[name].append(value)
            print(f"  {key} seed {seed}: jaxloss {values['jaxloss'][-1]:.4f}, torch {values['torch'][-1]:.4f}",
                  file=sys.stderr, flush=True)
        stats = {name: spread(v) for name, v in values.items()}
        results["tasks"][key] = {"metric": TASKS[key]["metric"], "values": values, "spread": stats,
                                 "difference": difference(stats["jaxloss"], stats["torch"])}
        header, rows = table(key, values)
        print(format_table(header, rows))
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"saved {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
