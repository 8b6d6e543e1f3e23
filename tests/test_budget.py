"""The wall-clock budget, driven by a clock the test controls: the horizon follows the pace,
evaluations keep to their share, and the run ends at its horizon whatever the machine's speed."""

from __future__ import annotations

import json

import pytest

from train import budget as budget_module
from train.budget import Budget, Clock


class FakeClock(Clock):
    def __init__(self) -> None:
        self.t = 100.0

    def now(self) -> float:
        return self.t


def _run(budget: Budget, clock: FakeClock, step_seconds, eval_seconds: float = 0.0, save_seconds: float = 0.0):
    """Simulates the training loop's use of a budget; returns (steps run, final horizon, eval steps)."""
    step, horizon, evals = 0, budget.horizon(0), []
    while step < horizon:
        seconds = step_seconds(step)
        clock.t += seconds
        step += 1
        budget.record_step(seconds)
        if budget.should_refit(step):
            horizon = budget.agree(budget.horizon(step))
        if budget.should_evaluate(step):
            clock.t += eval_seconds + save_seconds
            budget.record_eval(eval_seconds)
            budget.record_save(save_seconds)
            evals.append(step)
        if step < horizon and budget.out_of_time():
            break
    return step, horizon, evals


def test_horizon_matches_the_steps_run_and_time_is_kept_for_the_end():
    clock = FakeClock()
    budget = Budget(max_steps=None, epochs=1000, steps_per_epoch=100, max_minutes=2.0, clock=clock, start=clock.t)
    clock.t += 20.0  # setup and compiling
    budget.set_eval_seconds(4.0)
    steps, horizon, evals = _run(budget, clock, lambda s: 0.25, eval_seconds=4.0, save_seconds=0.5)
    # 120 s - 20 s setup - 5 evaluations (4 intermediate + final) of 4.5 s -> about 318 steps of 0.25 s
    assert abs(horizon - steps) <= 0.1 * steps
    assert 290 <= steps <= 330
    assert len(evals) == 4
    assert budget.deadline - clock.t >= budget.reserve() - 1e-9  # the final evaluation and save still fit


def test_a_machine_that_slows_down_moves_the_horizon():
    clock = FakeClock()
    budget = Budget(max_steps=None, epochs=1000, steps_per_epoch=100, max_minutes=1.0, clock=clock, start=clock.t)
    budget.set_eval_seconds(1.0)
    # another process takes the CPU after step 50: steps take 4x as long
    steps, horizon, _ = _run(budget, clock, lambda s: 0.1 if s < 50 else 0.4, eval_seconds=1.0)
    assert abs(horizon - steps) <= 0.1 * steps
    assert clock.t - budget.start <= 60.0


def test_costly_evaluations_are_fewer():
    clock = FakeClock()
    budget = Budget(max_steps=None, epochs=1000, steps_per_epoch=100, max_minutes=1.0, clock=clock, start=clock.t)
    budget.set_eval_seconds(6.0)  # 25% of 60 s fits two of them
    assert budget.planned_evals == 2
    steps, horizon, evals = _run(budget, clock, lambda s: 0.1, eval_seconds=6.0)
    assert len(evals) == 2 and budget.eval_seconds_spent <= 0.25 * 60
    # an evaluation that turns out slower than estimated stops the later ones
    clock2 = FakeClock()
    slow = Budget(max_steps=None, epochs=1000, steps_per_epoch=100, max_minutes=1.0, clock=clock2, start=clock2.t)
    slow.set_eval_seconds(3.0)
    _, _, evals = _run(slow, clock2, lambda s: 0.1, eval_seconds=9.0)
    assert len(evals) == 1 and slow.eval_seconds_spent <= 9.0


def test_step_budget_without_clock_evaluates_four_times():
    budget = Budget(max_steps=50, epochs=3, steps_per_epoch=100)
    assert budget.total_steps == 50 and not budget.paced
    evals = [s for s in range(1, 51) if budget.should_evaluate(s) and budget.record_eval(0.0) is None]
    assert evals == [10, 20, 30, 40]
    fixed = Budget(max_steps=50, epochs=3, steps_per_epoch=100, eval_every=15)
    assert [s for s in range(1, 51) if fixed.should_evaluate(s)] == [15, 30, 45]
    assert Budget(max_steps=None, epochs=0.5, steps_per_epoch=7).total_steps == 4


def test_training_run_under_a_controlled_clock(tmp_path, monkeypatch):
    """The whole loop on a clock that advances 5 ms per reading: the schedule warms up and decays
    to ~0 at the horizon, the horizon equals the steps run, evaluations fit their share."""
    from tests.test_train_e2e import _classify_data
    from train.cli import main as cli_main

    state = {"t": 0.0}

    def now(self):
        state["t"] += 0.005
        return state["t"]

    monkeypatch.setattr(budget_module.Clock, "now", now)
    out = tmp_path / "run"
    args = ["classify", "--train-file", _classify_data(tmp_path, 320, 0), "--eval-file", _classify_data(tmp_path, 64, 1),
            "--output-dir", str(out), "--model-size", "micro", "--batch-size", "16", "--max-length", "32",
            "--vocab-size", "300", "--log-every", "5", "--no-progress", "--learning-rate", "3e-3", "--epochs", "1000",
            "--max-minutes", "0.05", "--compile-cache", "off"]
    assert cli_main(args) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    steps = summary["final_step"]
    assert steps > 20
    assert abs(summary["horizon"] - steps) <= 0.1 * steps
    rates = [r["train/learning_rate"] for r in records if "train/learning_rate" in r]
    assert max(rates) > 0.8 * 3e-3 and rates[-1] < 0.2 * 3e-3
    timing = json.loads((out / "timing.json").read_text())
    assert timing["eval_seconds"] - 0.0 <= 0.25 * 3.0 + 0.1  # the intermediate ones: within their share
    assert timing["total_seconds"] <= 3.0 + 0.5  # the 0.05-minute budget, final evaluation and save included


@pytest.mark.parametrize("minutes", [None, 1.0])
def test_reserve_and_minutes_left(minutes):
    clock = FakeClock()
    budget = Budget(max_steps=10, epochs=None, steps_per_epoch=5, max_minutes=minutes, clock=clock, start=clock.t)
    budget.set_eval_seconds(2.0)
    budget.record_save(1.5)
    assert budget.reserve() == 3.5
    assert budget.minutes_left() == (None if minutes is None else 1.0)


@pytest.mark.parametrize("max_steps, epochs, steps, limit", [
    (20, 3, 15, "--epochs 3 (15 steps of 5 per epoch)"),   # the epochs end first: they are the limit
    (12, 3, 12, "--max-steps 12"),
    (20, None, 20, "--max-steps 20"),
    (None, None, 5, "one epoch (5 steps)"),
])
def test_the_step_limit_names_the_flag_that_sets_it(max_steps, epochs, steps, limit):
    budget = Budget(max_steps=max_steps, epochs=epochs, steps_per_epoch=5, clock=FakeClock())
    assert (budget.total_steps, budget.step_limit) == (steps, limit)


def test_a_log_line_gives_the_learning_rates_of_its_last_step_and_the_mean_loss():
    """Both learning rates (pre-trained weights and new heads) are the last step's, as the schedule
    gives them; the loss is the window's mean."""
    from train.loop import _train_record

    window = [{"train/loss": loss, "train/learning_rate": rate, "train/head_learning_rate": 2 * rate,
               "train/seconds_per_step": 0.5, "train/flops_per_step": None}
              for loss, rate in [(4.0, 1e-5), (2.0, 2e-5), (3.0, 3e-5)]]
    record = _train_record(window, step=3, epoch=0.1, tokens=300)
    assert record["train/learning_rate"] == 3e-5
    assert record["train/head_learning_rate"] == 6e-5
    assert record["train/loss"] == pytest.approx(3.0)


@pytest.mark.parametrize("log_every", [1, 10, 50])
def test_the_pace_is_the_devices_time_when_the_host_runs_ahead(log_every):
    """The host only dispatches most steps (0.01 s) and waits for the devices (0.5 s a step) at
    each log line: the pace is 0.5 s, and the horizon fits the seconds left, at any log interval."""
    clock = FakeClock()
    budget = Budget(max_steps=None, epochs=1000, steps_per_epoch=10, max_minutes=2.0, clock=clock, start=clock.t)
    in_flight = 0
    for step in range(1, 201):
        clock.t += 0.01
        budget.record_step(0.01)
        in_flight += 1
        if step % log_every == 0:
            waited = 0.5 * in_flight - 0.01 * in_flight
            clock.t += waited
            budget.record_sync(waited)
            in_flight = 0
    assert budget.pace() == pytest.approx(0.5)
    assert abs(budget.horizon(200) - (200 + budget.seconds_left() / 0.5)) <= 1  # 20 s left: 40 steps more


def test_before_the_host_waits_the_pace_is_the_mean_host_time():
    budget = Budget(max_steps=100, epochs=None, steps_per_epoch=100)
    for seconds in (0.2, 0.4, 0.2, 0.4, 0.3):
        budget.record_step(seconds)
    assert budget.pace() == pytest.approx(0.3)


def test_a_window_s_seconds_hold_the_wait_for_the_devices(monkeypatch):
    """The wait at a log line is added to the last step's seconds, so tokens/s and MFU count it."""
    import jax.numpy as jnp

    from train import loop

    clock = FakeClock()

    def slow_fetch(pending):
        clock.t += 3.0  # the devices finishing the steps dispatched
        return [{"train/loss": 1.0, "train/finite": 1.0, "train/seconds_per_step": seconds, "train/flops_per_step": None}
                for _, _, seconds, _ in pending]

    monkeypatch.setattr(loop, "_fetch", slow_fetch)
    metrics = loop.StepMetrics()
    for step in range(1, 5):
        metrics.add(step, {"train/loss": jnp.float32(1.0)}, 0.25, None, tokens=10)
    limit_hit, waited = metrics.fetch(clock)
    assert (limit_hit, waited) == (False, 3.0)
    assert sum(w["train/seconds_per_step"] for w in metrics.window) == pytest.approx(4 * 0.25 + 3.0)
    assert metrics.fetch_rest(clock) == 0.0  # nothing left to wait for
