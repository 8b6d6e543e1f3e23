"""Task heads on top of a trunk's hidden states, and the Hugging Face loss each one implies.

- :class:`ClassificationHead`: ``dropout -> Linear(d_model, num_labels)``, used on pooled
  features (sequence classification, regression) or on every token (token classification).
- :class:`PairSimilarityHead`: the cosine similarity of two separately encoded texts'
  mean-pooled features (a siamese head, as in Sentence-BERT).
- :class:`MaskedLMHead`: BERT's ``dense -> act -> LayerNorm -> tied embedding + bias``.
"""

from __future__ import annotations

from typing import Any

import jax
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


def masked_mean(h: Array, mask: Array | None) -> Array:
    """``sum_t m_t h_t / sum_t m_t`` over the positions (axis -2) of ``h`` ``[B, L, d]``, in float32."""
    h = h.astype(jnp.float32)
    if mask is None:
        return jnp.mean(h, axis=-2)
    m = mask.astype(jnp.float32)[..., None]
    return jnp.sum(h * m, axis=-2) / jnp.maximum(jnp.sum(m, axis=-2), 1.0)


class PairSimilarityHead(nnx.Module):
    """The cosine similarity of two texts encoded apart (a siamese, or bi-encoder, head).

    The trunk runs on ``2B`` rows: the first texts of ``B`` pairs, then their second texts.
    With ``u`` and ``v`` the masked means of each text's hidden states,

    ``logits = cos(u, v) = u . v / (|u| |v|)``,   shape ``(B, 1)``; no parameters.

    Trained from scratch, the mean-pooled features of two texts are alike in proportion to
    the words they share, so the score tracks word overlap from the first step; the
    training then shapes the trunk's features, not a head that could memorise the pairs
    (Reimers & Gurevych 2019, Sentence-BERT's cosine-similarity objective).

    Example:
      >>> import numpy as np
      >>> h = np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32)  # 1 pair
      >>> same = PairSimilarityHead()(np.concatenate([h[:1], h[:1]]), None)
      >>> np.round(np.asarray(same), 5)
      array([[1.]], dtype=float32)
    """

    def __call__(self, h: Array, attention_mask: Array | None = None) -> Array:
        if h.shape[0] % 2:
            raise ValueError(f"a pair-similarity head needs the first and second texts stacked on the batch "
                             f"axis (an even number of rows); got hidden states of shape {h.shape}")
        u, v = jnp.split(masked_mean(h, attention_mask), 2, axis=0)
        dot = jnp.sum(u * v, axis=-1, keepdims=True)
        # clamped inside the root: an empty (all-padding) row scores 0 with a finite gradient
        squared_norms = jnp.sum(u * u, axis=-1, keepdims=True) * jnp.sum(v * v, axis=-1, keepdims=True)
        return dot * jax.lax.rsqrt(jnp.maximum(squared_norms, 1e-24))


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
