"""Sentence (or sentence-pair) classification: cross-entropy; accuracy and macro-F1."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

import jaxloss
from train import metrics
from train.data.records import DataError, Records, TextExample
from train.data.table import read_table
from train.data.text import read_text
from train.data.tokenization import Feature, note_truncated
from train.tasks.base import (Batch, Task, column, encode_table_inputs, evaluation_label_ids, example_count,
                              infer_format, label_config, pair_field, read_table_texts, spec_arguments, table_texts)

if TYPE_CHECKING:
    from train.config import TaskSpec, TrainConfig


@dataclasses.dataclass
class ClassifyTask(Task):
    """Labels are class names; their order is learned from the training file (sorted)."""

    architecture = "BertForSequenceClassification"
    labels: list[str] = dataclasses.field(default_factory=list)
    # evaluation: the labels, then those of the evaluation data that training never saw
    eval_labels: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.kind = "classify"
        self.term_kind = "classification"
        self.main_metric = "accuracy"

    @classmethod
    def from_spec(cls, spec: TaskSpec, config: TrainConfig, *, with_files: bool = True) -> ClassifyTask:
        """With the run's label smoothing."""
        return cls(**spec_arguments(spec, config, with_files=with_files), label_smoothing=config.label_smoothing)

    def read(self, path: str) -> Sequence[Any]:
        fmt = infer_format(path, self.format, "label_first")
        columns = {} if fmt == "label_first" else dict(
            text_column=column(self.text_column),
            text_pair_column=column(self.text_pair_column),
            label_column=column(self.label_column),
        )
        header = not all(isinstance(c, int) for c in columns.values() if c is not None) if columns else True
        return read_table(path, format=fmt, header=header, label_type="str", **columns)

    def read_inputs(self, path: str) -> Sequence[Any]:
        """Texts to classify: a table's text column(s), a label column being left unread; in
        the ``label_first`` format, plain lines, or ``label text`` lines when every line starts
        with one of the run's labels."""
        fmt = infer_format(path, self.format, "label_first")
        if fmt != "label_first":
            return read_table_texts(self, path, fmt)
        lines = read_text(path, unit="line")
        split = [line.text.split(None, 1) for line in lines]
        labelled = all(len(parts) == 2 and parts[0] in self.labels for parts in split)
        return Records(TextExample(parts[1] if labelled else line.text, None, None, line.source, line.line)
                       for line, parts in zip(lines, split))

    def texts(self, records: Sequence[Any]) -> Iterable[str]:
        return table_texts(records)

    def fit_labels(self, records: Sequence[Any]) -> None:
        if not self.labels:
            self.labels = sorted({str(r.label) for r in records if r.label is not None})
        if len(self.labels) < 2:
            raise ValueError(f"task {self.name!r}: the training data has fewer than 2 classes: {self.labels}")

    def encode(self, tokenizer: Any, records: Sequence[Any], *, training: bool = True) -> list[dict[str, Any]]:
        label_to_id = {label: i for i, label in enumerate(self.labels)}
        if not training:
            found = ((str(r.label), r.source, r.line) for r in records if r.label is not None)
            label_to_id, self.eval_labels = evaluation_label_ids(self.name, self.labels, found)
        return encode_texts(tokenizer, records, max_length=self.max_length, label_to_id=label_to_id)

    def head(self) -> tuple[str, int]:
        return ("sequence_classification", len(self.labels))

    def label_overrides(self) -> dict[str, Any]:
        return label_config(self.labels)

    def loss(self, output: Any, batch: Batch) -> jaxloss.SumCount:
        return jaxloss.cross_entropy(
            output.logits, batch["labels"], where=batch["example_mask"],
            label_smoothing=self.label_smoothing, reduction="sum_count",
        )

    def count(self, batch: Batch) -> jnp.ndarray:
        return example_count(batch)

    def predict(self, output: Any, batch: Batch) -> dict[str, jnp.ndarray]:
        return {"prediction": jnp.argmax(output.logits, axis=-1)}

    def metrics(self, predictions: list[dict[str, np.ndarray]], batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
        pred, gold = _gather_rows(predictions, batches, "prediction", "labels")
        classes = list(range(max(len(self.labels), len(self.eval_labels))))  # a class never trained on scores 0
        return {"accuracy": metrics.accuracy(pred, gold), "macro_f1": metrics.macro_f1(pred, gold, classes=classes)}

    def state(self) -> dict[str, Any]:
        return {"labels": list(self.labels)}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.labels = list(state["labels"])

    def encode_inputs(self, tokenizer: Any, records: Sequence[Any]) -> list[dict[str, Any]]:
        return encode_table_inputs(self, tokenizer, records)

    def prediction(self, record: Any, outputs: Mapping[str, np.ndarray], inputs: Mapping[str, np.ndarray],
                   tokenizer: Any) -> dict[str, Any]:
        """``{"line", "text", "label", "scores"}``: the likeliest class, and each class's softmax probability."""
        logits = np.asarray(outputs["logits"], np.float64)
        probs = np.exp(logits - logits.max())
        probs = probs / probs.sum()
        return {"line": record.line, "text": record.text, **pair_field(record),
                "label": self.labels[int(np.argmax(logits))],
                "scores": {label: round(float(p), 6) for label, p in zip(self.labels, probs)}}


def _gather_rows(
    predictions: list[dict[str, np.ndarray]], batches: list[dict[str, np.ndarray]], pred_key: str, gold_key: str
) -> tuple[np.ndarray, np.ndarray]:
    """Concatenates per-batch predictions and labels over the real rows (``example_mask``)."""
    preds, golds = [], []
    for p, b in zip(predictions, batches):
        keep = np.asarray(b["example_mask"], bool)
        preds.append(np.asarray(p[pred_key])[keep])
        golds.append(np.asarray(b[gold_key])[keep])
    return np.concatenate(preds), np.concatenate(golds)


def encode_texts(
    tokenizer,
    examples: Sequence[TextExample],
    *,
    max_length: int,
    label_to_id: Mapping[str, int] | None = None,
) -> Records[Feature]:
    """Tokenize texts or text pairs with their labels.

    A class label (a string) becomes ``labels = label_to_id[label]`` (an int); a float
    label (regression) is kept as a float; an example without a label gets no
    ``labels``. Longer inputs are truncated (pairs: longest first) and counted.
    """
    out: Records[Feature] = Records()
    counts = out.counts
    if not examples:
        return out
    pairs = [e.text_pair is not None for e in examples]
    if any(pairs) and not all(pairs):
        raise ValueError("examples mix single texts and text pairs")
    texts = [e.text for e in examples]
    kwargs: dict[str, Any] = dict(truncation=True, max_length=max_length)
    if all(pairs):
        kwargs["text_pair"] = [e.text_pair for e in examples]
    enc = tokenizer(texts, **kwargs)
    # untruncated lengths, only to count truncations (verbose=False: no length warning)
    full = tokenizer(texts, verbose=False, **{k: v for k, v in kwargs.items() if k == "text_pair"})
    truncated = 0
    for k, e in enumerate(examples):
        feat = {name: list(enc[name][k]) for name in enc.keys()}
        truncated += len(full["input_ids"][k]) > len(feat["input_ids"])
        if isinstance(e.label, float):
            feat["labels"] = e.label
        elif e.label is not None:
            if label_to_id is None:
                raise ValueError("class labels need label_to_id")
            if e.label not in label_to_id:
                raise DataError(e.source, e.line, f"unknown label {e.label!r} (not in the label "
                                                  f"map {sorted(label_to_id)})")
            feat["labels"] = label_to_id[e.label]
        out.append(feat)
    note_truncated(counts, truncated, "texts", max_length)
    return out
