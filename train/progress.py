"""The progress bar of a training run, whose total never changes while it runs.

A run bounded by steps (``--max-steps``, ``--epochs``) counts steps: its total is known at the
start. A run bounded by ``--max-minutes`` counts seconds of its budget: its horizon (the step it
will end at) moves as the pace is measured, so the bar's total is the budget, and the step and
the planned horizon are shown beside it (``step 120/300``).
"""

from __future__ import annotations

from typing import Any

from train.budget import Budget


class Progress:
    """A ``tqdm`` bar over steps, or over the seconds of a wall-clock budget.

    Args:
      budget: the run's budget (its clock and deadline).
      horizon: the step the run plans to end at.
      step: the first step (a resumed run's).
      enabled: False: no bar (other processes, ``--no-progress``).
    """

    def __init__(self, budget: Budget, horizon: int, step: int, *, enabled: bool = True):
        self.budget = budget
        self.loss: float | None = None
        self.bar: Any = None
        if not enabled:
            return
        from tqdm.auto import tqdm

        if budget.paced:
            total = round(budget.seconds)
            self.bar = tqdm(total=total, initial=min(total, round(self._elapsed())), desc="train", unit="s",
                            dynamic_ncols=True,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s [{elapsed}{postfix}]")
            self.bar.set_postfix_str(f"step {step}/{horizon}", refresh=False)
        else:
            self.bar = tqdm(total=horizon, initial=step, desc="train", unit="step", dynamic_ncols=True)

    def _elapsed(self) -> float:
        return self.budget.clock.now() - self.budget.start

    def step(self, step: int, horizon: int, loss: float | None = None) -> None:
        """After ``step``: advances the bar and shows the loss when given (the loss of the last
        fetched step: metrics reach the host at log steps) and, on a budget, the horizon."""
        if self.bar is None:
            return
        if loss is not None:
            self.loss = loss
        shown = [] if self.loss is None else [f"loss={self.loss:.4f}"]
        if self.budget.paced:
            self.bar.n = min(self.bar.total, round(self._elapsed()))
            shown.insert(0, f"step {step}/{horizon}")
        else:
            self.bar.n = min(self.bar.total, step)
        self.bar.set_postfix_str(", ".join(shown), refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
