"""Where metrics go: ``metrics.jsonl`` (one JSON object per logged step or evaluation) and TensorBoard."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

METRICS_FILE = "metrics.jsonl"


def _plain(value: Any) -> Any:
    """A JSON-able Python scalar from a numpy / JAX scalar (NaN and inf as strings JSON accepts)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsRecorder:
    """Appends records to ``RUN_DIR/metrics.jsonl`` and mirrors numbers to TensorBoard event files.

    Example:
      >>> import tempfile
      >>> run = tempfile.mkdtemp()
      >>> with MetricsRecorder(run, tensorboard=False) as rec:
      ...     rec.write({"step": 1, "train/loss": 2.5})
      >>> read_metrics(run)[0]["train/loss"]
      2.5

    A resumed run passes ``resume_step``, the step its checkpoint holds: records of later steps,
    written by the run that stopped after that checkpoint, are removed from ``metrics.jsonl``
    and purged from TensorBoard's view (its ``purge_step``), so that every step keeps one record.
    ``resume_step=-1`` starts both afresh.
    """

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True, enabled: bool = True,
                 resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._file = None
        self._writer = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            truncate_metrics(self.run_dir, resume_step)
        self._file = open(self.run_dir / METRICS_FILE, "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter

            purge = {} if resume_step is None else {"purge_step": resume_step + 1}
            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"), **purge)

    def write(self, record: Mapping[str, Any]) -> None:
        """Writes one record; ``record["step"]`` is the x axis in TensorBoard."""
        if not self.enabled:
            return
        plain = {k: _plain(v) for k, v in record.items()}
        self._file.write(json.dumps(plain) + "\n")
        if self._writer is not None:
            step = int(plain.get("step", 0))
            for key, value in plain.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "MetricsRecorder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def truncate_metrics(run_dir: str | Path, last_step: int) -> int:
    """Removes the records of steps after ``last_step`` from ``RUN_DIR/metrics.jsonl`` (the
    file is replaced whole, never left half-written); returns how many were removed.

    Example:
      >>> import tempfile, pathlib
      >>> run = tempfile.mkdtemp()
      >>> _ = pathlib.Path(run, "metrics.jsonl").write_text('{"step": 10}\\n{"step": 20}\\n{"step": 30}\\n')
      >>> truncate_metrics(run, 20), [r["step"] for r in read_metrics(run)]
      (1, [10, 20])
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = []
    for line in lines:
        try:
            step = int(json.loads(line).get("step", 0))
        except (json.JSONDecodeError, TypeError, ValueError):
            continue  # a line cut short by a killed process
        if step <= last_step:
            kept.append(line)
    if len(kept) != len(lines):
        partial = path.with_name(path.name + ".partial")
        partial.write_text("".join(line + "\n" for line in kept))
        os.replace(partial, path)
    return len(lines) - len(kept)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``RUN_DIR/metrics.jsonl``, naming the line of any that is not JSON."""
    path = Path(run_dir) / METRICS_FILE
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not a JSON record ({err})") from None
    return records
