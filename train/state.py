"""What a training run changes as it goes: the state its steps advance and the best evaluation so far.

:class:`TrainState` is what each step replaces (the parameters, the optimizer's state, the
step count, the data positions) and what a checkpoint holds of it; :class:`Best` follows the
evaluations for ``--early-stopping`` and for the model the run writes. Everything else a run
uses is set up once and does not change.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping


@dataclasses.dataclass
class TrainState:
    """The state a training step advances.

    Attributes:
      params: the trained parameters (with LoRA: the adapters and the new heads).
      log_vars: the composite loss's learned weights.
      opt_state: the optimizer's state of both.
      step: the steps run so far.
      positions: task -> the data position after the last step run (what a save records).
      key: the run's random key; each step folds in its number.
      saved_step: the step of the newest checkpoint this run resumed from or wrote (-1: none).
    """

    params: Any
    log_vars: Any
    opt_state: Any
    step: int
    positions: dict[str, dict[str, int]]
    key: Any
    saved_step: int = -1

    @property
    def arrays(self) -> tuple[Any, Any, Any]:
        """``(params, log_vars, opt_state)``: what the train step takes and returns, and what a checkpoint holds."""
        return self.params, self.log_vars, self.opt_state


@dataclasses.dataclass
class Best:
    """The best evaluation by ``metric`` so far, and the evaluations since it improved.

    Example:
      >>> best = Best("eval/ner/f1", greater=True)
      >>> best.record(10, {"eval/ner/f1": 0.5}); best.record(20, {"eval/ner/f1": 0.4})
      >>> best.step, best.value, best.evals_without_improvement
      (10, 0.5, 1)
    """

    metric: str
    greater: bool
    step: int | None = None
    value: float | None = None
    evals_without_improvement: int = 0

    def improved(self, value: float | None) -> bool:
        """Whether ``value`` (a finite one) beats the best so far."""
        if value is None or not math.isfinite(value):
            return False
        return self.value is None or (value > self.value if self.greater else value < self.value)

    def record(self, step: int, metrics: Mapping[str, float]) -> None:
        """An intermediate evaluation at ``step``: the new best, or one more without improvement."""
        if self.improved(metrics.get(self.metric)):
            self.step, self.value = step, metrics[self.metric]
            self.evals_without_improvement = 0
        else:
            self.evals_without_improvement += 1

    def record_final(self, step: int, metrics: Mapping[str, float]) -> None:
        """The final evaluation at ``step``: the best where it improved or where none was recorded."""
        if self.improved(metrics.get(self.metric)) or self.step is None:
            self.step, self.value = step, metrics.get(self.metric)
