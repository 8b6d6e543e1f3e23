"""The training loop leaves the devices' queue full: metrics reach the host only at log steps,
and batches are built ahead in a thread."""

from __future__ import annotations

import threading

import jax
import pytest

from train.cli import main as cli_main
from train.recorder import read_metrics
from tests.test_train_e2e import _ner_data

pytestmark = pytest.mark.slow


def test_metrics_reach_the_host_once_per_log_line(tmp_path, monkeypatch):
    fetches: list[tuple[int, str]] = []
    real_device_get = jax.device_get

    def counting_device_get(tree):
        import inspect

        caller = inspect.stack()[1]
        fetches.append((len(jax.tree.leaves(tree)), f"{threading.current_thread().name} {caller.filename}:{caller.function}"))
        return real_device_get(tree)

    monkeypatch.setattr(jax, "device_get", counting_device_get)
    run = tmp_path / "run"
    assert cli_main(["ner", "--train-file", _ner_data(tmp_path, 96, 0), "--output-dir", str(run), "--model-size", "micro",
                     "--batch-size", "8", "--max-length", "32", "--vocab-size", "300", "--no-progress",
                     "--max-steps", "12", "--log-every", "4", "--eval-every", "1000", "--buckets", "1"]) == 0
    # one fetch per log line (steps 4, 8, 12), each of the 4 steps' metrics since the last one
    steps = [r["step"] for r in read_metrics(run) if "train/loss" in r]
    assert steps == [4, 8, 12]
    in_loop = [n for n, where in fetches if where.endswith("loop.py:run")]
    assert len(in_loop) == 3 and in_loop[0] % 4 == 0 and len(set(in_loop)) == 1, fetches
