"""Causal language modelling on plain text: the sequence log-likelihood; perplexity.

The text is cut into paragraphs, joined with the tokenizer's end-of-text token and packed
into blocks of ``max_length`` tokens. The loss is ``L_ll`` per token,
``-(1/T) sum_t log p(x_{t+1} | x_<=t)``, over every real position.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

import jaxloss
from train.tasks.base import Batch, fused_token_loss
from train.tasks.text import TextTask, encode_lm


@dataclasses.dataclass
class LmTask(TextTask):
    """Next-token prediction; the model head is causal (a decoder, or a causal head on a shared trunk)."""

    family = "decoder"

    def __post_init__(self) -> None:
        self.kind = "lm"
        self.term_kind = "classification"
        self.main_metric = "perplexity"
        self.greater_is_better = False

    def encode(self, tokenizer: Any, records: Sequence[Any], *, training: bool = True) -> list[dict[str, Any]]:
        return encode_lm(tokenizer, records, block_size=self.max_length)

    def head(self) -> tuple[str, int]:
        return ("causal_lm", 0)

    def _mask(self, batch: Batch) -> jnp.ndarray:
        return batch["attention_mask"].astype(jnp.bool_) & batch["example_mask"][:, None]

    def loss(self, output: Any, batch: Batch) -> jaxloss.SumCount:
        if self.fused:
            return fused_token_loss(output.prelogits[:, :-1], output.embedding, batch["input_ids"][:, 1:],
                                    self._mask(batch)[:, 1:], self.label_smoothing)
        return jaxloss.causal_lm_loss(
            output.logits, batch["input_ids"], attention_mask=self._mask(batch),
            label_smoothing=self.label_smoothing, reduction="sum_count",
        )

    def count(self, batch: Batch) -> jnp.ndarray:
        return jnp.sum(self._mask(batch)[:, 1:].astype(jnp.float32))

    def predict(self, output: Any, batch: Batch) -> dict[str, jnp.ndarray]:
        pair = jaxloss.causal_lm_loss(output.logits, batch["input_ids"], attention_mask=self._mask(batch), reduction="sum_count")
        return {"nll_sum": pair.total, "count": pair.count}

    def metrics(self, predictions: list[dict[str, np.ndarray]], batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
        total = float(sum(float(p["nll_sum"]) for p in predictions))
        count = float(sum(float(p["count"]) for p in predictions))
        mean = total / count if count else float("nan")
        return {"perplexity": math.exp(mean) if count else float("nan"), "nll": mean}
