"""BART encoder-decoder (``model_type`` ``bart``): ``BartForConditionalGeneration`` and the trunk ``BartModel``.

One word-embedding table ``shared`` feeds the encoder, the decoder and (tied) the LM head;
learned positions with BART's offset of 2 (row ``p + 2`` embeds position ``p``);
``layernorm_embedding`` after the embeddings; post-norm layers (the decoder's with a
cross-attention sub-layer); ``final_logits_bias`` added to the logits (a buffer in PyTorch:
held here as a parameter whose gradient is zero, so it is loaded and saved but never trained).

The model is written once for the family and configured by class attributes: Marian
(:mod:`train.models.marian`) reuses it with fixed sinusoidal positions and no
``layernorm_embedding``.

:func:`generate_seq2seq` is jitted greedy decoding or beam search (:mod:`train.models.generation`)
with a self-attention key/value cache and the cross-attention keys/values computed once from
the encoder's output.

Example:
  >>> import numpy as np
  >>> from transformers import BartConfig
  >>> from train.models import from_config
  >>> cfg = BartConfig(vocab_size=99, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
  ...                  decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=64)
  >>> model = from_config(cfg); model.eval()
  >>> out = model(input_ids=np.array([[0, 5, 6, 2]]), labels=np.array([[7, 8, 2]]))
  >>> out.logits.shape, out.last_hidden_state.shape, out.loss.shape
  ((1, 3, 99), (1, 3, 32), ())
  >>> generate_seq2seq(model, np.array([[0, 5, 6, 2]]), max_new_tokens=4).shape
  (1, 5)
"""

from __future__ import annotations

import functools
import math
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import Array

import jaxloss
from train.models import generation as G
from train.models import mapping as M
from train.models.decoder import eos_tuple
from train.models.layers import (
    MLP,
    Attention,
    Embed,
    LayerNorm,
    PostNormBlock,
    _param,
    causal_mask,
    default_position_ids,
    padding_mask,
    zeros_init,
)
from train.models.outputs import HFConfig, ModelOutput, OutputEmbedding, Runtime
from train.models.partitioning import EMBED, POSITIONS, VOCAB
from train.models.stack import layer_stack, run_layers

#: BART's learned positions start at row 2 of the table (a fairseq convention).
POSITION_OFFSET = 2

Cache = list[tuple[tuple[Array, Array], tuple[Array, Array]]]


def _check_supported(cfg: Mapping[str, Any]) -> None:
    for key in ("encoder_layerdrop", "decoder_layerdrop"):
        if cfg.get(key, 0.0):
            raise ValueError(f"BART with {key}={cfg[key]} is not supported (only 0.0)")
    for key in ("normalize_before", "add_final_layer_norm", "add_bias_logits"):
        if cfg.get(key):
            raise ValueError(f"BART with {key}=True is not supported (mBART-style variants)")
    if cfg.get("tie_word_embeddings", True) is False:
        raise ValueError("BART with tie_word_embeddings=False is not supported (the LM head is the shared table)")


def shift_tokens_right(labels: Any, pad_token_id: int, decoder_start_token_id: int) -> Array:
    """Decoder inputs for teacher forcing: ``[start, labels[:-1]]`` with ``-100`` replaced by ``pad``.

    Hugging Face's ``shift_tokens_right``:

      >>> shift_tokens_right(jnp.array([[5, 6, 2, -100]]), 1, 2).tolist()
      [[2, 5, 6, 2]]
    """
    labels = jnp.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be (batch, time), got shape {labels.shape}")
    start = jnp.full((labels.shape[0], 1), decoder_start_token_id, labels.dtype)
    shifted = jnp.concatenate([start, labels[:, :-1]], axis=1)
    return jnp.where(shifted == -100, jnp.asarray(pad_token_id, labels.dtype), shifted)


class BartMLP(MLP):
    """``fc2(drop_act(act(fc1(x))))`` then dropout: :class:`MLP` with BART's ``activation_dropout``."""

    def __init__(self, d_model: int, d_ff: int, *, act: str, activation_dropout: float, dropout_rate: float,
                 std: float, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        super().__init__(d_model, d_ff, act=act, dropout_rate=dropout_rate, std=std, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)
        self.activation_dropout = nnx.Dropout(activation_dropout, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        h = self.activation_dropout(self.act(self.up(x, jnp.float32)))
        return self.dropout(self.down(h.astype(self.down.dtype)))


def _attend_cached(attn: Attention, x: Array, k: Array, v: Array, mask: Array) -> Array:
    """``attn`` from ``x`` to keys/values already projected (``(B, S, heads, head_dim)``), no dropout."""
    B, T, _ = x.shape
    q = attn.query(x).reshape(B, T, attn.num_heads, attn.head_dim)
    mask = jnp.broadcast_to(mask, (B, mask.shape[1], T, k.shape[1]))
    with jax.numpy_dtype_promotion("standard"):
        y = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask, scale=attn.scale,
                                         implementation="xla")
    return attn.out(y.reshape(B, T, attn.num_heads * attn.head_dim))


class BartDecoderLayer(nnx.Module):
    """``h = LN(x + drop(self_attn(x)))``, ``h = LN(h + drop(cross_attn(h, enc)))``, ``y = LN(h + mlp(h))``."""

    def __init__(self, cfg: Mapping[str, Any], rt: Runtime, rngs: nnx.Rngs):
        d, heads = cfg["d_model"], cfg["decoder_attention_heads"]
        std, drop = cfg.get("init_std", 0.02), cfg.get("dropout", 0.1)
        kw = rt.kw()
        attn_drop = cfg.get("attention_dropout", 0.0)
        self.self_attention = Attention(d, heads, dropout_rate=attn_drop, std=std, rngs=rngs, **kw)
        self.self_attention_norm = LayerNorm(d, eps=1e-5, rngs=rngs, **kw)
        self.cross_attention = Attention(d, heads, dropout_rate=attn_drop, std=std, rngs=rngs, **kw)
        self.cross_attention_norm = LayerNorm(d, eps=1e-5, rngs=rngs, **kw)
        self.mlp = BartMLP(d, cfg["decoder_ffn_dim"], act=cfg.get("activation_function", "gelu"),
                           activation_dropout=cfg.get("activation_dropout", 0.0), dropout_rate=drop, std=std,
                           rngs=rngs, **kw)
        self.mlp_norm = LayerNorm(d, eps=1e-5, rngs=rngs, **kw)
        self.dropout = nnx.Dropout(drop, rngs=rngs)

    def __call__(self, x: Array, self_mask: Array, enc: Array, cross_mask: Array,
                 cache: tuple[tuple[Array, Array], tuple[Array, Array]] | None = None,
                 cache_index: Array | None = None) -> tuple[Array, Any]:
        self_cache = None if cache is None else cache[0]
        a, new_self = self.self_attention(x, mask=self_mask, cache=self_cache, cache_index=cache_index)
        h = self.self_attention_norm(x.astype(jnp.float32) + self.dropout(a).astype(jnp.float32))
        if cache is None:
            c, _ = self.cross_attention(h, kv=enc, mask=cross_mask)
        else:
            c = _attend_cached(self.cross_attention, h, *cache[1], cross_mask)
        h = self.cross_attention_norm(h.astype(jnp.float32) + self.dropout(c).astype(jnp.float32))
        y = self.mlp_norm(h.astype(jnp.float32) + self.mlp(h).astype(jnp.float32))
        return y, None if cache is None else (new_self, cache[1])


def _encoder_layer(cfg: Mapping[str, Any], rt: Runtime, rngs: nnx.Rngs) -> PostNormBlock:
    d, heads = cfg["d_model"], cfg["encoder_attention_heads"]
    std, drop = cfg.get("init_std", 0.02), cfg.get("dropout", 0.1)
    kw = rt.kw()
    return PostNormBlock(
        Attention(d, heads, dropout_rate=cfg.get("attention_dropout", 0.0), std=std, rngs=rngs, **kw),
        LayerNorm(d, eps=1e-5, rngs=rngs, **kw),
        BartMLP(d, cfg["encoder_ffn_dim"], act=cfg.get("activation_function", "gelu"),
                activation_dropout=cfg.get("activation_dropout", 0.0), dropout_rate=drop, std=std, rngs=rngs, **kw),
        LayerNorm(d, eps=1e-5, rngs=rngs, **kw),
        dropout_rate=drop,
        rngs=rngs,
    )


@functools.lru_cache(maxsize=8)
def sinusoidal_positions(num_positions: int, dim: int) -> np.ndarray:
    """Marian's fixed position table ``(num_positions, dim)`` float32: ``sin`` in the first half, ``cos`` in the second.

    ``angle[p, j] = p / 10000^(2 floor(j/2) / dim)``; columns ``0..ceil(dim/2)-1`` hold
    ``sin(angle[:, 0::2])`` and the rest ``cos(angle[:, 1::2])`` (Hugging Face's
    ``MarianSinusoidalPositionalEmbedding``, computed in float64 the same way, then float32).

      >>> sinusoidal_positions(3, 4)[1].astype(float).round(3).tolist()
      [0.841, 0.01, 0.54, 1.0]
    """
    enc = np.array([[pos / np.power(10000, 2 * (j // 2) / dim) for j in range(dim)] for pos in range(num_positions)])
    half = dim // 2 if dim % 2 == 0 else dim // 2 + 1
    out = np.empty((num_positions, dim), np.float32)
    out[:, :half] = np.sin(enc[:, 0::2])
    out[:, half:] = np.cos(enc[:, 1::2])
    out.setflags(write=False)
    return out


class _Stack(nnx.Module):
    """Positions, ``layernorm_embedding``, dropout and the layers of one side.

    ``positions``: ``"learned"`` (BART: a trained table read at ``p + 2``) or ``"sinusoidal"``
    (Marian: :func:`sinusoidal_positions`, not a parameter); ``layernorm_embedding``: BART's
    norm after the embeddings (Marian has none).
    """

    def __init__(self, cfg: Mapping[str, Any], rt: Runtime, layers: list[nnx.Module], rngs: nnx.Rngs, *,
                 positions: str = "learned", layernorm_embedding: bool = True):
        d = cfg["d_model"]
        kw = rt.kw()
        self.max_positions = cfg.get("max_position_embeddings", 1024)
        self.d_model = d
        if positions not in ("learned", "sinusoidal"):
            raise ValueError(f"positions must be 'learned' or 'sinusoidal', got {positions!r}")
        self.embed_positions = (Embed(self.max_positions + POSITION_OFFSET, d, axes=(POSITIONS, EMBED),
                                      std=cfg.get("init_std", 0.02), rngs=rngs, **kw)
                                if positions == "learned" else None)
        self.layernorm_embedding = LayerNorm(d, eps=1e-5, rngs=rngs, **kw) if layernorm_embedding else None
        self.dropout = nnx.Dropout(cfg.get("dropout", 0.1), rngs=rngs)
        self.layers = layer_stack(layers, rt.scan_layers)

    def embed(self, tokens: Array, positions: Array) -> Array:
        """``dropout(LN(tokens + position_table[p (+ 2)]))``; ``tokens`` already scaled, float32."""
        if self.embed_positions is not None:
            pos = self.embed_positions(positions + POSITION_OFFSET, jnp.float32)
        else:
            table = jnp.asarray(sinusoidal_positions(self.max_positions, self.d_model))
            pos = jnp.take(table, positions, axis=0, mode="clip")
        x = tokens + pos
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        return self.dropout(x)


def _ids(x: Any, name: str) -> Array:
    ids = jnp.asarray(x)
    if ids.ndim != 2:
        raise ValueError(f"{name} must be (batch, time), got shape {ids.shape}")
    return ids


def _mask(mask: Any, shape: tuple[int, int], name: str, what: str) -> Array:
    if mask is None:
        return jnp.ones(shape, jnp.int32)
    mask = jnp.asarray(mask)
    if mask.shape != shape:
        raise ValueError(f"{name} has shape {mask.shape}, expected {shape} ({what})")
    return mask


class BartModel(nnx.Module):
    """The BART trunk: ``ModelOutput(logits=None, last_hidden_state=<decoder's last hidden states>)``.

    Called as Hugging Face's ``BartModel``: without ``decoder_input_ids`` the decoder reads
    ``shift_tokens_right(input_ids)`` (BART's denoising default).

    Subclasses configure the family by class attributes: ``positions`` (``"learned"`` or
    ``"sinusoidal"``), ``layernorm_embedding`` and :meth:`check_config`.
    """

    positions: ClassVar[str] = "learned"
    layernorm_embedding: ClassVar[bool] = True

    @staticmethod
    def check_config(cfg: Mapping[str, Any]) -> None:
        """Raises ``ValueError`` for config values this model does not implement."""
        _check_supported(cfg)

    def __init__(self, cfg: Mapping[str, Any], rt: Runtime = Runtime(), *, rngs: nnx.Rngs):
        self.check_config(cfg)
        self.config = HFConfig(cfg)
        self.remat = rt.remat
        self.dtype = rt.compute
        d = cfg["d_model"]
        self.embed_scale = math.sqrt(d) if cfg.get("scale_embedding", False) else 1.0
        self.pad_token_id = cfg.get("pad_token_id")
        self.decoder_start_token_id = cfg.get("decoder_start_token_id")
        self.shared = Embed(cfg["vocab_size"], d, std=cfg.get("init_std", 0.02), padding_idx=self.pad_token_id,
                            rngs=rngs, **rt.kw())
        flags = {"positions": self.positions, "layernorm_embedding": self.layernorm_embedding}
        self.encoder = _Stack(cfg, rt, [_encoder_layer(cfg, rt, rngs) for _ in range(cfg["encoder_layers"])], rngs,
                              **flags)
        self.decoder = _Stack(cfg, rt, [BartDecoderLayer(cfg, rt, rngs) for _ in range(cfg["decoder_layers"])], rngs,
                              **flags)

    def _tokens(self, ids: Array) -> Array:
        x = self.shared(ids, jnp.float32)
        return x if self.embed_scale == 1.0 else x * jnp.float32(self.embed_scale)

    def encode(self, input_ids: Any, attention_mask: Any = None) -> Array:
        """The encoder's last hidden states ``(B, S, d_model)``."""
        ids = _ids(input_ids, "input_ids")
        mask = _mask(attention_mask, ids.shape, "attention_mask", "input_ids")
        if ids.shape[1] > self.encoder.max_positions:
            raise ValueError(f"input_ids has {ids.shape[1]} positions, max_position_embeddings is "
                             f"{self.encoder.max_positions}")
        x = self.encoder.embed(self._tokens(ids), default_position_ids(*ids.shape))
        return run_layers(self.encoder.layers, x, padding_mask(mask), remat=self.remat)

    def init_cache(self, encoder_hidden_states: Array, length: int) -> Cache:
        """A decoder cache for ``length`` target positions: per layer ``((keys, values), (cross keys, cross values))``,
        the self-attention slots empty, the cross-attention ones projected from ``encoder_hidden_states``."""
        enc = jnp.asarray(encoder_hidden_states)
        B, S, _ = enc.shape
        cache = []
        for layer in self.decoder.layers:
            attn = layer.cross_attention
            shape = (B, length, attn.num_kv_heads, attn.head_dim)
            k = attn.key(enc).reshape(B, S, attn.num_kv_heads, attn.head_dim)
            v = attn.value(enc).reshape(B, S, attn.num_kv_heads, attn.head_dim)
            cache.append(((jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)), (k, v)))
        return cache

    def decode(self, decoder_input_ids: Any, encoder_hidden_states: Array, attention_mask: Any = None,
               decoder_attention_mask: Any = None, *, cache: Cache | None = None,
               cache_index: Array | int = 0) -> tuple[Array, Cache | None]:
        """The decoder's last hidden states ``(B, T, d_model)`` and the updated cache.

        Args:
          attention_mask: ``(B, S)`` the encoder's padding mask (for cross-attention).
          decoder_attention_mask: ``(B, T)``, or ``(B, L)`` over every cache slot with ``cache``.
          cache: from :meth:`init_cache`; the new keys/values go to slots
            ``cache_index .. cache_index + T - 1``, which are also the target positions.
        """
        ids = _ids(decoder_input_ids, "decoder_input_ids")
        enc = jnp.asarray(encoder_hidden_states)
        B, T = ids.shape
        if enc.ndim != 3 or enc.shape[0] != B:
            raise ValueError(f"encoder_hidden_states must be (batch={B}, time, d_model), got shape {enc.shape}")
        if cache is not None and len(cache) != len(self.decoder.layers):
            raise ValueError(f"cache has {len(cache)} layers, the decoder {len(self.decoder.layers)}")
        S = T if cache is None else cache[0][0][0].shape[1]
        enc_mask = _mask(attention_mask, enc.shape[:2], "attention_mask", "the encoder's input")
        dec_mask = _mask(decoder_attention_mask, (B, S), "decoder_attention_mask",
                         "the cache length" if cache is not None else "decoder_input_ids")
        if S > self.decoder.max_positions:
            raise ValueError(f"the decoder needs {S} positions, max_position_embeddings is {self.decoder.max_positions}")
        index = jnp.asarray(cache_index, jnp.int32)
        slots_q = index + jnp.arange(T, dtype=jnp.int32)
        self_mask = padding_mask(dec_mask) & causal_mask(slots_q, jnp.arange(S, dtype=jnp.int32))[None, None]
        cross_mask = padding_mask(enc_mask)
        x = self.decoder.embed(self._tokens(ids), default_position_ids(B, T, index))
        new_cache = None if cache is None else []
        if cache is None:
            x = run_layers(self.decoder.layers, x, self_mask, enc, cross_mask, remat=self.remat,
                           call=lambda lyr, h, m, e, c: lyr(h, m, e, c)[0])
        else:
            for layer, layer_cache in zip(self.decoder.layers, cache):
                x, c = layer(x, self_mask, enc, cross_mask, layer_cache, index)
                new_cache.append(c)
        return x, new_cache

    def decoder_inputs(self, source: Any) -> Array:
        """``shift_tokens_right(source)`` with the config's pad and decoder start tokens."""
        if self.pad_token_id is None or self.decoder_start_token_id is None:
            raise ValueError("shifting tokens right needs pad_token_id and decoder_start_token_id in the config")
        return shift_tokens_right(source, self.pad_token_id, self.decoder_start_token_id)

    def __call__(self, input_ids: Any, attention_mask: Any = None, decoder_input_ids: Any = None,
                 decoder_attention_mask: Any = None) -> ModelOutput:
        if decoder_input_ids is None:
            decoder_input_ids = self.decoder_inputs(input_ids)
        enc = self.encode(input_ids, attention_mask)
        h, _ = self.decode(decoder_input_ids, enc, attention_mask, decoder_attention_mask)
        return ModelOutput(logits=None, last_hidden_state=h, prelogits=h)

    def hf_tensors(self, prefix: str = "") -> list[M.TensorMap]:
        """Hugging Face tensor names of the trunk (``prefix`` is ``"model."`` inside the LM)."""
        maps = M.embedding("shared", ("shared",))
        for side in ("encoder", "decoder"):
            stack = getattr(self, side)
            if stack.embed_positions is not None:
                maps += M.embedding(f"{side}.embed_positions", (side, "embed_positions"))
            if stack.layernorm_embedding is not None:
                maps += M.norm(f"{side}.layernorm_embedding", (side, "layernorm_embedding"))
            for i in range(len(stack.layers)):
                h, p = f"{side}.layers.{i}.", (side, "layers", i)
                if side == "encoder":
                    attns = [("self_attn", "attention", "attention_norm")]
                else:
                    attns = [("self_attn", "self_attention", "self_attention_norm"),
                             ("encoder_attn", "cross_attention", "cross_attention_norm")]
                for hf, ours, ours_norm in attns:
                    a = p + (ours,)
                    maps += (M.linear(h + f"{hf}.q_proj", a + ("query",)) + M.linear(h + f"{hf}.k_proj", a + ("key",))
                             + M.linear(h + f"{hf}.v_proj", a + ("value",))
                             + M.linear(h + f"{hf}.out_proj", a + ("out",))
                             + M.norm(h + f"{hf}_layer_norm", p + (ours_norm,)))
                maps += (M.linear(h + "fc1", p + ("mlp", "up")) + M.linear(h + "fc2", p + ("mlp", "down"))
                         + M.norm(h + "final_layer_norm", p + ("mlp_norm",)))
        return M.prefixed(maps, prefix, ())

    tied_tensors = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")

    def tensor_maps(self) -> list[M.TensorMap]:
        return self.hf_tensors()


class BartForConditionalGeneration(nnx.Module):
    """BART with its LM head: ``logits = decoder_hidden @ shared^T + final_logits_bias`` (float32).

    Called as Hugging Face's: ``model(input_ids=, attention_mask=, decoder_input_ids=,
    decoder_attention_mask=, labels=)``. With ``labels`` (``-100`` ignored) and no
    ``decoder_input_ids`` the decoder reads ``shift_tokens_right(labels)``; the loss is the
    mean cross-entropy of the logits against ``labels`` (no further shift).
    """

    tied_tensors = ("lm_head.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight")
    #: The trunk's class (a subclass picks its family's).
    trunk: ClassVar[type[BartModel]] = BartModel

    def __init__(self, cfg: Mapping[str, Any], rt: Runtime = Runtime(), *, rngs: nnx.Rngs):
        self.config = HFConfig(cfg)
        self.model = self.trunk(cfg, rt, rngs=rngs)
        self.final_logits_bias = _param(rngs, zeros_init, (1, cfg["vocab_size"]), (None, VOCAB), rt.params)

    def output_embedding(self) -> OutputEmbedding:
        """The tied table ``(vocab, d_model)`` and ``final_logits_bias`` (not trained: zero gradient)."""
        bias = jax.lax.stop_gradient(self.final_logits_bias[...][0])
        return OutputEmbedding(weight=self.model.shared.embedding[...], bias=bias, layout="vd")

    def encode(self, input_ids: Any, attention_mask: Any = None) -> Array:
        """The encoder's last hidden states ``(B, S, d_model)``."""
        return self.model.encode(input_ids, attention_mask)

    def init_cache(self, encoder_hidden_states: Array, length: int) -> Cache:
        """See :meth:`BartModel.init_cache`."""
        return self.model.init_cache(encoder_hidden_states, length)

    def decode(self, decoder_input_ids: Any, encoder_hidden_states: Array, attention_mask: Any = None,
               decoder_attention_mask: Any = None, *, cache: Cache | None = None, cache_index: Array | int = 0,
               labels: Any = None, compute_logits: bool = True) -> ModelOutput:
        """One decoder pass over ``encoder_hidden_states`` (e.g. a generation step with ``cache``)."""
        h, new_cache = self.model.decode(decoder_input_ids, encoder_hidden_states, attention_mask,
                                         decoder_attention_mask, cache=cache, cache_index=cache_index)
        logits = self.output_embedding().logits(h) if (compute_logits or labels is not None) else None
        loss = None
        if labels is not None:
            labels = jnp.asarray(labels)
            if labels.shape != h.shape[:2]:
                raise ValueError(f"labels have shape {labels.shape}, the decoder inputs {h.shape[:2]}")
            loss = jaxloss.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        return ModelOutput(logits=logits if compute_logits else None, last_hidden_state=h, prelogits=h, loss=loss,
                           cache=new_cache)

    def __call__(self, input_ids: Any, attention_mask: Any = None, decoder_input_ids: Any = None,
                 decoder_attention_mask: Any = None, labels: Any = None, *,
                 compute_logits: bool = True) -> ModelOutput:
        """Forward pass; ``compute_logits=False`` skips the vocabulary projection (fused losses)."""
        if decoder_input_ids is None:
            decoder_input_ids = self.model.decoder_inputs(input_ids if labels is None else labels)
        enc = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, enc, attention_mask, decoder_attention_mask, labels=labels,
                           compute_logits=compute_logits)

    def tensor_maps(self) -> list[M.TensorMap]:
        return (M.prefixed(self.model.hf_tensors("model."), "", ("model",))
                + [M.TensorMap("final_logits_bias", (("final_logits_bias",),))])


# ---------------------------------------------------------------------- decoding


def _self_rows(cache: Cache, rows: Array) -> Cache:
    """The self-attention keys/values gathered by parent beam (the cross-attention ones are
    the same for every beam of an item and stay)."""
    return [((jnp.take(k, rows, axis=0), jnp.take(v, rows, axis=0)), cross) for (k, v), cross in cache]


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _generate(graphdef: Any, state: Any, inputs: tuple[Array, Array], start: int,
              search: G.SearchConfig) -> G.SearchOutput:
    model = nnx.merge(graphdef, state)
    model.eval()
    ids, mask = inputs
    K, N = search.num_beams, search.max_new_tokens
    enc = model.encode(ids, mask)
    if K > 1:  # every beam of an item reads the item's encoder output
        enc, mask = jnp.repeat(enc, K, axis=0), jnp.repeat(mask, K, axis=0)
    rows = enc.shape[0]
    dec_mask = jnp.ones((rows, N), jnp.int32)

    def step(tok: Array, i: Array, cache: Cache) -> tuple[Array, Cache]:
        # new token i is decoder position i + 1 (position 0 holds the start token)
        o = model.decode(tok[:, None], enc, mask, dec_mask, cache=cache, cache_index=i + 1)
        return o.logits[:, -1], o.cache

    logits, cache = step(jnp.full((rows,), start, jnp.int32), jnp.int32(-1), model.init_cache(enc, N))
    return G.search(step, logits, cache, search, reorder=_self_rows)


def generate_seq2seq(model: BartForConditionalGeneration, input_ids: Any, attention_mask: Any = None, *,
                     max_new_tokens: int, num_beams: int = 1, length_penalty: float | None = None,
                     early_stopping: bool | str | None = None, decoder_start_token_id: int | None = None,
                     eos_token_id: int | tuple[int, ...] | None = None, pad_token_id: int | None = None,
                     return_scores: bool = False, **generation_options: Any) -> Array | tuple[Array, Array | None]:
    """Greedy decoding or beam search, jitted: ``model.generate(num_beams=k, do_sample=False)`` of an encoder-decoder.

    Returns ``(B, 1 + max_new_tokens)`` int32 ids: ``decoder_start_token_id`` then the new
    tokens (the best hypothesis with ``num_beams > 1``). After a row's end-of-sequence token
    come ``pad_token_id`` tokens (beam search: Hugging Face's fill, ``pad_token_id`` unless it
    is 0, then the first ``eos``); Hugging Face stops once every row has finished, so its
    output is a prefix of this one. With ``return_scores`` also the ``(B,)`` beam scores
    (Hugging Face's ``sequences_scores``; None for greedy decoding).

    The self-attention key/value cache has ``B * num_beams`` rows, gathered by parent beam
    every step; the encoder runs once per item. The decoding algorithm, and the Hugging Face
    generation options that are applied (read from the model's config, overridable by
    keyword: ``forced_bos_token_id``, ``forced_eos_token_id``, ``min_length``,
    ``min_new_tokens``, single-token ``bad_words_ids``, ``suppress_tokens``), are those of
    :mod:`train.models.generation`; any other option the config sets (e.g.
    ``no_repeat_ngram_size=3``) raises ``ValueError`` unless switched off by keyword
    (``no_repeat_ngram_size=0``). ``length_penalty`` and ``early_stopping`` default to the
    config's (else 1.0 and False); the token ids default to the config's.
    """
    ids, mask = G.prompt_arrays(input_ids, attention_mask)
    cfg = model.config
    limit = cfg.get("max_position_embeddings", 1024)
    if max_new_tokens > limit or ids.shape[1] > limit:
        raise ValueError(f"input length {ids.shape[1]} or max_new_tokens {max_new_tokens} exceeds the "
                         f"{limit} positions (max_position_embeddings)")
    start = cfg.get("decoder_start_token_id") if decoder_start_token_id is None else decoder_start_token_id
    if start is None:
        raise ValueError("decoder_start_token_id is neither given nor in the model's config")
    eos = eos_tuple(cfg.get("eos_token_id") if eos_token_id is None else eos_token_id) or ()
    if pad_token_id is None:
        pad_token_id = cfg.get("pad_token_id") if cfg.get("pad_token_id") is not None else (eos[0] if eos else 0)
    search = G.search_config(cfg, generation_options, max_new_tokens=max_new_tokens, num_beams=num_beams,
                             length_penalty=length_penalty, early_stopping=early_stopping, eos=eos,
                             pad=int(pad_token_id), prompt_len=1)
    graphdef, state = nnx.split(model)
    out = _generate(graphdef, state, (ids, mask), int(start), search)
    tokens = jnp.concatenate([jnp.full((ids.shape[0], 1), int(start), jnp.int32), out.tokens], axis=1)
    return (tokens, out.scores) if return_scores else tokens
