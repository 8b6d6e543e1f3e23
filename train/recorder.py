"""Where metrics go: ``metrics.jsonl`` (one JSON object per logged step or evaluation) and TensorBoard."""

from __future__ import annotations

import json
import math
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
      >>> import tempfile, json
      >>> run = tempfile.mkdtemp()
      >>> with MetricsRecorder(run, tensorboard=False) as rec:
      ...     rec.write({"step": 1, "train/loss": 2.5})
      >>> json.loads(open(run + "/metrics.jsonl").read())["train/loss"]
      2.5
    """

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._file = None
        self._writer = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.run_dir / METRICS_FILE, "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))

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
