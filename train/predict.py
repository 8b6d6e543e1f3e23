"""``jaxloss-train predict RUN_DIR FILE``: predictions of a trained run, one JSON object per input.

FILE holds inputs in the run's format, with or without labels (labels are never read):

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
import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx

import jaxloss
from train import metrics
from train.config import TrainConfig
from train.data.batching import sequence_pad_values
from train.data.records import DataError
from train.data.tokenization import encode_tagged, load_tokenizer
from train.modeling import is_adapter_folder, is_shared_trunk_run, load_heads, load_lora_model
from train.models import load_multitask, load_pretrained
from train.step import forward
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
    keys = [k for k, v in features[0].items() if isinstance(v, list)]
    length = max(len(f[k]) for f in features for k in keys)
    fills = sequence_pad_values(pad_id)
    out = {k: np.array([f[k] + [fills.get(k, 0)] * (length - len(f[k])) for f in features], np.int32) for k in keys}
    out["example_mask"] = np.ones(len(features), bool)
    return out


def predict_file(run_dir: str | Path, file: str | Path, *, output: str | Path | None = None, task: str | None = None,
                 batch_size: int = 32) -> Path:
    """Writes predictions for the inputs of ``file`` to ``output`` (default ``RUN_DIR/predictions.jsonl``)."""
    config, task_obj, tokenizer, model = load_run(run_dir, task)
    out_path = Path(output) if output else Path(run_dir) / "predictions.jsonl"
    path = str(file)
    if not Path(path).exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    if task_obj.kind == "mlm":
        raise ValueError(f"task {task_obj.name!r} is a masked language model, which has no prediction per input; "
                         f"`jaxloss-train evaluate {run_dir} FILE` gives its perplexity on a text file")
    if task_obj.kind == "seq2seq":
        return _predict_seq2seq(task_obj, tokenizer, model, path, out_path, batch_size)
    records = task_obj.read_inputs(path)
    if len(records) == 0:
        raise DataError(path, None, "holds no inputs (an empty file, or blank lines only)")
    features = _encode_inputs(task_obj, tokenizer, records)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    run_forward = jax.jit(lambda batch: _outputs(model, task_obj, batch))
    partial = out_path.with_name(out_path.name + ".partial")  # renamed when complete
    with open(partial, "w") as f:
        for chunk_records, chunk in zip(_batches(list(records), batch_size), _batches(features, batch_size)):
            batch = _pad(chunk, pad_id)
            outputs = jax.device_get(run_forward({k: v for k, v in batch.items() if k != "labels"}))
            for row, (record, feature) in enumerate(zip(chunk_records, chunk)):
                prediction = _prediction(task_obj, record, {k: v[row] for k, v in outputs.items()}, batch, row)
                if feature.get("truncated"):
                    prediction["truncated"] = True
                f.write(json.dumps(prediction) + "\n")
    partial.replace(out_path)
    return out_path


def _encode_inputs(task: Task, tokenizer: Any, records: Sequence[Any]) -> list[dict[str, Any]]:
    """Features to predict on, one per record, each marked ``truncated`` when cut to ``max_length``."""
    if task.kind == "ner":
        # labels mark each word's first subword, where its tag is read from
        features = list(encode_tagged(tokenizer, records, {"O": 0}, max_length=task.max_length))
        for feature, record in zip(features, records):
            feature["truncated"] = sum(1 for label in feature["labels"] if label != -100) < len(record.tokens)
        return features
    if task.kind == "lm":
        start = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]  # a text begins after a separator
        features = []
        for record in records:
            ids = start + tokenizer(record.text, add_special_tokens=False, verbose=False)["input_ids"]
            features.append({"input_ids": ids[: task.max_length], "attention_mask": [1] * min(len(ids), task.max_length),
                             "truncated": len(ids) > task.max_length})
        return features
    features = list(task.encode(tokenizer, records, training=False))
    texts, pairs = [r.text for r in records], [r.text_pair for r in records]
    if "pair_input_ids" in features[0]:  # a siamese pair: each text on its own
        first = tokenizer(texts, verbose=False)["input_ids"]
        second = tokenizer(pairs, verbose=False)["input_ids"]
        cut = [len(a) > len(f["input_ids"]) or len(b) > len(f["pair_input_ids"])
               for a, b, f in zip(first, second, features)]
    else:
        full = tokenizer(texts, **({} if pairs[0] is None else {"text_pair": pairs}), verbose=False)["input_ids"]
        cut = [len(ids) > len(f["input_ids"]) for ids, f in zip(full, features)]
    for feature, truncated in zip(features, cut):
        feature["truncated"] = truncated
    return features


def _outputs(model: nnx.Module, task: Task, batch: dict[str, Any]) -> dict[str, Any]:
    """What a prediction is read from (inside ``jit``): the logits, or for a language model the
    log-likelihood and the number of predicted tokens of each row."""
    logits = forward(model, task, batch).logits
    if task.kind != "lm":
        return {"logits": logits}
    mask = batch["attention_mask"]
    nll = jaxloss.causal_lm_loss(logits.astype(jnp.float32), batch["input_ids"], attention_mask=mask, reduction="none")
    return {"log_likelihood": -jnp.sum(nll, axis=-1), "tokens": jnp.sum(mask[:, 1:], axis=-1)}


def _prediction(task: Task, record: Any, outputs: dict[str, np.ndarray], batch: dict[str, np.ndarray],
                row: int) -> dict[str, Any]:
    """The JSON object of one input (see the module docstring)."""
    if task.kind == "lm":
        tokens, log_likelihood = int(outputs["tokens"]), float(outputs["log_likelihood"])
        return {"line": record.line, "text": record.text, "tokens": tokens, "log_likelihood": round(log_likelihood, 6),
                "perplexity": round(math.exp(-log_likelihood / tokens), 6) if tokens else None}
    logits = np.asarray(outputs["logits"], np.float64)
    pair = {} if getattr(record, "text_pair", None) is None else {"text_pair": record.text_pair}
    if task.kind == "classify":
        probs = np.exp(logits - logits.max())
        probs = probs / probs.sum()
        return {"line": record.line, "text": record.text, **pair, "label": task.labels[int(np.argmax(logits))],
                "scores": {label: round(float(p), 6) for label, p in zip(task.labels, probs)}}
    if task.kind == "regress":
        return {"line": record.line, "text": record.text, **pair, "score": float(task.scores(logits[None])[0])}
    first = batch["labels"][row] != -100
    tags = [task.labels[int(i)] for i in np.argmax(logits, -1)[first]]
    tags += ["O"] * (len(record.tokens) - len(tags))  # words cut by max_length
    return {"line": record.line, "tokens": list(record.tokens), "tags": tags, "entities": entity_spans(record.tokens, tags)}


def entity_spans(tokens: Sequence[str], tags: Sequence[str]) -> list[dict[str, Any]]:
    """The entities of BIO ``tags`` (read as seqeval does) with their token offsets and text.

    Example:
      >>> entity_spans(["John", "Smith", "lives", "in", "Paris"], ["B-PER", "I-PER", "O", "O", "B-LOC"])
      [{'type': 'PER', 'start': 0, 'end': 2, 'text': 'John Smith'}, {'type': 'LOC', 'start': 4, 'end': 5, 'text': 'Paris'}]
    """
    return [{"type": kind, "start": first, "end": last + 1, "text": " ".join(tokens[first:last + 1])}
            for kind, first, last in metrics.get_entities(list(tags))]


def _predict_seq2seq(task: Any, tokenizer: Any, model: nnx.Module, file: str, out_path: Path,
                     batch_size: int) -> Path:
    """Generated outputs for the sources in ``file``, one JSON object per source."""
    from train.tasks.seq2seq import decode_generated

    records = task.read_sources(file)
    if len(records) == 0:
        raise DataError(file, None, "holds no inputs (an empty file, or blank lines only)")
    eos = tokenizer.eos_token_id
    features = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in
                (task.encode_source(tokenizer, r.source_text) for r in records)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    partial = out_path.with_name(out_path.name + ".partial")
    with open(partial, "w") as f:
        index = 0
        for chunk in _batches(features, batch_size):
            batch = _pad(chunk, pad_id)
            tokens = task.generate(model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
            for text in decode_generated(tokenizer, np.asarray(tokens["generated"]), [eos]):
                record = records[index]
                f.write(json.dumps({"line": record.line, "source": record.source_text, "prediction": text}) + "\n")
                index += 1
    partial.replace(out_path)
    return out_path
