"""Sentence (or sentence-pair) regression: mean squared error; Pearson, Spearman and MSE.

A pair is encoded one of two ways (``pair_encoding``):

- ``"cross"``: both texts in one sequence, ``[CLS] a [SEP] b [SEP]``, scored from the pooled
  ``[CLS]`` features (``BertForSequenceClassification``; best for a pre-trained model).
- ``"siamese"``: each text on its own through the same trunk, scored by the cosine of their
  mean-pooled features (:class:`~train.models.heads.PairSimilarityHead`, Sentence-BERT):
  ``score = lo + (hi - lo) * cos(u, v)`` with ``[lo, hi]`` the range of the training scores.
  The cosine tracks word overlap from the first step, so a model trained from scratch
  learns similarity from a few thousand pairs.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

import jaxloss
from train import metrics
from train.data.records import DataError, Records, TextExample
from train.data.table import read_table
from train.data.tokenization import Feature
from train.tasks.base import (Batch, Task, column, encode_table_inputs, example_count, infer_format, pair_field,
                              read_table_texts, spec_arguments, table_texts)
from train.tasks.classify import _gather_rows, encode_texts

if TYPE_CHECKING:
    from train.config import TaskSpec, TrainConfig

PAIR_ENCODINGS = ("cross", "siamese")


@dataclasses.dataclass
class RegressTask(Task):
    """Labels are numbers (e.g. a 0-5 similarity score)."""

    pair_encoding: str = "cross"  # how a text pair is encoded: cross | siamese (see the module docstring)
    score_range: tuple[float, float] | None = None  # siamese: (lo, hi) of the training scores

    pair_encodings = PAIR_ENCODINGS
    architecture = "BertForSequenceClassification"

    def __post_init__(self) -> None:
        if self.pair_encoding not in PAIR_ENCODINGS:
            raise ValueError(f"task {self.name!r}: pair_encoding={self.pair_encoding!r} is not one of {PAIR_ENCODINGS}")
        if self.pair_encoding == "siamese" and self.text_pair_column is None:
            raise ValueError(f"task {self.name!r}: pair_encoding='siamese' needs text pairs; set text_pair_column "
                             "(--text-pair-column)")
        self.kind = "regress"
        self.term_kind = "regression"
        self.main_metric = "pearson"

    @classmethod
    def from_spec(cls, spec: TaskSpec, config: TrainConfig, *, with_files: bool = True) -> RegressTask:
        """With the spec's ``pair_encoding``."""
        return cls(**spec_arguments(spec, config, with_files=with_files), pair_encoding=spec.pair_encoding)

    def read(self, path: str) -> Sequence[Any]:
        fmt = infer_format(path, self.format, "tsv")
        columns = dict(
            text_column=column(self.text_column),
            text_pair_column=column(self.text_pair_column),
            label_column=column(self.label_column),
        )
        header = not all(isinstance(c, int) for c in columns.values() if c is not None)
        return read_table(path, format=fmt, header=header, label_type="float", **columns)

    def read_inputs(self, path: str) -> Sequence[Any]:
        """Texts (or pairs) to score: the text column(s); a score column is left unread."""
        return read_table_texts(self, path, infer_format(path, self.format, "tsv"))

    def min_length(self, tokenizer: Any) -> int:
        """A siamese pair encodes each text on its own: the special tokens of one text, plus one."""
        if self.pair_encoding == "siamese":
            return tokenizer.num_special_tokens_to_add(pair=False) + 1
        return super().min_length(tokenizer)

    def texts(self, records: Sequence[Any]) -> Iterable[str]:
        return table_texts(records)

    def fit_labels(self, records: Sequence[Any]) -> None:
        """Siamese: the range of the training scores, which a cosine of 0..1 maps onto."""
        if self.pair_encoding != "siamese" or self.score_range is not None:
            return
        scores = [r.label for r in records if r.label is not None]
        if not scores or min(scores) == max(scores):
            raise ValueError(f"task {self.name!r}: a siamese score needs training scores that differ; "
                             f"got {len(scores)} scores in [{min(scores, default=None)}, {max(scores, default=None)}]")
        self.score_range = (float(min(scores)), float(max(scores)))

    def scores(self, logits: Any) -> Any:
        """The predicted scores ``[B]`` from the head's output ``[B, 1]`` (numpy or jax)."""
        if self.pair_encoding != "siamese":
            return logits[:, 0]
        if self.score_range is None:
            raise ValueError(f"task {self.name!r}: the score range is not set (fit_labels or load_state first)")
        lo, hi = self.score_range
        return lo + (hi - lo) * logits[:, 0]

    def encode(self, tokenizer: Any, records: Sequence[Any], *, training: bool = True) -> list[dict[str, Any]]:
        if self.pair_encoding == "siamese":
            return encode_text_pairs_apart(tokenizer, records, max_length=self.max_length)
        return encode_texts(tokenizer, records, max_length=self.max_length)

    def head(self) -> tuple[str, int]:
        return ("pair_similarity", 1) if self.pair_encoding == "siamese" else ("regression", 1)

    def label_overrides(self) -> dict[str, Any]:
        return {"num_labels": 1, "problem_type": "regression"}

    def model_inputs(self, model: Any, batch: Batch) -> dict[str, Any]:
        """Siamese: the first texts, then the second texts, as one batch of ``2B`` rows."""
        if self.pair_encoding != "siamese":
            return super().model_inputs(model, batch)
        return {"input_ids": jnp.concatenate([batch["input_ids"], batch["pair_input_ids"]], axis=0),
                "attention_mask": jnp.concatenate([batch["attention_mask"], batch["pair_attention_mask"]], axis=0)}

    def loss(self, output: Any, batch: Batch) -> jaxloss.SumCount:
        return jaxloss.mse_loss(
            self.scores(output.logits), batch["labels"].astype(jnp.float32), where=batch["example_mask"], reduction="sum_count"
        )

    def count(self, batch: Batch) -> jnp.ndarray:
        return example_count(batch)

    def predict(self, output: Any, batch: Batch) -> dict[str, jnp.ndarray]:
        return {"prediction": self.scores(output.logits).astype(jnp.float32)}

    def metrics(self, predictions: list[dict[str, np.ndarray]], batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
        pred, gold = _gather_rows(predictions, batches, "prediction", "labels")
        return {"pearson": metrics.pearson(pred, gold), "spearman": metrics.spearman(pred, gold), "mse": metrics.mse(pred, gold)}

    def state(self) -> dict[str, Any]:
        return {} if self.score_range is None else {"score_range": list(self.score_range)}

    def load_state(self, state: Mapping[str, Any]) -> None:
        if "score_range" in state:
            self.score_range = (float(state["score_range"][0]), float(state["score_range"][1]))

    def encode_inputs(self, tokenizer: Any, records: Sequence[Any]) -> list[dict[str, Any]]:
        """Siamese: a pair is ``truncated`` when either of its texts was cut."""
        if self.pair_encoding != "siamese":
            return encode_table_inputs(self, tokenizer, records)
        features = list(self.encode(tokenizer, records, training=False))
        first = tokenizer([r.text for r in records], verbose=False)["input_ids"]
        second = tokenizer([r.text_pair for r in records], verbose=False)["input_ids"]
        for a, b, feature in zip(first, second, features):
            feature["truncated"] = len(a) > len(feature["input_ids"]) or len(b) > len(feature["pair_input_ids"])
        return features

    def prediction(self, record: Any, outputs: Mapping[str, np.ndarray], inputs: Mapping[str, np.ndarray],
                   tokenizer: Any) -> dict[str, Any]:
        """``{"line", "text", "score"}``."""
        logits = np.asarray(outputs["logits"], np.float64)
        return {"line": record.line, "text": record.text, **pair_field(record),
                "score": float(self.scores(logits[None])[0])}


def encode_text_pairs_apart(tokenizer, examples: Sequence[TextExample], *, max_length: int) -> Records[Feature]:
    """Tokenize the two texts of each pair on their own (for a siamese model).

    A feature holds ``input_ids`` / ``attention_mask`` of the first text, ``pair_input_ids`` /
    ``pair_attention_mask`` of the second, and the pair's label as :func:`encode_texts` keeps
    it (numbers only). Each text is cut to ``max_length`` tokens; truncations are counted.
    """
    missing = next((e for e in examples if e.text_pair is None), None)
    if missing is not None:
        raise DataError(missing.source, missing.line, "a siamese encoding needs text pairs; this row has no "
                                                       "second text (--text-pair-column)")
    first = encode_texts(tokenizer, [dataclasses.replace(e, text_pair=None) for e in examples], max_length=max_length)
    second = encode_texts(tokenizer, [dataclasses.replace(e, text=e.text_pair, text_pair=None, label=None)
                                      for e in examples], max_length=max_length)
    out: Records[Feature] = Records(counts=first.counts + second.counts)
    for a, b in zip(first, second):
        feat = {"input_ids": a["input_ids"], "attention_mask": a["attention_mask"],
                "pair_input_ids": b["input_ids"], "pair_attention_mask": b["attention_mask"]}
        if "labels" in a:
            feat["labels"] = a["labels"]
        out.append(feat)
    return out
