"""The progress bar keeps its total while the budget's horizon moves, and never passes it."""

from __future__ import annotations

import pytest

from train.budget import Budget, Clock
from train.progress import Progress


class _Clock(Clock):
    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t


def test_a_wall_clock_budget_counts_seconds_of_a_fixed_total(capsys):
    clock = _Clock()
    budget = Budget(max_steps=None, epochs=100, steps_per_epoch=50, max_minutes=1.0, clock=clock)
    progress = Progress(budget, budget.total_steps, 0)
    assert progress.bar.total == 60
    horizons = []
    for step in range(1, 80):
        clock.t += 1.0
        budget.record_step(1.0)
        horizon = budget.horizon(step)
        horizons.append(horizon)
        progress.step(step, horizon, loss=1.0)
        assert progress.bar.total == 60 and progress.bar.n == min(60, round(clock.t))
    assert len(set(horizons)) > 1  # the horizon moved; the bar's total did not
    assert f"step 79/{horizons[-1]}" in progress.bar.postfix
    progress.close()


@pytest.mark.parametrize("start", [0, 7])
def test_a_step_budget_counts_steps_up_to_the_horizon(start, capsys):
    budget = Budget(max_steps=20, epochs=None, steps_per_epoch=50)
    progress = Progress(budget, 20, start)
    for step in range(start + 1, 21):
        progress.step(step, 20, loss=0.5)
        assert progress.bar.n == step and progress.bar.total == 20
    progress.close()


def test_disabled_shows_nothing(capsys):
    progress = Progress(Budget(max_steps=3, epochs=None, steps_per_epoch=3), 3, 0, enabled=False)
    progress.step(1, 3, loss=0.1)
    progress.close()
    assert capsys.readouterr().err == ""
