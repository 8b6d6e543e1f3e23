"""What a model call returns, the output-embedding handle for fused losses, and run-time options."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterator, Literal, Mapping

import jax.numpy as jnp
from flax import struct
from jax import Array

from train.models.matmul import matmul


@struct.dataclass
class ModelOutput:
    """A model's outputs (a pytree, so it passes through ``jit``).

    Attributes:
      logits: the head's scores (float32), ``None`` when called with ``compute_logits=False``.
      last_hidden_state: the trunk's last hidden states ``(batch, time, d_model)`` (after the
        final norm for GPT-2 / Llama, as in Hugging Face).
      prelogits: the features the output embedding multiplies, ``logits = prelogits @ W (+ b)``
        (equal to ``last_hidden_state`` except for BERT's masked-LM transform); ``None`` for
        classification heads.
      pooler_output: BERT's pooled ``[CLS]`` features, when the model has a pooler.
      loss: the head's Hugging Face loss when ``labels`` were given.
      cache: the updated key/value cache of a decoder called with ``cache=``.
    """

    logits: Array | None
    last_hidden_state: Array
    prelogits: Array | None = None
    pooler_output: Array | None = None
    loss: Array | None = None
    cache: Any = None


@struct.dataclass
class OutputEmbedding:
    """The output projection of a language-model head: ``logits = h @ W (+ bias)``.

    ``layout`` is ``"vd"`` when ``weight`` is ``(vocab, d_model)`` (a tied embedding table,
    ``logits = h @ weight.T``) and ``"dv"`` when it is ``(d_model, vocab)``.
    """

    weight: Array
    bias: Array | None = None
    layout: str = struct.field(pytree_node=False, default="vd")

    def logits(self, h: Array) -> Array:
        """``h @ W (+ b)`` in float32."""
        out = matmul(h, self.weight, h.dtype, transpose_w=self.layout == "vd")
        if self.bias is None:
            return out
        return out + self.bias.astype(jnp.float32).reshape((1,) * (out.ndim - 1) + (-1,))


@dataclasses.dataclass(frozen=True)
class Runtime:
    """How a model computes, independent of its checkpoint.

    Attributes:
      dtype: compute dtype, ``"float32"`` or ``"bfloat16"`` (parameters are cast where used).
      param_dtype: storage dtype of the parameters (float32 by default).
      remat: rematerialise every layer in the backward pass (``nnx.remat``): ``"none"``,
        ``"full"`` (``True``) or ``"dots"`` (:data:`train.models.layers.REMAT_POLICIES`).
      scan_layers: store each stack of layers stacked, with a leading depth axis, and run it
        as one ``jax.lax.scan`` (traced and compiled once, whatever the depth) instead of a
        Python loop; same values, same Hugging Face names
        (:class:`train.models.stack.LayerStack`). Decoding with a cache loops.
    """

    dtype: Literal["float32", "bfloat16"] | str = "float32"
    param_dtype: str = "float32"
    remat: bool | str = False
    scan_layers: bool = False

    @property
    def compute(self) -> Any:
        return jnp.dtype(self.dtype)

    @property
    def params(self) -> Any:
        return jnp.dtype(self.param_dtype)

    def kw(self) -> dict[str, Any]:
        return {"dtype": self.compute, "param_dtype": self.params}


class HFConfig(Mapping[str, Any]):
    """An immutable, hashable view of a Hugging Face ``config.json`` dict (a static model attribute).

    Keys and values are as JSON has them (``id2label`` keys are strings).
    """

    def __init__(self, cfg: Mapping[str, Any]):
        self._json = json.dumps(dict(cfg), sort_keys=True, default=str)
        self._dict = json.loads(self._json)

    def __getitem__(self, key: str) -> Any:
        return self._dict[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._dict)

    def __len__(self) -> int:
        return len(self._dict)

    def __hash__(self) -> int:
        return hash(self._json)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HFConfig) and other._json == self._json

    def __repr__(self) -> str:
        return f"HFConfig({self._dict.get('model_type')!r}, {len(self._dict)} keys)"

    def to_dict(self) -> dict[str, Any]:
        """A fresh, mutable copy."""
        return json.loads(self._json)
