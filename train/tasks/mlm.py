"""Masked language modelling on plain text: cross-entropy on masked tokens.

BERT's recipe: 15% of the real tokens are chosen; of those 80% become ``[MASK]``, 10% a
random token and 10% stay; the loss is the cross-entropy at the chosen positions only. The
choice is drawn on the host from a generator seeded by ``(seed, step)``, so a resumed run
masks exactly as an uninterrupted one.

As in BERT's original implementation (``max_predictions_per_seq``), a row holds at most
:meth:`MlmTask.max_predictions` chosen positions (1.5 times the expected number; a row that
draws more keeps a random subset of that size), so training gathers the chosen positions'
features into a buffer of static size and projects only those onto the vocabulary: about a
fifth of the product over every position.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jaxloss
from train.data.tokenization import IGNORE_INDEX
from train.tasks.base import Batch, fused_token_loss, token_count
from train.tasks.text import TextTask, encode_lm


@dataclasses.dataclass
class MlmTask(TextTask):
    """Masked-token prediction with a head tied to the input embeddings."""

    architecture = "BertForMaskedLM"
    vocabulary_loss = True

    mask_probability: float = 0.15
    mask_token_id: int = -1
    vocab_size: int = 0
    special_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.kind = "mlm"
        self.term_kind = "classification"
        self.main_metric = "perplexity"
        self.greater_is_better = False

    def encode(self, tokenizer: Any, records: Sequence[Any], *, training: bool = True) -> list[dict[str, Any]]:
        if tokenizer.mask_token_id is None:
            raise ValueError(f"task {self.name!r}: masked-LM training needs a tokenizer with a mask token")
        self.mask_token_id = int(tokenizer.mask_token_id)
        self.vocab_size = len(tokenizer)
        self.special_ids = tuple(int(i) for i in tokenizer.all_special_ids)
        return encode_lm(tokenizer, records, block_size=self.max_length)

    def prepare(self, batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Chooses and corrupts the masked positions; ``labels`` hold the original ids there, -100 elsewhere."""
        ids = np.array(batch["input_ids"])
        real = (batch["attention_mask"] > 0) & batch["example_mask"][:, None] & ~np.isin(ids, self.special_ids)
        chosen = real & (rng.random(ids.shape) < self.mask_probability)
        chosen = _at_most_per_row(chosen, self.max_predictions(ids.shape[1]), rng)
        labels = np.where(chosen, ids, IGNORE_INDEX).astype(np.int32)
        roll = rng.random(ids.shape)
        ids = np.where(chosen & (roll < 0.8), self.mask_token_id, ids)
        random_ids = rng.integers(0, self.vocab_size, ids.shape)
        ids = np.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, ids).astype(np.int32)
        return {**batch, "input_ids": ids, "labels": labels}

    def head(self) -> tuple[str, int]:
        return ("mlm", 0)

    def check_predictable(self, run_dir: Any) -> None:
        """A masked language model has no prediction per input: its perplexity is what it gives."""
        raise ValueError(f"task {self.name!r} is a masked language model, which has no prediction per input; "
                         f"`jaxloss-train evaluate {run_dir} FILE` gives its perplexity on a text file")

    def max_predictions(self, length: int) -> int:
        """The most chosen positions a row of ``length`` tokens holds: ``ceil(1.5 p length)``."""
        return max(1, math.ceil(1.5 * self.mask_probability * length))

    @property
    def loss_from_hidden(self) -> bool:
        return True

    def loss(self, output: Any, batch: Batch) -> jaxloss.SumCount:
        """Cross-entropy at the chosen positions, from the head's features gathered there."""
        labels = batch["labels"]
        rows, targets = gather_labelled(output.prelogits, labels, labels.shape[0] * self.max_predictions(labels.shape[1]))
        if self.fused:
            return fused_token_loss(rows, output.embedding, targets, None)
        return jaxloss.cross_entropy(output.embedding.logits(rows), targets, reduction="sum_count")

    def count(self, batch: Batch) -> jnp.ndarray:
        return token_count(batch["labels"])

    def predict(self, output: Any, batch: Batch) -> dict[str, jnp.ndarray]:
        pair = jaxloss.cross_entropy(output.logits, batch["labels"], reduction="sum_count")
        correct = jnp.sum(((jnp.argmax(output.logits, -1) == batch["labels"]) & (batch["labels"] >= 0)).astype(jnp.float32))
        return {"nll_sum": pair.total, "count": pair.count, "correct": correct}

    def metrics(self, predictions: list[dict[str, np.ndarray]], batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
        total = float(sum(float(p["nll_sum"]) for p in predictions))
        count = float(sum(float(p["count"]) for p in predictions))
        correct = float(sum(float(p["correct"]) for p in predictions))
        if not count:
            return {"perplexity": float("nan"), "accuracy": float("nan")}
        return {"perplexity": math.exp(total / count), "accuracy": correct / count}


def _at_most_per_row(chosen: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    """``chosen`` with at most ``limit`` True per row (a random subset kept where there are more)."""
    over = np.flatnonzero(chosen.sum(axis=1) > limit)
    if not len(over):
        return chosen
    chosen = chosen.copy()
    for r in over:
        positions = np.flatnonzero(chosen[r])
        chosen[r, rng.permutation(positions)[limit:]] = False
    return chosen


def gather_labelled(hidden: jax.Array, labels: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
    """The rows of ``hidden`` (``[B, T, D]``) at the labelled positions (label not -100), in a
    buffer of ``size`` rows, and their labels (-100 in the unused rows).

    Example:
      >>> h = jnp.arange(12.0).reshape(1, 4, 3)
      >>> rows, t = gather_labelled(h, jnp.array([[-100, 7, -100, 9]]), 3)
      >>> rows.tolist(), t.tolist()
      ([[3.0, 4.0, 5.0], [9.0, 10.0, 11.0], [0.0, 1.0, 2.0]], [7, 9, -100])
    """
    flat = labels.reshape(-1)
    labelled = flat != IGNORE_INDEX
    (index,) = jnp.nonzero(labelled, size=size, fill_value=0)
    used = jnp.arange(size) < jnp.sum(labelled.astype(jnp.int32))
    rows = hidden.reshape(-1, hidden.shape[-1])[index]
    return rows, jnp.where(used, flat[index], IGNORE_INDEX)
