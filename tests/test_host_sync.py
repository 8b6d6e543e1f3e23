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
    in_loop = [n for n, where in fetches if "/train/loop.py:" in where]  # the step loop's fetches (run, _fetch)
    assert len(in_loop) == 3 and in_loop[0] % 4 == 0 and len(set(in_loop)) == 1, fetches


def test_utilisation_per_device_is_logged(tmp_path):
    """tokens/s and TFLOP/s per device, and MFU against --peak-tflops, in metrics.jsonl; the
    step's FLOPs (its matrix products, counted in the traced program, per device) near the 6 N T
    estimate."""
    run = tmp_path / "run"
    assert cli_main(["ner", "--train-file", _ner_data(tmp_path, 96, 0), "--output-dir", str(run), "--model-size", "micro",
                     "--batch-size", "16", "--max-length", "32", "--vocab-size", "300", "--no-progress", "--buckets", "1",
                     "--max-steps", "8", "--log-every", "4", "--eval-every", "1000", "--peak-tflops", "0.5"]) == 0
    records = [r for r in read_metrics(run) if "train/loss" in r]
    devices = jax.device_count()
    for r in records:
        assert r["train/tokens_per_second_per_device"] == pytest.approx(r["train/tokens_per_second"] / devices)
        assert r["train/tflops_per_second_per_device"] > 0
        assert r["train/mfu"] == pytest.approx(r["train/tflops_per_second_per_device"] / 0.5)
    # micro BERT: hidden 64, 1 layer, MLP 128; 16 x 16 tokens per step (one bucket of 16)
    hidden, mlp, tokens = 64, 128, 16 * 16
    matmul_params = 4 * hidden * hidden + 2 * hidden * mlp + hidden * 3  # attention, MLP, tag head
    estimate = 6 * matmul_params * tokens / devices
    assert 0.8 < records[0]["train/flops_per_step"] / estimate < 3.0, (records[0]["train/flops_per_step"], estimate)
