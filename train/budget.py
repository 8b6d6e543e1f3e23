"""When a run stops and evaluates: the step, epoch and wall-clock budgets, and the pace that fits them.

A run stops at ``--max-steps``, after ``--epochs``, or when ``--max-minutes`` runs out,
whichever comes first. The wall-clock budget counts everything from the start of the run:
reading data, loading the model, compiling, training steps, evaluations and saves, and the
final evaluation and save. The run therefore plans:

- **the horizon** ``H``, the step it will end at, which also sets the learning-rate schedule:

  .. math::
      H = s + \\left\\lfloor \\frac{T_{\\text{left}} - R - n_{\\text{left}} (e + c)}{p} \\right\\rfloor

  with ``s`` the steps done, ``T_left`` the seconds left, ``R = e + c`` the reserve for the
  final evaluation ``e`` and save ``c``, ``n_left`` the intermediate evaluations still planned,
  and ``p`` the pace: the mean wall time of the last :data:`PACE_WINDOW` steps (so a machine
  that slows down, or speeds up, moves the horizon within a few steps). It is refitted every
  :data:`REFIT_EVERY` steps, and the run stops when it reaches it.
- **intermediate evaluations**: 4 by default (evenly spaced over the horizon), fewer when they
  would take more than ``eval_fraction`` (25%) of the budget at the measured evaluation time;
  one that would push the evaluations past that share is skipped.

The learning rate follows the schedule over the horizon (:func:`learning_rates`): a run on a
wall-clock budget decays to the step it will end at, wherever that turns out to be.

The clock is :class:`Clock`, which tests replace to drive a budget without depending on the
machine's speed.

Example:
  >>> class Fake(Clock):
  ...     t = 0.0
  ...     def now(self): return self.t
  >>> clock = Fake()
  >>> budget = Budget(max_steps=None, epochs=100, steps_per_epoch=50, max_minutes=1.0, clock=clock)
  >>> budget.set_eval_seconds(3.0)          # a full evaluation takes 3 s: 4 of them fit in 25% of 60 s
  >>> budget.planned_evals
  4
  >>> for _ in range(20): budget.record_step(0.125)
  >>> clock.t = 10.0                        # 10 s gone (setup, compiling, 20 steps)
  >>> budget.horizon(20)                    # 50 s left - 4 x 3 s of evaluations - 3 s final = 35 s
  300
"""

from __future__ import annotations

import collections
import math
import time
from typing import TYPE_CHECKING, Callable

from train.optim import learning_rate_at

if TYPE_CHECKING:
    from train.config import TrainConfig

PACE_WINDOW = 20  # steps in the pace's moving mean
REFIT_EVERY = 10  # steps between refits of the horizon
DEFAULT_INTERMEDIATE_EVALS = 4  # evaluations before the final one, when neither --eval-every nor the clock limits them


class Clock:
    """Seconds from a monotonic clock (``time.monotonic``); tests substitute their own."""

    def now(self) -> float:
        return time.monotonic()


class Budget:
    """The stopping rules of a run and its plan of steps and evaluations.

    Args:
      max_steps, epochs, steps_per_epoch: the step budget is ``min(max_steps, ceil(epochs *
        steps_per_epoch))`` (either may be None).
      max_minutes: the wall-clock budget, counted from ``start`` (default: now); None: none.
      eval_every: evaluate every this many steps (overrides the plan).
      eval_fraction: the largest share of the wall-clock budget intermediate evaluations take.
      clock: the time source.
      start: when the run started, on ``clock``.
    """

    def __init__(self, *, max_steps: int | None, epochs: float | None, steps_per_epoch: int,
                 max_minutes: float | None = None, eval_every: int | None = None, eval_fraction: float = 0.25,
                 clock: Clock | None = None, start: float | None = None):
        self.clock = clock or Clock()
        self.start = self.clock.now() if start is None else start
        epochs_steps = math.ceil(epochs * steps_per_epoch) if epochs else None
        candidates = [s for s in (max_steps, epochs_steps) if s]
        self.total_steps = min(candidates) if candidates else steps_per_epoch
        if max_steps and self.total_steps == max_steps:
            self.step_limit = f"--max-steps {max_steps}"
        elif epochs_steps:
            self.step_limit = f"--epochs {epochs:g} ({epochs_steps} steps of {steps_per_epoch} per epoch)"
        else:
            self.step_limit = f"one epoch ({steps_per_epoch} steps)"
        self.max_minutes = max_minutes
        self.seconds = 60.0 * max_minutes if max_minutes else None
        self.deadline = self.start + self.seconds if self.seconds else None
        self.eval_every = eval_every
        self.eval_fraction = eval_fraction
        self.eval_seconds: float | None = None  # one full evaluation
        self.save_seconds = 0.0  # one save (the largest seen)
        self.eval_seconds_spent = 0.0  # in intermediate evaluations so far
        self.evals_done = 0
        self.planned_evals = DEFAULT_INTERMEDIATE_EVALS
        self._steps: collections.deque[float] = collections.deque(maxlen=PACE_WINDOW)
        self._steps_run, self._step_seconds = 0, 0.0  # in all: steps recorded, their seconds and the waits
        # (steps run, seconds) where the host had waited for the devices; (0, 0.0): before the first step
        self._synced: collections.deque[tuple[int, float]] = collections.deque([(0, 0.0)], maxlen=PACE_WINDOW + 1)
        self._horizon = self.total_steps

    # ------------------------------------------------------------------ measurements

    def record_step(self, seconds: float) -> None:
        """The host spent ``seconds`` on a step: building its batch, dispatching it, and waiting
        for an earlier one where too many were queued on the devices."""
        self._steps.append(seconds)
        self._steps_run += 1
        self._step_seconds += seconds

    def record_sync(self, waited: float) -> None:
        """The host waited ``waited`` seconds for the devices to finish every step dispatched (to
        fetch their metrics). From one such point to the next, the steps' host seconds and the
        waits add up to the devices' time, whatever ran ahead of what in between."""
        self._step_seconds += waited
        if self._synced[-1][0] < self._steps_run:
            self._synced.append((self._steps_run, self._step_seconds))

    def record_eval(self, seconds: float) -> None:
        """An intermediate evaluation took ``seconds`` (it also updates the estimate of one)."""
        self.evals_done += 1
        self.eval_seconds_spent += seconds
        self.eval_seconds = seconds

    def record_save(self, seconds: float) -> None:
        self.save_seconds = max(self.save_seconds, seconds)

    def set_eval_seconds(self, seconds: float) -> None:
        """The estimated (or measured) time of one full evaluation; plans how many fit."""
        self.eval_seconds = seconds
        if self.seconds is not None and self.eval_every is None:
            affordable = int(self.eval_fraction * self.seconds / max(seconds, 1e-9))
            self.planned_evals = max(0, min(DEFAULT_INTERMEDIATE_EVALS, affordable))

    def pace(self) -> float | None:
        """Seconds per step (None before 5 steps): between the last point where the host had
        waited for the devices and the latest earlier one at least :data:`PACE_WINDOW` steps
        before it (or the earliest kept), ``(seconds_b - seconds_a) / (steps_b - steps_a)``;
        before the first such point, the mean host time of the last :data:`PACE_WINDOW` steps.

        The host runs ahead of the devices, so one step's host time says little: after a wait
        the next steps are only dispatched, and the wait holds the time of those before it.

        >>> budget = Budget(max_steps=100, epochs=None, steps_per_epoch=100)
        >>> for _ in range(10):
        ...     budget.record_step(0.01)  # dispatched; the devices take 0.5 s a step
        >>> budget.record_sync(4.9)
        >>> round(budget.pace(), 3)
        0.5
        """
        if len(self._steps) < 5:
            return None
        steps_b, seconds_b = self._synced[-1]
        earlier = [(n, t) for n, t in list(self._synced)[:-1] if steps_b - n >= PACE_WINDOW]
        steps_a, seconds_a = earlier[-1] if earlier else self._synced[0]
        if steps_b > steps_a:
            return (seconds_b - seconds_a) / (steps_b - steps_a)
        return sum(self._steps) / len(self._steps)

    # ------------------------------------------------------------------ the plan

    @property
    def paced(self) -> bool:
        return self.deadline is not None

    def seconds_left(self) -> float | None:
        return None if self.deadline is None else self.deadline - self.clock.now()

    def reserve(self) -> float:
        """Seconds kept for the final evaluation and save."""
        return (self.eval_seconds or 0.0) + self.save_seconds

    def evals_left(self) -> int:
        return max(0, self.planned_evals - self.evals_done) if self.eval_every is None else 0

    def horizon(self, step: int) -> int:
        """The step the run ends at: the step budget, or sooner where the clock runs out first."""
        left, pace = self.seconds_left(), self.pace()
        if left is None or pace is None:
            return self._horizon
        train_seconds = left - self.reserve() - self.evals_left() * ((self.eval_seconds or 0.0) + self.save_seconds)
        self._horizon = max(step + 1, min(self.total_steps, step + int(max(0.0, train_seconds) / pace)))
        return self._horizon

    @property
    def planned_horizon(self) -> int:
        """The step the run now plans to end at: the step budget, or the horizon last fitted
        (:meth:`horizon`) or agreed (:meth:`agree`)."""
        return self._horizon

    def refit(self, step: int, agree: Callable[[int], int] = int) -> int:
        """Refits the horizon after ``step`` and takes the one ``agree`` makes of it (several
        processes: the slowest one's, so that every process takes the same schedule); returns it."""
        return self.agree(agree(self.horizon(step)))

    def agree(self, horizon: int) -> int:
        """Takes ``horizon`` (the one all processes agreed on) as the plan; returns it."""
        self._horizon = horizon
        return horizon

    def should_refit(self, step: int) -> bool:
        """Whether to refit the horizon after ``step``: as soon as the pace is known, then every
        :data:`REFIT_EVERY` steps."""
        return self.paced and self.pace() is not None and (len(self._steps) == 5 or step % REFIT_EVERY == 0)

    def should_evaluate(self, step: int) -> bool:
        """Whether an intermediate evaluation falls at ``step`` (never at the last step: the
        final evaluation follows it)."""
        if step >= self._horizon:
            return False
        if self.eval_every is not None:
            return step % self.eval_every == 0
        if self.evals_left() == 0:
            return False
        k = self.evals_done + 1
        due = step >= round(k * self._horizon / (self.planned_evals + 1))
        if due and self.paced and self.eval_seconds is not None:
            # skip it where it would take the evaluations past their share of the budget
            if self.eval_seconds_spent + self.eval_seconds > self.eval_fraction * self.seconds:
                self.planned_evals = self.evals_done
                return False
        return due

    def out_of_time(self) -> bool:
        """Whether the training steps must stop now to leave the final evaluation and save their time."""
        left = self.seconds_left()
        return left is not None and left <= self.reserve()

    def describe_plan(self) -> str:
        """The wall-clock plan as it stands after compiling (a log line)."""
        return (f"the {self.max_minutes:g}-minute budget: {self.clock.now() - self.start:.0f} s used by setup and "
                f"compiling; one evaluation takes about {self.eval_seconds or 0.0:.1f} s, {self.evals_left()} planned "
                "before the final one")

    def out_of_time_reason(self) -> str:
        """Why a run that :meth:`out_of_time` stopped stopped (``summary.json``'s ``stop_reason``)."""
        return f"the {self.max_minutes}-minute budget ran out"

    def horizon_reason(self) -> str:
        """Why a run that reached its horizon stopped: the step limit, or the pace of the clock."""
        if self.paced and self._horizon < self.total_steps:
            return f"the {self.max_minutes}-minute budget (the horizon its pace allowed)"
        return f"reached {self.step_limit}"

    def minutes_left(self) -> float | None:
        left = self.seconds_left()
        return None if left is None else max(0.0, left / 60)


def learning_rates(config: TrainConfig, step: int, horizon: int, *, split: bool) -> float | list[float]:
    """The learning rate of ``step`` on the schedule that ends at ``horizon``, or with ``split``
    the pair ``[pre-trained weights, new heads]``: the heads follow the schedule from step 0 at
    ``--head-learning-rate``; the pre-trained weights wait ``--frozen-steps`` steps and then
    follow it over the rest of the horizon."""
    if not split:
        return learning_rate_at(step, horizon, config.learning_rate, config.warmup_steps, config.schedule)
    frozen = min(config.frozen_steps, max(0, horizon - 1))
    pretrained = 0.0 if step < frozen else learning_rate_at(step - frozen, horizon - frozen, config.learning_rate,
                                                             config.warmup_steps, config.schedule)
    head = learning_rate_at(step, horizon, config.head_learning_rate or config.learning_rate, config.warmup_steps,
                            config.schedule)
    return [pretrained, head]
