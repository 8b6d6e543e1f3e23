"""A decoder-only causal language model written once, configured as GPT-2 or Llama.

:class:`DecoderSpec` holds every architectural choice (norm kind, learned or rotary
positions, plain or gated MLP, grouped key/value heads, tied head); :class:`CausalLM` builds
the model from it; :func:`generate` is jitted greedy decoding or beam search with a key/value cache (the loop of
:mod:`train.models.generation`).

Example:
  >>> import numpy as np
  >>> from transformers import GPT2Config
  >>> from train.models import from_config, generate
  >>> model = from_config(GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=32,
  ...                                bos_token_id=1, eos_token_id=2))
  >>> out = model(input_ids=np.array([[5, 6, 7]]))
  >>> out.logits.shape
  (1, 3, 99)
  >>> generate(model, np.array([[5, 6, 7]]), max_new_tokens=4).shape
  (1, 7)
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import Array

import jaxloss
from train.models import generation as G
from train.models.layers import (
    MLP,
    Attention,
    Embed,
    Linear,
    PreNormBlock,
    causal_mask,
    default_position_ids,
    make_norm,
    padding_mask,
    rotary_cos_sin,
)
from train.models.outputs import HFConfig, ModelOutput, OutputEmbedding, Runtime
from train.models.partitioning import EMBED, POSITIONS, VOCAB
from train.models.stack import layer_stack, run_layers


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
    """The architecture of a decoder-only LM (independent of Hugging Face's config names)."""

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    d_ff: int
    act: str
    gated_mlp: bool
    norm: str  # "layernorm" | "rmsnorm"
    norm_eps: float
    qkv_bias: bool
    out_bias: bool
    mlp_bias: bool
    positions: str  # "learned" | "rotary"
    max_positions: int
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    embed_dropout: float = 0.0
    resid_dropout: float = 0.0
    attn_dropout: float = 0.0
    init_std: float = 0.02
    scale_attn_by_inverse_layer_idx: bool = False
    scaled_residual_init: bool = False
    pad_token_id: int | None = None
    embedding_padding_idx: int | None = None
    eos_token_id: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.positions not in ("learned", "rotary"):
            raise ValueError(f"positions must be 'learned' or 'rotary', got {self.positions!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")


class CausalLM(nnx.Module):
    """Token embedding (+ learned positions) -> pre-norm blocks -> final norm -> LM head.

    Call as Hugging Face's causal LMs: ``model(input_ids=, attention_mask=, position_ids=,
    labels=)`` returns :class:`ModelOutput` with float32 ``logits`` ``(B, T, V)`` and the
    final-norm ``last_hidden_state``; ``labels`` (``-100`` ignored) adds the shifted
    next-token ``loss``.
    """

    spec: DecoderSpec

    def __init__(self, spec: DecoderSpec, rt: Runtime = Runtime(), *, config: dict | None = None, rngs: nnx.Rngs):
        self.spec = spec
        self.config = HFConfig(config or {})
        self.remat = rt.remat
        self.dtype = rt.compute
        kw = rt.kw()
        s = spec
        out_std = s.init_std / np.sqrt(2 * s.num_layers) if s.scaled_residual_init else s.init_std
        self.embed = Embed(s.vocab_size, s.d_model, std=s.init_std, padding_idx=s.embedding_padding_idx,
                           rngs=rngs, **kw)
        self.position = (Embed(s.max_positions, s.d_model, axes=(POSITIONS, EMBED), std=s.init_std, rngs=rngs, **kw)
                         if s.positions == "learned" else None)
        self.dropout = nnx.Dropout(s.embed_dropout, rngs=rngs)
        layers = []
        for i in range(s.num_layers):
            scale = 1.0 / np.sqrt(s.head_dim)
            if s.scale_attn_by_inverse_layer_idx:
                scale /= float(i + 1)
            layers.append(PreNormBlock(
                make_norm(s.norm, s.d_model, eps=s.norm_eps, rngs=rngs, **kw),
                Attention(s.d_model, s.num_heads, num_kv_heads=s.num_kv_heads, head_dim=s.head_dim,
                          qkv_bias=s.qkv_bias, out_bias=s.out_bias, dropout_rate=s.attn_dropout, scale=float(scale),
                          std=s.init_std, out_std=out_std, rngs=rngs, **kw),
                make_norm(s.norm, s.d_model, eps=s.norm_eps, rngs=rngs, **kw),
                MLP(s.d_model, s.d_ff, act=s.act, gated=s.gated_mlp, use_bias=s.mlp_bias, dropout_rate=s.resid_dropout,
                    std=s.init_std, out_std=out_std, rngs=rngs, **kw),
                dropout_rate=s.resid_dropout, rngs=rngs))
        self.layers = layer_stack(layers, rt.scan_layers)
        self.final_norm = make_norm(s.norm, s.d_model, eps=s.norm_eps, rngs=rngs, **kw)
        self.lm_head = (None if s.tie_word_embeddings else
                        Linear(s.d_model, s.vocab_size, axes=(EMBED, VOCAB), use_bias=False, std=s.init_std, rngs=rngs, **kw))

    # ------------------------------------------------------------------ API

    def output_embedding(self) -> OutputEmbedding:
        """The LM head: the tied table ``(V, D)`` (layout ``"vd"``) or the kernel ``(D, V)`` (``"dv"``)."""
        if self.lm_head is None:
            return OutputEmbedding(weight=self.embed.embedding[...], layout="vd")
        return OutputEmbedding(weight=self.lm_head.kernel[...], layout="dv")

    def init_cache(self, batch: int, length: int) -> list[tuple[Array, Array]]:
        """An empty key/value cache for ``length`` positions: one ``(keys, values)`` pair per layer."""
        shape = (batch, length, self.spec.num_kv_heads, self.spec.head_dim)
        return [(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)) for _ in range(self.spec.num_layers)]

    def __call__(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        position_ids: Any = None,
        labels: Any = None,
        token_type_ids: Any = None,
        *,
        cache: list[tuple[Array, Array]] | None = None,
        cache_index: Array | int = 0,
        compute_logits: bool = True,
    ) -> ModelOutput:
        """Forward pass.

        Args:
          input_ids: ``(B, T)`` token ids.
          attention_mask: ``(B, T)`` 1 for tokens, 0 for padding; with ``cache`` it covers every
            cache slot, ``(B, S)``.
          position_ids: ``(B, T)``; ``cache_index + arange(T)`` by default.
          labels: ``(B, T)`` next-token targets before shifting (``-100`` ignored).
          token_type_ids: GPT-2 only: ``(B, T)`` ids whose token embeddings are added (as in
            Hugging Face's GPT-2).
          cache: from :meth:`init_cache`; the new keys/values go to slots
            ``cache_index .. cache_index + T - 1`` and the updated cache is in ``.cache``.
          compute_logits: False skips the LM head (for a fused loss on ``last_hidden_state``).
        """
        ids = jnp.asarray(input_ids)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, time), got shape {ids.shape}")
        B, T = ids.shape
        S = T if cache is None else cache[0][0].shape[1]
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"cache has {len(cache)} layers, the model {len(self.layers)}")
        if attention_mask is None:
            attention_mask = jnp.ones((B, S), jnp.int32)
        attention_mask = jnp.asarray(attention_mask)
        if attention_mask.shape != (B, S):
            what = "the cache length" if cache is not None else "input_ids"
            raise ValueError(f"attention_mask has shape {attention_mask.shape}, expected {(B, S)} ({what})")
        index = jnp.asarray(cache_index, jnp.int32)
        pos = default_position_ids(B, T, index) if position_ids is None else jnp.asarray(position_ids)
        if pos.shape != (B, T):
            raise ValueError(f"position_ids has shape {pos.shape} but input_ids has shape {ids.shape}")
        slots_q = index + jnp.arange(T, dtype=jnp.int32)
        mask = padding_mask(attention_mask) & causal_mask(slots_q, jnp.arange(S, dtype=jnp.int32))[None, None]

        x = self.embed(ids, jnp.float32)
        if self.position is not None:
            x = x + self.position(pos, jnp.float32)
        if token_type_ids is not None:
            if self.position is None:
                raise ValueError("token_type_ids are only accepted by GPT-2-style models (learned positions)")
            types = jnp.asarray(token_type_ids)
            if types.shape != ids.shape:
                raise ValueError(f"token_type_ids has shape {types.shape} but input_ids has shape {ids.shape}")
            x = x + self.embed(types, jnp.float32)
        x = self.dropout(x)
        rotary = rotary_cos_sin(pos, self.spec.head_dim, self.spec.rope_theta) if self.spec.positions == "rotary" else None
        new_cache = None if cache is None else []
        if cache is None:
            x = run_layers(self.layers, x, mask, rotary, remat=self.remat,
                           call=lambda lyr, h, m, r: lyr(h, m, r)[0])
        else:
            for layer, layer_cache in zip(self.layers, cache):
                x, c = layer(x, mask, rotary, layer_cache, index)
                new_cache.append(c)
        h = self.final_norm(x)
        logits = self.output_embedding().logits(h) if (compute_logits or labels is not None) else None
        loss = None if labels is None else jaxloss.cross_entropy(logits, next_token_targets(labels))
        return ModelOutput(logits=logits if compute_logits else None, last_hidden_state=h, prelogits=h, loss=loss,
                           cache=new_cache)


def next_token_targets(labels: Any, ignore_index: int = -100) -> Array:
    """``labels`` shifted one step left with ``ignore_index`` after the last position.

    ``cross_entropy(logits, next_token_targets(labels))`` is Hugging Face's causal-LM loss
    (``ForCausalLMLoss`` pads and shifts the labels the same way) without slicing the logits.
    """
    labels = jnp.asarray(labels)
    pad = jnp.full(labels.shape[:-1] + (1,), ignore_index, labels.dtype)
    return jnp.concatenate([labels[..., 1:], pad], axis=-1)


# ---------------------------------------------------------------------- decoding


def eos_tuple(eos: Any) -> tuple[int, ...] | None:
    """A config's ``eos_token_id`` (an int, a list or None) as a hashable tuple (or None)."""
    if eos is None:
        return None
    return tuple(int(e) for e in eos) if isinstance(eos, (list, tuple)) else (int(eos),)


@partial(jax.jit, static_argnums=(0, 3))
def _generate(graphdef: Any, state: Any, inputs: tuple[Array, Array], search: G.SearchConfig) -> G.SearchOutput:
    model = nnx.merge(graphdef, state)
    model.eval()
    ids, mask = inputs
    K, N = search.num_beams, search.max_new_tokens
    if K > 1:  # every beam of an item starts from the item's prompt
        ids, mask = jnp.repeat(ids, K, axis=0), jnp.repeat(mask, K, axis=0)
    rows, T0 = ids.shape
    full_mask = jnp.concatenate([mask, jnp.ones((rows, N), mask.dtype)], axis=1)
    # Hugging Face's positions for (left-)padded prompts: cumsum(mask) - 1, 1 at padding.
    positions = jnp.cumsum(full_mask, axis=1, dtype=jnp.int32) - 1
    positions = jnp.where(full_mask == 0, 1, positions)
    out = model(ids, full_mask, positions[:, :T0], cache=model.init_cache(rows, T0 + N), cache_index=0)

    def step(tok: Array, i: Array, cache: Any) -> tuple[Array, Any]:
        slot = T0 + i  # new token i sits at cache slot T0 + i
        pos = jax.lax.dynamic_slice_in_dim(positions, slot, 1, axis=1)
        o = model(tok[:, None], full_mask, pos, cache=cache, cache_index=slot)
        return o.logits[:, -1], o.cache

    return G.search(step, out.logits[:, -1], out.cache, search)


def generate(model: CausalLM, input_ids: Any, attention_mask: Any = None, *, max_new_tokens: int,
             num_beams: int = 1, length_penalty: float | None = None, early_stopping: bool | str | None = None,
             eos_token_id: int | tuple[int, ...] | None = None, pad_token_id: int | None = None,
             return_scores: bool = False, **generation_options: Any) -> Array | tuple[Array, Array | None]:
    """Greedy decoding or beam search with a key/value cache, jitted: ``model.generate(num_beams=k, do_sample=False)``.

    Returns ``(B, T0 + max_new_tokens)`` int32 ids: the prompt then the new tokens (the best
    hypothesis with ``num_beams > 1``). A row that has produced an end-of-sequence token
    continues with ``pad_token_id`` (beam search: Hugging Face's fill, ``pad_token_id`` unless
    it is 0, then the first ``eos``); Hugging Face stops once every row has finished, so its
    output is a prefix of this one. ``eos_token_id`` and ``pad_token_id`` default to the
    model's config; a left-padded prompt (``attention_mask`` 0 on the left) gets Hugging
    Face's positions. With ``return_scores`` also the ``(B,)`` beam scores (None for greedy).
    Generation options (``forced_eos_token_id=``, ...) and the algorithm: see
    :mod:`train.models.generation` and :func:`train.models.generate_seq2seq`.
    """
    ids, mask = G.prompt_arrays(input_ids, attention_mask)
    limit = model.spec.max_positions if model.spec.positions == "learned" else None
    if limit is not None and ids.shape[1] + max_new_tokens > limit:
        raise ValueError(f"prompt length {ids.shape[1]} + max_new_tokens {max_new_tokens} exceeds the "
                         f"{limit} learned positions")
    eos = eos_tuple(model.spec.eos_token_id if eos_token_id is None else eos_token_id) or ()
    if pad_token_id is None:
        pad_token_id = model.spec.pad_token_id if model.spec.pad_token_id is not None else (eos[0] if eos else 0)
    search = G.search_config(model.config, generation_options, max_new_tokens=max_new_tokens, num_beams=num_beams,
                             length_penalty=length_penalty, early_stopping=early_stopping, eos=eos,
                             pad=int(pad_token_id), prompt_len=ids.shape[1])
    graphdef, state = nnx.split(model)
    out = _generate(graphdef, state, (ids, mask), search)
    tokens = jnp.concatenate([ids, out.tokens], axis=1)
    return (tokens, out.scores) if return_scores else tokens
