"""Sentence (or sentence-pair) regression: mean squared error; Pearson, Spearman and MSE."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import jax.numpy as jnp
import numpy as np

import jaxloss
from train import metrics
from train.data.table import read_table
from train.data.tokenization import encode_texts
from train.tasks.base import Batch, Task, column, example_count, infer_format
from train.tasks.classify import _gather_rows


@dataclasses.dataclass
class RegressTask(Task):
    """Labels are numbers (e.g. a 0-5 similarity score)."""

    def __post_init__(self) -> None:
        self.kind = "regress"
        self.term_kind = "regression"
        self.main_metric = "pearson"

    def read(self, path: str) -> Sequence[Any]:
        fmt = infer_format(path, self.format, "tsv")
        columns = dict(
            text_column=column(self.text_column),
            text_pair_column=column(self.text_pair_column),
            label_column=column(self.label_column),
        )
        header = not all(isinstance(c, int) for c in columns.values() if c is not None)
        return read_table(path, format=fmt, header=header, label_type="float", **columns)

    def texts(self, records: Sequence[Any]) -> Iterable[str]:
        for r in records:
            yield r.text
            if r.text_pair is not None:
                yield r.text_pair

    def encode(self, tokenizer: Any, records: Sequence[Any], *, training: bool = True) -> list[dict[str, Any]]:
        return encode_texts(tokenizer, records, max_length=self.max_length)

    def head(self) -> tuple[str, int]:
        return ("regression", 1)

    def loss(self, output: Any, batch: Batch) -> jaxloss.SumCount:
        return jaxloss.mse_loss(
            output.logits[:, 0], batch["labels"].astype(jnp.float32), where=batch["example_mask"], reduction="sum_count"
        )

    def count(self, batch: Batch) -> jnp.ndarray:
        return example_count(batch)

    def predict(self, output: Any, batch: Batch) -> dict[str, jnp.ndarray]:
        return {"prediction": output.logits[:, 0].astype(jnp.float32)}

    def metrics(self, predictions: list[dict[str, np.ndarray]], batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
        pred, gold = _gather_rows(predictions, batches, "prediction", "labels")
        return {"pearson": metrics.pearson(pred, gold), "spearman": metrics.spearman(pred, gold), "mse": metrics.mse(pred, gold)}
