"""Interrupt and resume: the continued run's losses equal those of a run that never stopped."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest

import train.loop
from train.cli import main as cli_main
from train.data.tokenization import train_tokenizer
from train.recorder import read_metrics
from tests.test_train_e2e import _ner_data

pytestmark = pytest.mark.slow


class _StopAfter:
    """A stand-in for the SIGTERM handler that reports a signal after ``n`` steps."""

    def __init__(self, n: int):
        self.n = n
        self.calls = 0
        self.received = signal.SIGTERM  # the signal it stands for, as PreemptionHandler.received

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    @property
    def requested(self) -> bool:
        self.calls += 1
        return self.calls >= self.n


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


@pytest.mark.parametrize("layers", ["looped", "scanned"])
def test_resumed_run_continues_exactly(tmp_path, monkeypatch, layers):
    train_file, eval_file = _ner_data(tmp_path, 120, 0), _ner_data(tmp_path, 16, 1)
    # one tokenizer for both runs: WordPiece training in `tokenizers` breaks ties differently
    # from one call to the next, so two runs that each train their own differ from step 1
    tokenizer = tmp_path / "tokenizer"
    words = [line.split("\t")[0] for line in Path(train_file).read_text().splitlines() if line.strip()]
    train_tokenizer(words, kind="wordpiece", vocab_size=300, save_dir=tokenizer)
    common = ["ner", "--train-file", train_file, "--eval-file", eval_file, "--model-size", "micro",
              "--tokenizer", str(tokenizer),
              "--batch-size", "16", "--max-length", "32", "--vocab-size", "300", "--log-every", "1",
              "--eval-every", "100", "--no-progress", "--max-steps", "16"]
    common += ["--scan-layers"] if layers == "scanned" else []
    assert cli_main(common + ["--output-dir", str(tmp_path / "straight")]) == 0

    interrupted = tmp_path / "interrupted"
    with monkeypatch.context() as m:
        m.setattr(train.loop, "PreemptionHandler", lambda: _StopAfter(7))
        assert cli_main(common + ["--output-dir", str(interrupted)]) == 128 + signal.SIGTERM  # stopped, not finished
    assert max(_losses(interrupted)) == 7
    # a process killed (kill -9) after logging steps 8-9 and before their checkpoint was complete,
    # its last line cut short: the resumed run starts again from step 7's checkpoint
    with open(interrupted / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "train/loss": 99.0}\n{"step": 9, "train/loss": 99.0}\n{"step": 10, "train/lo')
    assert cli_main(common + ["--output-dir", str(interrupted)]) == 0

    straight, resumed = _losses(tmp_path / "straight"), _losses(interrupted)
    train_rows = [r["step"] for r in read_metrics(interrupted) if "train/loss" in r]
    assert train_rows == list(range(1, 17))  # one row per step: those of the killed process are gone
    assert sorted(resumed) == list(range(1, 17))
    for step in range(8, 17):
        np.testing.assert_allclose(resumed[step], straight[step], rtol=1e-5, err_msg=f"step {step}")


def test_a_run_resumes_with_the_layer_layout_it_was_started_with(tmp_path, monkeypatch, capsys):
    """Without --scan-layers the layout follows the backend (stacked on an accelerator, looped
    on a CPU) and is fixed when the run starts: a run started on a TPU resumes on a CPU with its
    layers stacked, as its checkpoints hold them; a flag that contradicts them is refused."""
    import yaml

    import train.modeling

    train_file, eval_file = _ner_data(tmp_path, 48, 0), _ner_data(tmp_path, 16, 1)
    out = tmp_path / "run"
    common = ["ner", "--train-file", train_file, "--eval-file", eval_file, "--model-size", "micro",
              "--batch-size", "16", "--max-length", "32", "--vocab-size", "300", "--eval-every", "100",
              "--log-every", "1", "--no-progress", "--output-dir", str(out)]
    with monkeypatch.context() as m:
        m.setattr(train.modeling, "_backend", lambda: "tpu")
        m.setattr(train.loop, "PreemptionHandler", lambda: _StopAfter(2))
        assert cli_main(common + ["--max-steps", "4"]) == 128 + signal.SIGTERM
    assert yaml.safe_load((out / "config.yaml").read_text())["scan_layers"] is True

    capsys.readouterr()
    assert cli_main(common + ["--max-steps", "4", "--no-scan-layers"]) == 1
    assert f"--no-scan-layers: the run in {out} was saved with its layers stacked" in capsys.readouterr().err
    assert cli_main(common + ["--max-steps", "4"]) == 0  # on the CPU, from step 2's stacked checkpoint
    assert sorted(_losses(out)) == [1, 2, 3, 4]
    assert yaml.safe_load((out / "config.yaml").read_text())["scan_layers"] is True

    fresh = tmp_path / "fresh"
    assert cli_main([*common[:-1], str(fresh), "--max-steps", "1"]) == 0
    assert yaml.safe_load((fresh / "config.yaml").read_text())["scan_layers"] is False
