"""The benchmarks' interleaved timing: every candidate runs once per round, each round in a new
order, so no candidate always runs right after the same one."""

from __future__ import annotations

import collections

from benchmarks._harness import time_interleaved


def test_time_interleaved_changes_which_candidate_runs_before_each():
    calls: list[str] = []
    names = [f"c{i}" for i in range(6)]
    times = time_interleaved({n: (lambda n=n: calls.append(n)) for n in names}, repeats=8, warmup=1)
    assert set(times) == set(names) and all(t >= 0 for t in times.values())
    rounds = [calls[i:i + len(names)] for i in range(len(names), len(calls), len(names))]  # after the warm-up
    assert len(rounds) == 8 and all(sorted(r) == names for r in rounds)
    before = collections.defaultdict(set)
    sequence = [n for r in rounds for n in r]
    for previous, name in zip(sequence, sequence[1:]):
        before[name].add(previous)
    assert all(len(before[n]) >= 3 for n in names), dict(before)
