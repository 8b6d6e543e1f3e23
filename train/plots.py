"""PNG plots of a run's learning curves, from its ``metrics.jsonl`` (``jaxloss-train plot RUN_DIR``)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from train.recorder import read_metrics


def plot_run(run_dir: str | Path) -> list[Path]:
    """Writes ``plots/train.png`` (every loss term) and ``plots/eval.png`` (every eval metric).

    Returns the paths written. Uses matplotlib's non-interactive Agg backend.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    series: dict[str, dict[str, list[tuple[int, float]]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
    for record in records:
        step = record.get("step")
        for key, value in record.items():
            group = key.split("/", 1)[0]
            if group in series and isinstance(value, (int, float)) and step is not None:
                series[group][key].append((step, float(value)))
    out_dir = run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for group, curves in series.items():
        keys = sorted(k for k in curves if not k.endswith(("/learning_rate", "/tokens_per_second", "/examples_per_second", "/seconds")))
        if not keys:
            continue
        cols = min(3, len(keys))
        rows = (len(keys) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
        for ax, key in zip(axes.flat, keys):
            xs, ys = zip(*curves[key])
            ax.plot(xs, ys, marker="o" if group == "eval" else None, markersize=3)
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(keys):]:
            ax.axis("off")
        fig.tight_layout()
        path = out_dir / f"{group}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
