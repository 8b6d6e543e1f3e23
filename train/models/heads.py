"""Task heads on top of a trunk's hidden states, and the Hugging Face loss each one implies.

- :class:`ClassificationHead`: ``dropout -> Linear(d_model, num_labels)``, used on pooled
  features (sequence classification, regression) or on every token (token classification).
- :class:`MaskedLMHead`: BERT's ``dense -> act -> LayerNorm -> tied embedding + bias``.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx
from jax import Array

import jaxloss
from train.models.layers import Embed, LayerNorm, Linear, activation, annotated, lead
from train.models.outputs import OutputEmbedding
from train.models.partitioning import EMBED, LABELS, VOCAB


class ClassificationHead(nnx.Module):
    """``logits = dropout(h) @ W + b`` with ``W`` of shape ``(d_model, num_labels)``."""

    def __init__(self, d_model: int, num_labels: int, *, dropout_rate: float, std: float = 0.02,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.num_labels = num_labels
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
        self.classifier = Linear(d_model, num_labels, axes=(EMBED, LABELS), std=std, dtype=dtype,
                                 param_dtype=param_dtype, rngs=rngs)

    def __call__(self, h: Array) -> Array:
        return self.classifier(self.dropout(h), jnp.float32)


class MaskedLMHead(nnx.Module):
    """BERT's masked-LM head; the output matrix is the (tied) word-embedding table."""

    def __init__(self, d_model: int, vocab_size: int, *, act: str, eps: float, std: float = 0.02,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dense = Linear(d_model, d_model, axes=(EMBED, EMBED), std=std, **kw)
        self.act = activation(act)
        self.norm = LayerNorm(d_model, eps=eps, **kw)
        self.bias = annotated(jnp.zeros((vocab_size,), param_dtype), (VOCAB,))

    def features(self, h: Array) -> Array:
        """The transformed hidden states that the embedding table multiplies."""
        return self.norm(self.act(self.dense(h, jnp.float32)))

    def output_embedding(self, embed: Embed) -> OutputEmbedding:
        return OutputEmbedding(weight=embed.embedding[...], bias=self.bias[...], layout="vd")

    def __call__(self, h: Array, embed: Embed) -> tuple[Array, Array]:
        """``(logits, features)``."""
        f = self.features(h)
        logits = embed.attend(f)
        return logits + lead(self.bias[...].astype(jnp.float32), logits.ndim), f


def problem_type_of(config_problem_type: str | None, num_labels: int, labels: Array) -> str:
    """Hugging Face's choice of loss for sequence classification."""
    if config_problem_type:
        return config_problem_type
    if num_labels == 1:
        return "regression"
    if jnp.issubdtype(labels.dtype, jnp.integer):
        return "single_label_classification"
    return "multi_label_classification"


def sequence_classification_loss(logits: Array, labels: Any, problem_type: str | None) -> Array:
    """The loss ``BertForSequenceClassification`` computes for ``labels`` (through jaxloss)."""
    labels = jnp.asarray(labels)
    num_labels = logits.shape[-1]
    kind = problem_type_of(problem_type, num_labels, labels)
    if kind == "regression":
        if num_labels == 1:
            return jaxloss.mse_loss(logits.reshape(-1), labels.reshape(-1).astype(jnp.float32))
        return jaxloss.mse_loss(logits, labels.astype(jnp.float32))
    if kind == "single_label_classification":
        return jaxloss.cross_entropy(logits.reshape(-1, num_labels), labels.reshape(-1))
    if kind == "multi_label_classification":
        return jaxloss.binary_cross_entropy_with_logits(logits, labels.astype(jnp.float32))
    raise ValueError(f"unknown problem_type {kind!r}")


def token_classification_loss(logits: Array, labels: Any) -> Array:
    """Mean cross-entropy over tokens whose label is not -100."""
    return jaxloss.cross_entropy(logits.reshape(-1, logits.shape[-1]), jnp.asarray(labels).reshape(-1))
