"""``jaxloss-train predict RUN_DIR FILE``: predictions of a trained run, one JSON object per input.

FILE holds inputs in the run's format, with or without labels (labels are never read); each
task reads, encodes and writes its own (:meth:`~train.tasks.base.Task.prediction`):

- ner: one token per line, sentences apart by blank lines (a tag column may follow) ->
  ``{"line", "tokens", "tags", "entities": [{"type", "start", "end", "text"}, ...]}`` with
  ``start`` / ``end`` token offsets (``end`` exclusive) and BIO ``tags`` per token;
- classify: the text column(s) of a CSV / TSV / JSON Lines file, or plain lines (the
  ``label_first`` format: ``label text`` lines are read when every line starts with a label) ->
  ``{"line", "text", "label", "scores"}`` (softmax probabilities by class name);
- regress: the text column(s) -> ``{"line", "text", "score"}``;
- lm: plain lines -> ``{"line", "text", "tokens", "log_likelihood", "perplexity"}`` (natural
  log, over the line's tokens, each predicted from the ones before it);
- seq2seq: plain lines, or JSON Lines with the source under the run's ``text_column`` ->
  ``{"line", "source", "prediction"}`` (greedy, or beam search with the run's ``num_beams``).

Inputs longer than the run's ``max_length`` are cut, and their objects say ``"truncated": true``
(the words of a cut NER sentence are tagged ``O``).

Example (a NER run)::

  $ jaxloss-train predict runs/ner sentences.txt
  $ head -1 runs/ner/predictions.jsonl
  {"line": 1, "tokens": ["John", "lives", "in", "Paris"], "tags": ["B-PER", "O", "O", "B-LOC"],
   "entities": [{"type": "PER", "start": 0, "end": 1, "text": "John"}, ...]}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np
import yaml
from flax import nnx

from train.config import TrainConfig
from train.data.batching import pad_batch, sequence_pad_values
from train.data.records import DataError
from train.data.tokenization import load_tokenizer
from train.modeling import is_adapter_folder, is_shared_trunk_run, load_lora_model
from train.models import load_multitask, load_pretrained
from train.models.hf import load_heads
from train.tasks import Task, build_tasks_without_files


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
    if is_adapter_folder(run_dir / "model"):
        model = load_lora_model(config, tasks, run_dir / "model")
    elif is_shared_trunk_run(tasks):
        model = load_multitask(run_dir / "model", {t.name: t.head() for t in tasks})
        load_heads(model, run_dir / "model")
    else:
        model = load_pretrained(run_dir / "model")
    model.eval()
    return config, task, tokenizer, model


def _batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _pad(features: list[dict[str, Any]], pad_id: int) -> dict[str, np.ndarray]:
    """The token fields of ``features`` padded to one length: ids with ``pad_id``, labels with -100."""
    tokens = {k: (True, np.int32) for k, v in features[0].items() if isinstance(v, list)}
    return pad_batch(features, tokens, sequence_pad_values(pad_id))


def predict_file(run_dir: str | Path, file: str | Path, *, output: str | Path | None = None, task: str | None = None,
                 batch_size: int = 32) -> Path:
    """Writes predictions for the inputs of ``file`` to ``output`` (default ``RUN_DIR/predictions.jsonl``)."""
    config, task_obj, tokenizer, model = load_run(run_dir, task)
    out_path = Path(output) if output else Path(run_dir) / "predictions.jsonl"
    path = str(file)
    if not Path(path).exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    task_obj.check_predictable(run_dir)
    records = task_obj.read_inputs(path)
    if len(records) == 0:
        raise DataError(path, None, "holds no inputs (an empty file, or blank lines only)")
    features = task_obj.encode_inputs(tokenizer, records)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    run_model = task_obj.predictor(model)
    partial = out_path.with_name(out_path.name + ".partial")  # renamed when complete
    with open(partial, "w") as f:
        for chunk_records, chunk in zip(_batches(list(records), batch_size), _batches(features, batch_size)):
            batch = _pad(chunk, pad_id)
            outputs = jax.device_get(run_model({k: v for k, v in batch.items() if k != "labels"}))
            for row, (record, feature) in enumerate(zip(chunk_records, chunk)):
                prediction = task_obj.prediction(record, _row(outputs, row), _row(batch, row), tokenizer)
                if feature.get("truncated"):
                    prediction["truncated"] = True
                f.write(json.dumps(prediction) + "\n")
    partial.replace(out_path)
    return out_path


def _row(arrays: dict[str, np.ndarray], row: int) -> dict[str, np.ndarray]:
    """Row ``row`` of each array of a batch."""
    return {k: v[row] for k, v in arrays.items()}
