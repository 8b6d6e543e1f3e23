"""``jaxloss-train predict RUN_DIR FILE``: predictions of a trained run, one JSON object per example.

- classify: ``{"line", "text", "label", "scores"}`` (softmax probabilities by class name)
- ner: ``{"line", "tokens", "tags", "entities": [[type, first_token, last_token], ...]}``
- regress: ``{"line", "text", "score"}``
- seq2seq: ``{"line", "source", "prediction"}`` (greedy, or beam search with the run's
  ``num_beams``); FILE holds one source per line, or JSON Lines with the source under the
  run's ``text_column``
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx
from safetensors.numpy import load_file

from train import metrics
from train.config import TrainConfig
from train.data.batching import sequence_pad_values
from train.data.tokenization import load_tokenizer
from train.modeling import is_shared_trunk_run
from train.models import load_multitask, load_pretrained
from train.step import forward
from train.tasks.base import Task


def load_run(run_dir: str | Path, task_name: str | None = None) -> tuple[TrainConfig, Task, Any, nnx.Module]:
    """The config, the chosen task (with its labels), the tokenizer and the trained model of a run."""
    run_dir = Path(run_dir)
    for needed in ("config.yaml", "tasks.json", "model"):
        if not (run_dir / needed).exists():
            raise FileNotFoundError(f"{run_dir} is not a finished run: it has no {needed}")
    config = TrainConfig(**yaml.safe_load((run_dir / "config.yaml").read_text()))
    tasks = build_tasks_without_files(config)
    states = json.loads((run_dir / "tasks.json").read_text())
    for t in tasks:
        t.load_state(states.get(t.name, {}))
    names = [t.name for t in tasks]
    if task_name is None and len(tasks) > 1:
        raise ValueError(f"{run_dir} is a multi-task run; choose a head with --task ({', '.join(names)})")
    task = tasks[0] if task_name is None else next((t for t in tasks if t.name == task_name), None)
    if task is None:
        raise ValueError(f"--task {task_name!r} is not one of {names}")
    tokenizer = load_tokenizer(run_dir / "model")
    if is_shared_trunk_run(tasks):
        model = load_multitask(run_dir / "model", {t.name: t.head() for t in tasks})
        heads = load_file(str(run_dir / "model" / "heads.safetensors"))
        flat = {tuple(int(p) if p.isdigit() else p for p in k.split("/")): v for k, v in heads.items()}
        nnx.update(model.heads, nnx.from_flat_state({k: jnp.asarray(v) for k, v in flat.items()}))
    else:
        model = load_pretrained(run_dir / "model")
    model.eval()
    return config, task, tokenizer, model


def build_tasks_without_files(config: TrainConfig) -> list[Task]:
    """The run's tasks as configured, without requiring its data files to still exist."""
    from train.loop import make_task, task_specs

    return [make_task(spec, config, with_files=False) for spec in task_specs(config)]


def _batches(items: list[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _pad(features: list[dict[str, Any]], pad_id: int) -> dict[str, np.ndarray]:
    """The token fields of ``features`` padded to one length: ids with ``pad_id``, labels with -100."""
    keys = [k for k, v in features[0].items() if isinstance(v, list)]
    length = max(len(f[k]) for f in features for k in keys)
    fills = sequence_pad_values(pad_id)
    out = {k: np.array([f[k] + [fills.get(k, 0)] * (length - len(f[k])) for f in features], np.int32) for k in keys}
    out["example_mask"] = np.ones(len(features), bool)
    return out


def predict_file(run_dir: str | Path, file: str | Path, *, output: str | Path | None = None, task: str | None = None,
                 batch_size: int = 32) -> Path:
    """Writes predictions for ``file`` to ``output`` (default ``RUN_DIR/predictions.jsonl``)."""
    config, task_obj, tokenizer, model = load_run(run_dir, task)
    if task_obj.kind == "seq2seq":
        return _predict_seq2seq(task_obj, tokenizer, model, file, Path(output) if output else Path(run_dir) / "predictions.jsonl",
                                batch_size)
    records = task_obj.read(str(file))
    if task_obj.kind in ("lm", "mlm"):
        raise ValueError("predict writes labels, entities and scores; for a language model use perplexity in the eval metrics")
    features = task_obj.encode(tokenizer, records)
    pad_id = tokenizer.pad_token_id or 0
    run_forward = jax.jit(lambda batch: forward(model, task_obj, batch).logits)
    out_path = Path(output) if output else Path(run_dir) / "predictions.jsonl"
    with open(out_path, "w") as f:
        index = 0
        for chunk in _batches(list(features), batch_size):
            batch = _pad(chunk, pad_id)
            logits = np.asarray(run_forward({k: v for k, v in batch.items() if k != "labels"}))
            for row in range(len(chunk)):
                record = records[index]
                f.write(json.dumps(_prediction(task_obj, record, logits[row], batch, row)) + "\n")
                index += 1
    return out_path


def _prediction(task: Task, record: Any, logits: np.ndarray, batch: dict[str, np.ndarray], row: int) -> dict[str, Any]:
    if task.kind == "classify":
        probs = np.exp(logits - logits.max())
        probs = probs / probs.sum()
        pair = {} if record.text_pair is None else {"text_pair": record.text_pair}
        return {"line": record.line, "text": record.text, **pair, "label": task.labels[int(np.argmax(logits))],
                "scores": {label: round(float(p), 6) for label, p in zip(task.labels, probs)}}
    if task.kind == "regress":
        pair = {} if record.text_pair is None else {"text_pair": record.text_pair}
        return {"line": record.line, "text": record.text, **pair, "score": float(task.scores(logits[None])[0])}
    labels = batch["labels"][row]
    first = labels != -100
    tags = [task.labels[int(i)] for i in np.argmax(logits, -1)[first]]
    tags += ["O"] * (len(record.tokens) - len(tags))  # words cut by max_length
    return {"line": record.line, "tokens": list(record.tokens), "tags": tags,
            "entities": [[t, s, e] for t, s, e in metrics.get_entities(tags)]}


def _predict_seq2seq(task: Any, tokenizer: Any, model: nnx.Module, file: str | Path, out_path: Path,
                     batch_size: int) -> Path:
    """Generated outputs for the sources in ``file``, one JSON object per source."""
    from train.tasks.seq2seq import decode_generated

    records = task.read_sources(str(file))
    eos = tokenizer.eos_token_id
    features = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in
                (task.encode_source(tokenizer, r.source_text) for r in records)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with open(out_path, "w") as f:
        index = 0
        for chunk in _batches(features, batch_size):
            batch = _pad(chunk, pad_id)
            tokens = task.generate(model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
            for text in decode_generated(tokenizer, np.asarray(tokens["generated"]), [eos]):
                record = records[index]
                f.write(json.dumps({"line": record.line, "source": record.source_text, "prediction": text}) + "\n")
                index += 1
    return out_path
