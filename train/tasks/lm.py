"""Causal language modelling on plain text: the sequence log-likelihood; perplexity.

The text is cut into paragraphs, joined with the tokenizer's end-of-text token and packed
into blocks of ``max_length`` tokens. The loss is ``L_ll`` per token,
``-(1/T) sum_t log p(x_{t+1} | x_<=t)``, over every real position.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

import jaxloss
from train.tasks.base import Batch, fused_token_loss
from train.tasks.text import TextTask, encode_lm


@dataclasses.dataclass
class LmTask(TextTask):
    """Next-token prediction; the model head is causal (a decoder, or a causal head on a shared trunk)."""

    family = "decoder"
    vocabulary_loss = True

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

    def encode_inputs(self, tokenizer: Any, records: Sequence[Any]) -> list[dict[str, Any]]:
        """Each line on its own, after the end-of-text token (a text begins after a separator),
        cut to ``max_length`` tokens."""
        start = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        features = []
        for record in records:
            ids = start + tokenizer(record.text, add_special_tokens=False, verbose=False)["input_ids"]
            kept = ids[: self.max_length]
            features.append({"input_ids": kept, "attention_mask": [1] * len(kept),
                             "truncated": len(ids) > self.max_length})
        return features

    def prediction_outputs(self, output: Any, batch: Batch) -> dict[str, jnp.ndarray]:
        """Each row's log-likelihood and its number of predicted tokens."""
        mask = batch["attention_mask"]
        nll = jaxloss.causal_lm_loss(output.logits.astype(jnp.float32), batch["input_ids"], attention_mask=mask,
                                     reduction="none")
        return {"log_likelihood": -jnp.sum(nll, axis=-1), "tokens": jnp.sum(mask[:, 1:], axis=-1)}

    def prediction(self, record: Any, outputs: Mapping[str, np.ndarray], inputs: Mapping[str, np.ndarray],
                   tokenizer: Any) -> dict[str, Any]:
        """``{"line", "text", "tokens", "log_likelihood", "perplexity"}`` (natural log)."""
        tokens, log_likelihood = int(outputs["tokens"]), float(outputs["log_likelihood"])
        return {"line": record.line, "text": record.text, "tokens": tokens, "log_likelihood": round(log_likelihood, 6),
                "perplexity": round(math.exp(-log_likelihood / tokens), 6) if tokens else None}
