"""One run, many layouts: ``jaxloss-train`` gives the same losses and parameters on any mesh.

The same multi-task run (token tagging, sentence-pair regression and masked-LM on one BERT
trunk, dropout on, two micro-batches per step) trains as separate ``python -m train``
processes on

- 1 device (the reference),
- 8 simulated devices with ``--mesh data=8``, ``fsdp=8`` and ``data=2,fsdp=2,tensor=2``,
- 2 processes x 4 devices connected over 127.0.0.1 (``--mesh data=2,fsdp=4``),

and every one must log the reference's losses step by step (every term, the token counts,
the gradient norm) and write the reference's final parameters. A LoRA run on the reference's
trained model (adapters and new heads trained, the trunk frozen) gives the same on 1 and on
8 devices, adapters included. A run stopped after 3 steps on
8 devices and continued from its checkpoint on 1 or on 4 devices must continue exactly as the
reference did.

Why a wrong layout would show: every example is different, and dropout masks and the
masked-LM corruption are drawn per position of the global batch, so rows that reach the
wrong device or a batch split in the wrong place change the losses, not just their
rounding. (Masked-LM corruption drawn per process instead of per global batch moved the
2-process run's loss by 4e-3 relative, its masked-token count by 5% and a parameter by
2e-2.) What remains is the order of float32 sums (a reduction over 8 shards adds in
another order than one over 1): at most 2.2e-7 relative in any logged value and 1.5e-6 in
any parameter, measured over these runs; ``RTOL`` and ``PARAM_ATOL`` lie well above that
and far below an error.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.processes import run_together
from tests.test_train_e2e import _ner_data, _regress_data, _text_data

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
STEPS = 6
STOP_AT = 3  # the interrupted run stops here and resumes on another mesh
RTOL = 1e-5  # losses: float32 sums in another order, carried through 6 Adam steps
PARAM_ATOL = 1e-5  # parameters: six Adam steps of lr 3e-3; rounding leaves <= 1.5e-6
MESHES_8 = ("data=8", "fsdp=8", "data=2,fsdp=2,tensor=2")
RUN_TIMEOUT_S = 600

# keys of a training record that depend on the wall clock or on the run's own step budget
# (the interrupted run plans a horizon of STOP_AT), not on the numbers
# how fast the machine ran, and the work per device (which the mesh divides): not training values
TIMING_KEYS = ("train/tokens_per_second", "train/seconds_per_step", "train/horizon", "train/tokens_per_second_per_device",
               "train/tflops_per_second_per_device", "train/mfu", "train/flops_per_step")


# --------------------------------------------------------------------------- runs


def _write_config(tmp: Path) -> Path:
    """Tiny data for three tasks on one trunk, a fixed tokenizer and the run's YAML config."""
    from train.data.tokenization import train_tokenizer

    ner, ner_eval = _ner_data(tmp, 64, 0), _ner_data(tmp, 16, 1)
    sts, sts_eval = _regress_data(tmp, 64, 0), _regress_data(tmp, 16, 1)
    text, text_eval = _text_data(tmp, 64, 0), _text_data(tmp, 16, 1)
    # one tokenizer for every run: WordPiece training breaks ties differently from call to call
    words = [line.split("\t")[0] for line in Path(ner).read_text().splitlines() if line.strip()]
    train_tokenizer(words + Path(text).read_text().split(), kind="wordpiece", vocab_size=120, save_dir=tmp / "tokenizer")
    config = tmp / "multitask.yaml"
    config.write_text(
        "tasks:\n"
        f"  - {{name: ner, task: ner, train_file: {ner}, eval_file: {ner_eval}}}\n"
        f"  - {{name: sts, task: regress, train_file: {sts}, eval_file: {sts_eval},"
        " text_column: '0', text_pair_column: '1', label_column: '2', weight: 0.5}\n"
        f"  - {{name: mlm, task: mlm, train_file: {text}, eval_file: {text_eval}, weight: 0.5}}\n"
    )
    return config


def _train_args(config: Path, out: Path, mesh: str, steps: int) -> list[str]:
    # a constant rate after the warmup: the interrupted run (--max-steps 3) follows the same
    # schedule as the full one; evaluation and the checkpoint come at the end
    return [
        sys.executable, "-m", "train", "multitask", "--config", str(config), "--tokenizer", str(config.parent / "tokenizer"),
        "--output-dir", str(out), "--mesh", mesh, "--max-steps", str(steps), "--model-size", "micro",
        "--batch-size", "16", "--grad-accum", "2", "--max-length", "32", "--seed", "3", "--learning-rate", "3e-3",
        "--schedule", "constant", "--warmup-steps", "2", "--log-every", "1", "--eval-every", "100", "--no-progress",
    ]


def _env(devices: int, cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    # runs with the same program on the same mesh (the reference and its resumed twin) compile once
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(cache: Path, *commands: tuple[list[str], int]) -> None:
    """Runs the commands (argv, device count) at the same time; fails with the log of any that fails."""
    done = run_together([(argv, _env(devices, cache)) for argv, devices in commands], cwd=ROOT, timeout_s=RUN_TIMEOUT_S)
    for (argv, devices), (code, out) in zip(commands, done):
        assert code == 0, f"{' '.join(argv[2:])} on {devices} devices failed:\n{out[-4000:]}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Every run of this file, started together (a few at a time); name -> run folder."""
    tmp = tmp_path_factory.mktemp("equivalence")
    config = _write_config(tmp)
    out = {"reference": tmp / "reference", **{mesh: tmp / mesh.replace(",", "_").replace("=", "") for mesh in MESHES_8},
           "2 processes": tmp / "two_processes", "resumed on 1": tmp / "resumed1", "resumed on 4": tmp / "resumed4",
           "lora on 1": tmp / "lora1", "lora on 8": tmp / "lora8"}

    cache = tmp / "compilation_cache"

    def train(name: str, mesh: str, devices: int, steps: int = STEPS) -> None:
        _run(cache, (_train_args(config, out[name], mesh, steps), devices))

    def resume() -> None:
        # stopped at step 3 on 8 devices, then continued from that checkpoint on 1 and on 4
        train("resumed on 1", "data=2,fsdp=2,tensor=2", 8, STOP_AT)
        shutil.copytree(out["resumed on 1"], out["resumed on 4"])
        _run(cache, (_train_args(config, out["resumed on 1"], "data=1", STEPS), 1),
             (_train_args(config, out["resumed on 4"], "fsdp=4", STEPS), 4))

    def two_processes() -> None:
        address = f"127.0.0.1:{_free_port()}"
        argv = _train_args(config, out["2 processes"], "data=2,fsdp=4", STEPS)
        _run(cache, *[(argv + ["--coordinator-address", address, "--num-processes", "2", "--process-id", str(i)], 4)
                      for i in range(2)])

    def lora() -> None:
        # the reference's trained trunk as the pre-trained checkpoint: new heads, rank-4 adapters
        extra = ["--model", str(out["reference"] / "model"), "--lora-rank", "4", "--lora-dropout", "0.1"]
        _run(cache, (_train_args(config, out["lora on 1"], "data=1", STEPS) + extra, 1),
             (_train_args(config, out["lora on 8"], "data=2,fsdp=2,tensor=2", STEPS) + extra, 8))

    # at most three runs at a time; the resumed runs come after the meshes they reuse compiled
    with ThreadPoolExecutor(max_workers=3) as pool:
        first = [pool.submit(train, "reference", "data=1", 1), *[pool.submit(train, m, m, 8) for m in MESHES_8]]
        for future in first:
            future.result()
        for future in [pool.submit(resume), pool.submit(two_processes), pool.submit(lora)]:
            future.result()
    return out


# --------------------------------------------------------------------------- reading runs


def _records(run: Path) -> list[dict]:
    from train.recorder import read_metrics

    return read_metrics(run)


def _train_records(run: Path) -> dict[int, dict[str, float]]:
    """step -> the training record of that step (the last one written, for a resumed run)."""
    out: dict[int, dict[str, float]] = {}
    for record in _records(run):
        if "train/loss" in record:
            out[int(record["step"])] = {k: v for k, v in record.items() if k.startswith("train/") and k not in TIMING_KEYS}
    return out


def _final_eval(run: Path) -> dict[str, float]:
    evals = [r for r in _records(run) if any(k.startswith("eval/") for k in r)]
    assert evals, f"{run}: no evaluation record"
    assert evals[-1]["step"] == STEPS
    return {k: v for k, v in evals[-1].items() if k.startswith("eval/")}


def _final_parameters(run: Path) -> dict[str, np.ndarray]:
    """The saved model: the trunk (``model.safetensors``) and the task heads (``heads.safetensors``)."""
    from safetensors.numpy import load_file

    model = run / "model"
    trunk = load_file(str(model / "model.safetensors"))
    heads = {f"heads/{k}": v for k, v in load_file(str(model / "heads.safetensors")).items()}
    return {**trunk, **heads}


def _assert_same_steps(run: Path, reference: Path, steps: range) -> None:
    mine, ref = _train_records(run), _train_records(reference)
    assert sorted(ref) == list(range(1, STEPS + 1))
    assert set(steps) <= set(mine), f"{run.name}: logged steps {sorted(mine)}"
    for step in steps:
        assert mine[step].keys() == ref[step].keys(), f"step {step}"
        for key, value in ref[step].items():
            if key.endswith("_count") or key == "train/finite":
                assert mine[step][key] == value, f"{run.name} step {step} {key}"  # exact: label counts
            else:
                np.testing.assert_allclose(mine[step][key], value, rtol=RTOL, err_msg=f"{run.name} step {step} {key}")


def _assert_same_parameters(run: Path, reference: Path) -> None:
    mine, ref = _final_parameters(run), _final_parameters(reference)
    assert mine.keys() == ref.keys()
    for name, value in ref.items():
        assert mine[name].shape == value.shape and mine[name].dtype == value.dtype, name
        np.testing.assert_allclose(mine[name], value, rtol=RTOL, atol=PARAM_ATOL, err_msg=f"{run.name}: {name}")


def _assert_same_eval(run: Path, reference: Path) -> None:
    """Final evaluation metrics: losses to RTOL; correlations to 1e-3 absolute.

    After 6 steps the regression head predicts nearly the same score for every pair, so its
    Pearson / Spearman correlation divides by a tiny spread and turns ~1e-7 relative changes
    of the predictions into ~1e-5 absolute; a real error moves it by ~1e-2 or more.
    """
    mine, ref = _final_eval(run), _final_eval(reference)
    assert mine.keys() == ref.keys()
    for key, value in ref.items():
        if key.endswith(("pearson", "spearman")):
            np.testing.assert_allclose(mine[key], value, rtol=0, atol=1e-3, err_msg=f"{run.name}: {key}")
        else:
            np.testing.assert_allclose(mine[key], value, rtol=RTOL, atol=1e-7, err_msg=f"{run.name}: {key}")


# --------------------------------------------------------------------------- tests


def test_reference_run_learns_and_varies(runs):
    """The reference is a real run: every term is positive, the loss moves by far more than RTOL."""
    records = _train_records(runs["reference"])
    losses = np.array([records[s]["train/loss"] for s in range(1, STEPS + 1)])
    assert np.all(np.isfinite(losses)) and np.all(losses > 0)
    assert np.min(np.abs(np.diff(losses)) / losses[1:]) > 100 * RTOL
    for step in records.values():
        assert step["train/finite"] == 1.0
        assert all(step[f"train/{term}_count"] > 0 for term in ("ner", "sts", "mlm"))


@pytest.mark.parametrize("mesh", MESHES_8)
def test_eight_devices_match_one(runs, mesh):
    _assert_same_steps(runs[mesh], runs["reference"], range(1, STEPS + 1))
    _assert_same_parameters(runs[mesh], runs["reference"])
    _assert_same_eval(runs[mesh], runs["reference"])


def test_two_processes_match_one(runs):
    started = [r for r in _records(runs["2 processes"]) if "run/process_count" in r]
    assert [(r["run/process_count"], r["run/device_count"], r["run/local_device_count"]) for r in started] == [(2, 8, 4)]
    _assert_same_steps(runs["2 processes"], runs["reference"], range(1, STEPS + 1))
    _assert_same_parameters(runs["2 processes"], runs["reference"])
    _assert_same_eval(runs["2 processes"], runs["reference"])


def test_lora_on_eight_devices_matches_one(runs):
    from safetensors.numpy import load_file

    one, eight = runs["lora on 1"], runs["lora on 8"]
    _assert_same_steps(eight, one, range(1, STEPS + 1))
    _assert_same_eval(eight, one)
    summary = json.loads((one / "summary.json").read_text())
    assert 0 < summary["trainable_parameters"] < summary["parameters"] / 2
    for name in ("adapter_model.safetensors", "heads.safetensors"):
        mine, ref = load_file(str(eight / "model" / name)), load_file(str(one / "model" / name))
        assert mine.keys() == ref.keys() and ref
        for key, value in ref.items():
            np.testing.assert_allclose(mine[key], value, rtol=RTOL, atol=PARAM_ATOL, err_msg=f"{name}: {key}")
    adapters = load_file(str(one / "model" / "adapter_model.safetensors"))
    assert max(np.abs(v).max() for k, v in adapters.items() if "lora_B" in k) > 1e-3  # the adapters trained


@pytest.mark.parametrize("devices", [1, 4])
def test_resume_on_another_mesh(runs, devices):
    """Saved on 8 devices after step 3, restored on ``devices``: steps 4-6 as if never stopped."""
    run = runs[f"resumed on {devices}"]
    records = _records(run)
    # the first part ended with an evaluation at step 3; the second went on from there, not from 0
    assert [r["step"] for r in records if "train/loss" in r] == list(range(1, STEPS + 1))
    assert [r["step"] for r in records if "eval/ner/f1" in r] == [STOP_AT, STEPS]
    _assert_same_steps(run, runs["reference"], range(1, STEPS + 1))
    _assert_same_parameters(run, runs["reference"])
    _assert_same_eval(run, runs["reference"])
