"""Learning curves on the full public data sets, each next to a simple baseline on the same split.

Every data set is trained from scratch by ``jaxloss-train`` (a subprocess running the exact
command that is printed and saved) for a wall-clock budget of ``--minutes``; its eval
curve comes from the run's ``metrics.jsonl`` and the baseline from
``benchmarks/results/baselines.json`` (``python -m benchmarks.bench_baselines``):

================== ========== ================================ ===============================
data set           task       splits                           baseline (main metric)
================== ========== ================================ ===============================
WNUT-17            ner        wnut17train / emerging.dev       most frequent tag (entity F1)
SST-2              classify   train / dev                      TF-IDF + logistic regression (accuracy)
STS-B              regress    train / dev                      ridge on pair features (Pearson)
tiny Shakespeare   lm         first 90% / last 10%             bigram over BPE-8000 ids (perplexity)
Multi30k en-de     seq2seq    train / val                      Dice word-by-word (BLEU)
================== ========== ================================ ===============================

    python -m benchmarks.bench_learning_curves --minutes 6          # all five, ~35 minutes
    python -m benchmarks.bench_learning_curves --only wnut17,sst2   # some of them

Writes ``benchmarks/results/learning_curves.json`` and ``learning_curves.png`` (the main
metric of each run against its step, the baseline dashed); the run folders stay in
``--runs-dir``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._harness import RESULTS_DIR, format_table, save_json

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Curve:
    """One data set: how to train on it and which baseline row it is compared with."""

    key: str  # short name for --only
    dataset: str  # the data set's name in baselines.json
    task: str  # jaxloss-train subcommand
    metric: str  # main eval metric (eval/<task>/<metric>)
    greater_is_better: bool
    baseline: str  # baseline name in baselines.json
    args: tuple[str, ...]  # data flags, with {shared} and {split} placeholders
    eval_every: int = 100  # steps between evaluations
    pretrained: bool = False  # fine-tunes the packaged checkpoint (--model minilm) instead of training from scratch


COMMON = ("--batch-size", "32", "--epochs", "1000", "--log-every", "20", "--no-progress")
SCRATCH = ("--model-size", "tiny", "--vocab-size", "8000")
FINE_TUNED = ("--model", "minilm")

CURVES = (
    Curve("wnut17", "WNUT-17", "ner", "f1", True, "most-frequent-tag",
          ("--train-file", "{shared}/wnut17/wnut17train.conll", "--eval-file", "{shared}/wnut17/emerging.dev.conll",
           "--max-length", "64", "--learning-rate", "2e-3")),
    Curve("sst2", "SST-2", "classify", "accuracy", True, "tfidf-1-2gram+logreg",
          ("--train-file", "{shared}/sst2_sentence_level/stsa.binary.train",
           "--eval-file", "{shared}/sst2_sentence_level/stsa.binary.dev", "--format", "label-first",
           "--max-length", "64", "--learning-rate", "1e-3")),
    Curve("stsb", "STS-B", "regress", "pearson", True, "ridge pair features",
          ("--train-file", "{shared}/stsb/sts-train.csv", "--eval-file", "{shared}/stsb/sts-dev.csv", "--format", "tsv",
           "--text-column", "5", "--text-pair-column", "6", "--label-column", "4", "--pair-encoding", "siamese",
           "--max-length", "64", "--learning-rate", "1e-3")),
    Curve("shakespeare", "tiny Shakespeare", "lm", "perplexity", False, "bigram BPE-8000 ids",
          ("--train-file", "{split}/input.train.txt", "--eval-file", "{split}/input.val.txt", "--max-length", "128",
           "--learning-rate", "2e-3")),
    Curve("multi30k", "Multi30k en-de", "seq2seq", "bleu", True, "Dice word-by-word",
          ("--train-file", "{shared}/multi30k/train.en.gz", "--train-target-file", "{shared}/multi30k/train.de.gz",
           "--eval-file", "{shared}/multi30k/val.en.gz", "--eval-target-file", "{shared}/multi30k/val.de.gz",
           "--max-length", "64", "--learning-rate", "1e-3", "--label-smoothing", "0.1", "--max-eval-examples", "512"), eval_every=200),
    Curve("wnut17-minilm", "WNUT-17", "ner", "f1", True, "most-frequent-tag",
          ("--train-file", "{shared}/wnut17/wnut17train.conll", "--eval-file", "{shared}/wnut17/emerging.dev.conll",
           "--max-length", "128", "--learning-rate", "2e-4"), eval_every=40, pretrained=True),
    Curve("sst2-minilm", "SST-2", "classify", "accuracy", True, "tfidf-1-2gram+logreg",
          ("--train-file", "{shared}/sst2_sentence_level/stsa.binary.train",
           "--eval-file", "{shared}/sst2_sentence_level/stsa.binary.dev", "--format", "label-first",
           "--max-length", "128", "--learning-rate", "1e-4"), eval_every=40, pretrained=True),
    Curve("stsb-minilm", "STS-B", "regress", "pearson", True, "ridge pair features",
          ("--train-file", "{shared}/stsb/sts-train.csv", "--eval-file", "{shared}/stsb/sts-dev.csv", "--format", "tsv",
           "--text-column", "5", "--text-pair-column", "6", "--label-column", "4", "--pair-encoding", "siamese",
           "--max-length", "64", "--learning-rate", "5e-5"), eval_every=40, pretrained=True),
)


def command(curve: Curve, shared: Path, split: Path, out: Path, minutes: float) -> list[str]:
    """The ``jaxloss-train`` command line of one curve."""
    data = [a.format(shared=shared, split=split) for a in curve.args]
    return ["jaxloss-train", curve.task, *data, *(FINE_TUNED if curve.pretrained else SCRATCH), *COMMON,
            "--max-minutes", f"{minutes:g}",
            "--eval-every", str(curve.eval_every), "--output-dir", str(out)]


def baseline_value(curve: Curve, baselines: list[dict[str, Any]]) -> float | None:
    """The baseline's score for the curve's metric on the same split (None when not measured)."""
    for row in baselines:
        if row["dataset"] == curve.dataset and row["baseline"] == curve.baseline and row["metric"] == curve.metric:
            return float(row["value"])
    return None


def eval_curve(run_dir: Path, curve: Curve) -> list[tuple[int, float]]:
    """``(step, value)`` of the main eval metric over the run."""
    key = f"eval/{curve.task}/{curve.metric}"
    points = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if key in record:
            points.append((int(record["step"]), float(record[key])))
    return points


def run_curve(curve: Curve, shared: Path, split: Path, runs: Path, minutes: float) -> dict[str, Any]:
    out = runs / curve.key
    if out.exists():
        import shutil

        shutil.rmtree(out)
    cmd = command(curve, shared, split, out, minutes)
    print("$ " + shlex.join(cmd), file=sys.stderr, flush=True)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "train", *cmd[1:]], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    (runs / f"{curve.key}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{curve.key} failed (log: {runs / f'{curve.key}.log'}):\n{proc.stderr[-3000:]}")
    points = eval_curve(out, curve)
    steps = max((json.loads(l).get("step", 0) for l in (out / "metrics.jsonl").read_text().splitlines()), default=0)
    pick = max if curve.greater_is_better else min
    return {"key": curve.key, "dataset": curve.dataset, "task": curve.task, "metric": curve.metric,
            "command": shlex.join(cmd).replace(str(shared), "../shared/data").replace(str(runs), "runs/curves"),
            "steps": steps, "seconds": round(seconds, 1), "final": points[-1][1] if points else None,
            "best": pick(v for _, v in points) if points else None, "curve": points}


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """One panel per data set: each run's main metric against its step (from scratch and
    fine-tuned), the baseline dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in results))
    fig, axes = plt.subplots(1, len(datasets), figsize=(3.6 * len(datasets), 3.0), squeeze=False)
    for ax, dataset in zip(axes.flat, datasets):
        runs = [r for r in results if r["dataset"] == dataset]
        for r in runs:
            xs, ys = zip(*r["curve"]) if r["curve"] else ((), ())
            ax.plot(xs, ys, marker="o", markersize=3, label=_model_label(r))
        base = runs[0]
        if base["baseline_value"] is not None:
            ax.axhline(base["baseline_value"], color="gray", linestyle="--", label=base["baseline"])
        ax.set_title(f"{dataset}: {base['metric']}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        if base["metric"] == "perplexity":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _model_label(result: dict[str, Any]) -> str:
    return "all-MiniLM-L6-v2, fine-tuned" if result.get("pretrained") else "tiny, from scratch"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared-data", default=str(ROOT.parent / "shared" / "data"), help="folder with the full data sets")
    ap.add_argument("--minutes", type=float, default=6.0, help="wall-clock budget of each run")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(c.key for c in CURVES)}; "
                    "the saved results of the others (same --minutes) are kept")
    ap.add_argument("--runs-dir", default=str(ROOT / "runs" / "curves"), help="where the run folders go")
    args = ap.parse_args(argv)

    shared = Path(args.shared_data).resolve()
    if not shared.is_dir():
        print(f"{shared} not found: the learning curves need the full data sets", file=sys.stderr)
        return 1
    chosen = [c for c in CURVES if args.only is None or c.key in args.only.split(",")]
    runs = Path(args.runs_dir).resolve()
    runs.mkdir(parents=True, exist_ok=True)
    from benchmarks.baselines import split_text

    split_dir = runs / "shakespeare_split"
    split_text(shared / "tinyshakespeare/input.txt", val_fraction=0.1, out_dir=split_dir)
    baselines = json.loads((RESULTS_DIR / "baselines.json").read_text())["results"]

    results = []
    for curve in chosen:
        r = run_curve(curve, shared, split_dir, runs, args.minutes)
        r.update(baseline=curve.baseline, baseline_value=baseline_value(curve, baselines),
                 greater_is_better=curve.greater_is_better, pretrained=curve.pretrained)
        results.append(r)
        print(f"  {curve.dataset}: {curve.metric} final {r['final']} best {r['best']} after {r['steps']} steps; "
              f"{curve.baseline} {r['baseline_value']}", file=sys.stderr, flush=True)

    results = _with_kept_results(results, args.minutes)
    rows = []
    for r in results:
        base = r["baseline_value"]
        beats = None if base is None or r["best"] is None else (r["best"] > base if r["greater_is_better"] else r["best"] < base)
        rows.append([r["dataset"], _model_label(r), r["task"], r["metric"], r["steps"], _num(r["final"]), _num(r["best"]),
                     r["baseline"], _num(base), {True: "yes", False: "no", None: "-"}[beats]])
    print(format_table(["data set", "model", "task", "metric", "steps", "final", "best", "baseline", "baseline value", "beats"],
                       rows))
    png = RESULTS_DIR / "learning_curves.png"
    plot(results, png)
    path = save_json("learning_curves", {"minutes": args.minutes, "results": results})
    print(f"saved {os.path.relpath(path, ROOT)} and {os.path.relpath(png, ROOT)}", file=sys.stderr)
    return 0


def _with_kept_results(results: list[dict], minutes: float) -> list[dict]:
    """``results`` plus the saved results of the data sets not run now (same budget), in
    the order of :data:`CURVES`."""
    path = RESULTS_DIR / "learning_curves.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    if saved.get("minutes") != minutes:
        return results
    by_key = {r.get("key", r["dataset"]): r for r in saved.get("results", [])}
    by_key.update({r["key"]: r for r in results})
    order = [c.key for c in CURVES]
    return sorted(by_key.values(), key=lambda r: order.index(r.get("key")) if r.get("key") in order else len(order))


def _num(x: float | None) -> str:
    return "-" if x is None else (f"{x:.4f}" if abs(x) < 10 else f"{x:.1f}")


if __name__ == "__main__":
    sys.exit(main())
