"""Evaluation of a task: its batches, the metrics over them, and ``jaxloss-train evaluate``.

A training run and ``jaxloss-train evaluate RUN_DIR FILE`` build evaluation batches the same
way (:func:`eval_batches`: the task's evaluation encoding, batches of the run's batch size in
:data:`EVAL_BUCKETS` padded lengths, masked-LM corruption drawn from ``seed + 1``) and score
them with the same step and metrics, so a file scores the same in both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx

from train.data.batching import Batcher
from train.tasks.base import Task

EVAL_BUCKETS = 2  # padded lengths of a task's evaluation batches (each one compiled forward pass)


def prepare(task: Task, batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The batch as the model sees it: a masked-LM task chooses and corrupts its positions."""
    prepare_batch = getattr(task, "prepare", None)
    return prepare_batch(batch, rng) if prepare_batch is not None else batch


def eval_batches(task: Task, features: Sequence[dict[str, Any]], *, batch_size: int, pad_id: int,
                 seed: int) -> list[dict[str, np.ndarray]]:
    """The evaluation batches of ``features`` (encoded with ``training=False``): in order,
    ``batch_size`` rows each (the last one filled up with masked rows), padded to one of
    :data:`EVAL_BUCKETS` lengths, multiples of 8."""
    batcher = Batcher(list(features), batch_size, pad_id=pad_id, shuffle=False, pad_to_multiple=8,
                      max_length=task.max_length, max_buckets=EVAL_BUCKETS)
    rng = np.random.default_rng(seed + 1)
    return [prepare(task, b, rng) for b in batcher.epoch_batches(0)]


def eval_batch_size(batch_size: int, divisor: int) -> int:
    """Rows of an evaluation batch: the training batch size, rounded down to a multiple of the
    mesh's batch shards (at least one row per shard)."""
    return max(divisor, (batch_size // divisor) * divisor)


def task_metrics(task: Task, step: Callable[[dict[str, np.ndarray]], Any],
                 batches: Sequence[dict[str, np.ndarray]]) -> dict[str, float]:
    """``eval/TASK/METRIC -> value`` of ``task`` over ``batches``, each scored by ``step``
    (a batch -> the task's predictions)."""
    predictions = [jax.device_get(step(b)) for b in batches]
    return {f"eval/{task.name}/{k}": float(v) for k, v in task.metrics(predictions, list(batches)).items()}


def evaluate_file(run_dir: str | Path, file: str | Path, *, output: str | Path | None = None,
                  task: str | None = None) -> tuple[dict[str, float], Path]:
    """The metrics of the trained model of ``run_dir`` on the labelled ``file``, written as JSON
    to ``output`` (default ``RUN_DIR/evaluation.json``); returns them and the path.

    The numbers are those the run's own evaluation gives on the same file, at the step that
    ``model/`` holds.
    """
    from train import sharding
    from train.loop import _check_not_empty
    from train.predict import load_run
    from train.step import make_eval_step

    config, task_obj, tokenizer, model = load_run(run_dir, task)
    path = str(file)
    if not Path(path).exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    records = task_obj.read(path)
    _check_not_empty(path, records)
    features = task_obj.encode(tokenizer, records, training=False)
    spec = next(s for s in config.task_specs() if s.name == task_obj.name)
    divisor = sharding.batch_divisor(sharding.make_mesh(config.mesh))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = eval_batches(task_obj, features, batch_size=eval_batch_size(spec.batch_size or config.batch_size, divisor),
                           pad_id=pad_id, seed=config.seed)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    step = jax.jit(make_eval_step(graphdef, task_obj))
    results = task_metrics(task_obj, lambda b: step(params, rest, {k: v for k, v in b.items() if k != "example_index"}),
                           batches)
    out_path = Path(output) if output else Path(run_dir) / "evaluation.json"
    summary = json.loads((Path(run_dir) / "summary.json").read_text()) if (Path(run_dir) / "summary.json").exists() else {}
    out_path.write_text(json.dumps({"run": str(run_dir), "file": path, "task": task_obj.name, "examples": len(features),
                                    "model_step": summary.get("model_step"), "metrics": results}, indent=2) + "\n")
    return results, out_path
