"""Where a run's wall-clock time goes: seconds per phase, written to ``RUN_DIR/timing.json``.

Example:
  >>> from train.budget import Clock
  >>> timings = Timings(Clock(), Clock().now())
  >>> timings.add("eval", 2.5); timings.add("eval", 1.5)
  >>> timings.as_dict()["eval_seconds"], timings.as_dict()["evaluations"]
  (4.0, 2)
"""

from __future__ import annotations

from typing import Any

from train.budget import Clock


class Timings:
    """Wall-clock seconds per phase of a run (``setup``, ``compile``, ``data`` (batches built
    on the host), ``train`` (steps), ``eval``, ``save``, ``final``), written to ``timing.json`` and summarized in the log."""

    PHASES = ("setup", "compile", "data", "train", "eval", "save", "final")

    def __init__(self, clock: Clock, start: float):
        self.clock = clock
        self.start = start
        self.seconds = dict.fromkeys(self.PHASES, 0.0)
        self.counts = dict.fromkeys(self.PHASES, 0)
        self.extra: dict[str, Any] = {}

    def add(self, phase: str, seconds: float, *, count: bool = True) -> None:
        self.seconds[phase] += seconds
        self.counts[phase] += int(count)

    def since(self, phase: str, begin: float, *, count: bool = True) -> float:
        """Adds the time from ``begin`` to now to ``phase`` (one more of it unless ``count`` is
        False); returns it."""
        seconds = self.clock.now() - begin
        self.add(phase, seconds, count=count)
        return seconds

    def as_dict(self) -> dict[str, Any]:
        total = self.clock.now() - self.start
        return {"total_seconds": total, **{f"{p}_seconds": s for p, s in self.seconds.items()},
                "evaluations": self.counts["eval"], "saves": self.counts["save"], **self.extra}

    def summary(self) -> str:
        d = self.as_dict()
        parts = [f"{p} {d[f'{p}_seconds']:.1f}" for p in self.PHASES]
        return f"time: {d['total_seconds']:.1f} s in all: " + ", ".join(parts) + " s"
