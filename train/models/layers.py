"""Transformer building blocks written once: linear maps, embeddings, norms, attention, MLPs, blocks.

Every parameter is float32 by default (``param_dtype``) and is cast to the compute ``dtype``
(float32 or bfloat16) where it is used; matrix products accumulate in float32
(``preferred_element_type``), norms and softmax are computed in float32.

Every parameter carries the names of its logical axes (see :mod:`train.models.partitioning`)
in its ``out_sharding`` metadata, so one rules table maps a whole model onto a mesh.

Layouts: a ``Linear`` kernel is ``(in, out)`` (PyTorch's ``nn.Linear.weight`` transposed),
an ``Embed`` table is ``(num_embeddings, features)``; activations are ``(batch, time, features)``
and attention heads ``(batch, time, heads, head_dim)``.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> attn = Attention(d_model=16, num_heads=4, rngs=nnx.Rngs(0))
  >>> y, _ = attn(jnp.ones((2, 5, 16)), mask=causal_mask(jnp.arange(5), jnp.arange(5))[None, None])
  >>> y.shape
  (2, 5, 16)
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import Array

from train.models.matmul import matmul
from train.models.partitioning import EMBED, HEADS, KV_HEADS, MLP_AXIS, NORM, VOCAB

Dtype = Any
Initializer = Callable[..., Array]


def _host_rng(key: Array) -> np.random.Generator | None:
    """A numpy generator seeded by a concrete JAX key; None under a trace (``jit`` / ``eval_shape``)."""
    if isinstance(key, jax.core.Tracer):
        return None
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return np.random.default_rng(np.asarray(data).astype(np.uint32).ravel().tolist())


def normal_init(std: float) -> Initializer:
    """``N(0, std^2)`` initialiser (Hugging Face's ``initializer_range``).

    Outside a trace the numbers are drawn on the host (seeded by the key), which builds a model
    without compiling one XLA program per parameter shape; under ``jit`` (e.g. a sharded
    initialisation) it is ``jax.random.normal``.
    """

    def init(key: Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> Array:
        rng = _host_rng(key)
        if rng is None:
            return jax.random.normal(key, shape, jnp.float32).astype(dtype) * jnp.asarray(std, dtype)
        return jnp.asarray((rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(jnp.dtype(dtype)))

    return init


def constant_init(value: float) -> Initializer:
    """An initialiser filling ``value`` (host-side outside a trace, like :func:`normal_init`)."""

    def init(key: Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> Array:
        if isinstance(key, jax.core.Tracer):
            return jnp.full(shape, value, dtype)
        return jnp.asarray(np.full(shape, value, dtype=jnp.dtype(dtype)))

    return init


zeros_init, ones_init = constant_init(0.0), constant_init(1.0)


def _param(rngs: nnx.Rngs, init: Initializer, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype: Dtype) -> nnx.Param:
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match parameter shape {shape}")
    return annotated(init(rngs.params(), shape, dtype), axes)


def annotated(value: Array, axes: Sequence[str | None]) -> nnx.Param:
    """A parameter whose ``out_sharding`` metadata names its logical axes.

    Placement is left to the training system (``eager_sharding=False``): it maps the names
    to mesh axes with one rules table (:func:`train.models.partitioning.partition_specs`).
    """
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def lead(v: Array, ndim: int) -> Array:
    """``v`` with leading singleton axes up to ``ndim`` (explicit broadcasting over batch axes)."""
    return v.reshape((1,) * (ndim - v.ndim) + v.shape)


class Linear(nnx.Module):
    """``y = x W + b`` with ``W`` of shape ``(in_features, out_features)``.

    Args:
      axes: logical axis names of the kernel ``(in, out)``; the bias takes ``axes[1]``.
      dtype: compute dtype; ``param_dtype``: storage dtype of the parameters.
      out_dtype: dtype of the result (``dtype`` by default; float32 keeps the full accumulator).

    ``lora`` holds a LoRA adapter when :func:`train.models.lora.add_lora` put one here; its
    update ``(alpha / r) dropout(x) A B`` is added to ``x W`` before the bias.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str | None, str | None] = (None, None),
        use_bias: bool = True,
        std: float = 0.02,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        self.kernel = _param(rngs, normal_init(std), (in_features, out_features), axes, param_dtype)
        self.bias = _param(rngs, zeros_init, (out_features,), (axes[1],), param_dtype) if use_bias else None
        self.lora: nnx.Module | None = nnx.data(None)

    def __call__(self, x: Array, out_dtype: Dtype | None = None) -> Array:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Linear expects inputs with last dimension {self.in_features}, got shape {x.shape}")
        y = matmul(x, self.kernel[...], self.dtype)
        if self.lora is not None:
            y = y + self.lora(x, self.dtype)
        if self.bias is not None:
            y = y + lead(self.bias[...].astype(jnp.float32), y.ndim)
        return y.astype(out_dtype or self.dtype)


class Embed(nnx.Module):
    """A lookup table of shape ``(num_embeddings, features)``; ``attend`` is the tied output map."""

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        axes: tuple[str | None, str | None] = (VOCAB, EMBED),
        std: float = 0.02,
        padding_idx: int | None = None,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.num_embeddings, self.features, self.dtype = num_embeddings, features, dtype
        self.padding_idx = padding_idx if padding_idx is not None and 0 <= padding_idx < num_embeddings else None
        table = normal_init(std)(rngs.params(), (num_embeddings, features), param_dtype)
        if self.padding_idx is not None:
            table = table.at[self.padding_idx].set(0)
        self.embedding = annotated(table, axes)

    def __call__(self, ids: Array, out_dtype: Dtype | None = None) -> Array:
        """Rows ``ids``; as in ``torch.nn.Embedding(padding_idx=...)`` the padding row gets no gradient."""
        rows = jnp.take(self.embedding[...], ids, axis=0, mode="clip")
        if self.padding_idx is not None:
            rows = jnp.where((ids == self.padding_idx)[..., None], jax.lax.stop_gradient(rows), rows)
        return rows.astype(out_dtype or self.dtype)

    def attend(self, x: Array) -> Array:
        """``x @ E^T`` (float32 result): scores of every row of the table."""
        return matmul(x, self.embedding[...], self.dtype, transpose_w=True)


class LayerNorm(nnx.Module):
    """``(x - mean) / sqrt(var + eps) * scale + bias`` over the last axis, computed in float32."""

    def __init__(self, features: int, *, eps: float = 1e-5, use_bias: bool = True, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.eps, self.dtype = eps, dtype
        self.scale = _param(rngs, ones_init, (features,), (NORM,), param_dtype)
        self.bias = _param(rngs, zeros_init, (features,), (NORM,), param_dtype) if use_bias else None

    def __call__(self, x: Array) -> Array:
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        centred = x - mean
        var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
        y = centred * jax.lax.rsqrt(var + jnp.float32(self.eps)) * lead(self.scale[...].astype(jnp.float32), x.ndim)
        if self.bias is not None:
            y = y + lead(self.bias[...].astype(jnp.float32), x.ndim)
        return y.astype(self.dtype)


class RMSNorm(nnx.Module):
    """``x / sqrt(mean(x^2) + eps) * scale`` over the last axis (Llama's order of casts)."""

    def __init__(self, features: int, *, eps: float = 1e-6, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.eps, self.dtype = eps, dtype
        self.scale = _param(rngs, ones_init, (features,), (NORM,), param_dtype)

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + jnp.float32(self.eps))
        return (lead(self.scale[...].astype(jnp.float32), x.ndim) * y.astype(self.dtype).astype(jnp.float32)).astype(self.dtype)


def make_norm(kind: str, features: int, *, eps: float, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs) -> nnx.Module:
    """``"layernorm"`` or ``"rmsnorm"``."""
    if kind == "layernorm":
        return LayerNorm(features, eps=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if kind == "rmsnorm":
        return RMSNorm(features, eps=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    raise ValueError(f"unknown norm {kind!r}; expected 'layernorm' or 'rmsnorm'")


def gelu_erf(x: Array) -> Array:
    r"""The exact GELU, :math:`x \Phi(x) = \tfrac{x}{2} (1 + \operatorname{erf}(x / \sqrt{2}))`, in the
    form PyTorch's ``F.gelu`` computes.

    ``jax.nn.gelu(x, approximate=False)`` evaluates ``erfc(-x / sqrt(2))`` instead, which XLA
    lowers to two rational approximations and a select; ``erf`` is one. Both agree to a few
    float32 ulps of ``x``; the difference is in the far negative tail, where the value is
    below ``1e-7 |x|``. On XLA:CPU this form makes a MiniLM training step about 5% faster
    (forward and backward of six 1536-wide layers).

    Example:
      >>> import jax.numpy as jnp
      >>> [round(float(v), 4) for v in gelu_erf(jnp.array([-1.0, 0.0, 2.0]))]
      [-0.1587, 0.0, 1.9545]
    """
    return x * (0.5 + 0.5 * jax.lax.erf(x * np.asarray(1 / math.sqrt(2), x.dtype)))


def _gelu_tanh(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=True)


def _quick_gelu(x: Array) -> Array:
    return x * jax.nn.sigmoid(x * jnp.asarray(1.702, x.dtype))


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": gelu_erf,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable[[Array], Array]:
    """The activation function Hugging Face names ``name`` (``hidden_act`` / ``activation_function``)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(sorted(ACTIVATIONS))}") from None


# ----------------------------------------------------------------------------- masks and positions


def padding_mask(attention_mask: Array) -> Array:
    """``(batch, keys)`` 0/1 mask -> boolean ``(batch, 1, 1, keys)`` (True = may be attended)."""
    return (jnp.asarray(attention_mask) != 0)[:, None, None, :]


def causal_mask(query_positions: Array, key_positions: Array) -> Array:
    """Boolean ``(queries, keys)`` (or batched) mask: key position <= query position."""
    return key_positions[..., None, :] <= query_positions[..., :, None]


def default_position_ids(batch: int, length: int, offset: Array | int = 0) -> Array:
    """``offset + [0, 1, ..., length-1]`` for every row, int32 ``(batch, length)``."""
    pos = jnp.arange(length, dtype=jnp.int32)[None, :] + jnp.asarray(offset, jnp.int32)
    return jnp.broadcast_to(pos, (batch, length))


def rotary_cos_sin(position_ids: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    r"""Rotary tables ``cos, sin`` of shape ``(batch, time, head_dim)`` in float32.

    ``inv_freq_i = theta^{-2i/d}``, angle ``= position * inv_freq`` repeated twice (the
    "rotate half" layout of Hugging Face's Llama).
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / jnp.float32(head_dim)))
    angles = position_ids.astype(jnp.float32)[..., None] * lead(inv_freq, position_ids.ndim + 1)
    emb = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """``x * cos + rotate_half(x) * sin`` for ``x`` of shape ``(batch, time, heads, head_dim)``."""
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    y = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return y.astype(x.dtype)


# ----------------------------------------------------------------------------- attention


class Attention(nnx.Module):
    r"""Multi-head attention with grouped key/value heads, optional rotary positions and a KV cache.

    ``softmax(q k^T * scale + mask) v`` through :func:`jax.nn.dot_product_attention` (XLA, or
    cuDNN's fused kernel where the platform offers it). Two cases take the explicit product of
    :func:`dot_product_attention` instead: attention-probability dropout while training, and
    16-bit compute under strict dtype promotion, whose backward pass jax cannot lower
    (:func:`_needs_explicit_attention`).

    Submodules ``query``, ``key``, ``value`` (kernels ``(d_model, heads*head_dim)``) and
    ``out`` (kernel ``(heads*head_dim, d_model)``). ``kv_features`` sets the input width of
    ``key``/``value`` for cross-attention.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        kv_features: int | None = None,
        qkv_bias: bool = True,
        out_bias: bool = True,
        dropout_rate: float = 0.0,
        scale: float | None = None,
        std: float = 0.02,
        out_std: float | None = None,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        num_kv_heads = num_kv_heads or num_heads
        head_dim = head_dim or d_model // num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
        self.dtype = dtype
        kv_in = kv_features or d_model
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query = Linear(d_model, num_heads * head_dim, axes=(EMBED, HEADS), use_bias=qkv_bias, std=std, **kw)
        self.key = Linear(kv_in, num_kv_heads * head_dim, axes=(EMBED, KV_HEADS), use_bias=qkv_bias, std=std, **kw)
        self.value = Linear(kv_in, num_kv_heads * head_dim, axes=(EMBED, KV_HEADS), use_bias=qkv_bias, std=std, **kw)
        self.out = Linear(num_heads * head_dim, d_model, axes=(HEADS, EMBED), use_bias=out_bias,
                          std=std if out_std is None else out_std, **kw)
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

    def __call__(
        self,
        x: Array,
        *,
        kv: Array | None = None,
        mask: Array | None = None,
        rotary: tuple[Array, Array] | None = None,
        cache: tuple[Array, Array] | None = None,
        cache_index: Array | int | None = None,
    ) -> tuple[Array, tuple[Array, Array] | None]:
        """Attends from ``x`` ``(B, T, D)`` to ``kv`` (``x`` itself by default).

        Args:
          mask: boolean, broadcastable to ``(B, heads, T, S)``; True where attention is allowed.
            With a cache, ``S`` is the cache length.
          rotary: ``(cos, sin)`` of shape ``(B, T, head_dim)``, applied to queries and new keys.
          cache: ``(keys, values)`` of shape ``(B, S, kv_heads, head_dim)``; the new keys and
            values are written at ``cache_index`` and the updated cache is returned.
        Returns:
          ``(output (B, T, D), updated cache or None)``.
        """
        B, T, _ = x.shape
        src = x if kv is None else kv
        q = self.query(x).reshape(B, T, self.num_heads, self.head_dim)
        k = self.key(src).reshape(B, src.shape[1], self.num_kv_heads, self.head_dim)
        v = self.value(src).reshape(B, src.shape[1], self.num_kv_heads, self.head_dim)
        if rotary is not None:
            cos, sin = rotary
            q = apply_rotary(q, cos, sin)
            k = apply_rotary(k, cos, sin)
        new_cache = None
        if cache is not None:
            index = jnp.asarray(0 if cache_index is None else cache_index, jnp.int32)
            zero = jnp.zeros((), jnp.int32)
            k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), (zero, index, zero, zero))
            v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), (zero, index, zero, zero))
            new_cache = (k, v)
            k, v = k.astype(self.dtype), v.astype(self.dtype)
        dropout = self.dropout if self.dropout.rate > 0 and not self.dropout.deterministic else None
        if dropout is None and not _needs_explicit_attention(q.dtype):
            if mask is not None:
                mask = jnp.asarray(mask, jnp.bool_)
                mask = jnp.broadcast_to(mask, (B, mask.shape[1], T, k.shape[1]))
            # jax promotes bf16 with float32 inside; that promotion is its own business
            with jax.numpy_dtype_promotion("standard"):
                y = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=self.scale)
        else:
            y = dot_product_attention(q, k, v, mask=mask, scale=self.scale, dropout=dropout)
        y = y.reshape(B, T, self.num_heads * self.head_dim)
        return self.out(y), new_cache


def _needs_explicit_attention(dtype: Any) -> bool:
    """Whether 16-bit attention must avoid :func:`jax.nn.dot_product_attention`: under
    ``jax_numpy_dtype_promotion="strict"`` its bf16 dot algorithm (``BF16_BF16_F32``) is lowered
    for the backward products with a float32 cotangent and a bf16 operand, which strict
    promotion rejects."""
    return jnp.dtype(dtype) != jnp.float32 and jax.config.jax_numpy_dtype_promotion == "strict"


def dot_product_attention(q: Array, k: Array, v: Array, *, mask: Array | None = None, scale: float,
                          dropout: Callable[[Array], Array] | None = None) -> Array:
    r"""``softmax(q k^T * scale + mask) v`` with grouped key/value heads, in ``q``'s dtype.

    ``q`` is ``(B, T, heads, head_dim)``, ``k`` and ``v`` are ``(B, S, kv_heads, head_dim)``
    with ``heads`` a multiple of ``kv_heads`` (query head ``n`` reads key/value head
    ``n // (heads // kv_heads)``, as ``jnp.repeat`` would lay them out). ``mask`` is boolean,
    ``(B, 1 or heads, T, S)``, True where attention is allowed. ``dropout``, when given, is
    applied to the probabilities ``(B, heads, T, S)``.

    Scores are accumulated in float32 (``preferred_element_type``), the softmax is float32 and
    the probabilities are cast to ``v``'s dtype for the second product (float32 accumulation,
    result cast to ``q``'s dtype). In bfloat16 the backward products round their float32
    cotangent to bfloat16 first (:func:`_einsum_f32`), so both passes are native bf16 x bf16
    products. Every mixed-dtype step is an explicit cast, so the forward and backward passes
    hold under strict dtype promotion, which ``jax.nn.dot_product_attention(implementation="xla")``
    does not with bfloat16 inputs: its forward calls ``promote_types(query.dtype, float32)``,
    and its ``BF16_BF16_F32`` dot algorithm, lowered for the transposed products (a float32
    cotangent with a bfloat16 operand), calls ``promote_types(float32, bfloat16)``.

    Example:
      >>> q = jnp.ones((1, 3, 4, 8), jnp.bfloat16); kv = jnp.ones((1, 3, 2, 8), jnp.bfloat16)
      >>> dot_product_attention(q, kv, kv, scale=8 ** -0.5).shape
      (1, 3, 4, 8)
    """
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    if k.shape != (B, S, K, H) or v.shape != k.shape or N % K:
        raise ValueError(f"dot_product_attention expects q (B, T, heads, head_dim) and k, v (B, S, kv_heads, head_dim) "
                         f"with heads a multiple of kv_heads; got q {q.shape}, k {k.shape}, v {v.shape}")
    G = N // K
    qg = q.reshape(B, T, K, G, H)
    scores = _einsum_f32(("btkgh,bskh->bkgts", "bkgts,bskh->btkgh", "bkgts,btkgh->bskh"), qg, k.astype(q.dtype))
    scores = scores * jnp.float32(scale)
    if mask is not None:
        mask = jnp.asarray(mask, jnp.bool_)
        if mask.ndim != 4 or mask.shape[1] not in (1, N):
            raise ValueError(f"attention mask must be (B, 1 or {N}, T, S); got shape {mask.shape}")
        mask = jnp.broadcast_to(mask, (B, mask.shape[1], T, S)).reshape(B, K if mask.shape[1] == N else 1, -1, T, S)
        scores = jnp.where(mask, scores, jnp.float32(jnp.finfo(jnp.float32).min))
    probs = jax.nn.softmax(scores, axis=-1)
    if dropout is not None:
        probs = dropout(probs.reshape(B, N, T, S)).reshape(B, K, G, T, S)
    y = _einsum_f32(("bkgts,bskh->btkgh", "btkgh,bskh->bkgts", "btkgh,bkgts->bskh"), probs.astype(v.dtype), v)
    return y.reshape(B, T, N, H).astype(q.dtype)


def _einsum_f32(equations: tuple[str, str, str], a: Array, b: Array) -> Array:
    """``einsum(equations[0], a, b)`` accumulated in float32; ``a`` and ``b`` share one dtype.

    ``equations[1]`` and ``equations[2]`` give ``da`` from ``(g, b)`` and ``db`` from ``(g, a)``.
    For a low-precision dtype the backward products take the float32 cotangent rounded to that
    dtype (bfloat16 x bfloat16 with float32 accumulation, the fast native product, as
    ``DotAlgorithmPreset.BF16_BF16_F32`` does) instead of mixing float32 with bfloat16.
    """
    if a.dtype != b.dtype:
        raise TypeError(f"_einsum_f32 operands must share a dtype, got {a.dtype} and {b.dtype}")
    if a.dtype == jnp.float32:
        return jnp.einsum(equations[0], a, b, preferred_element_type=jnp.float32)
    return _einsum_low_precision(equations, a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum_low_precision(equations: tuple[str, str, str], a: Array, b: Array) -> Array:
    return jnp.einsum(equations[0], a, b, preferred_element_type=jnp.float32)


def _einsum_low_precision_fwd(equations: tuple[str, str, str], a: Array, b: Array) -> tuple[Array, tuple[Array, Array]]:
    return _einsum_low_precision(equations, a, b), (a, b)


def _einsum_low_precision_bwd(equations: tuple[str, str, str], res: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    a, b = res
    g = g.astype(a.dtype)
    da = jnp.einsum(equations[1], g, b, preferred_element_type=jnp.float32).astype(a.dtype)
    db = jnp.einsum(equations[2], g, a, preferred_element_type=jnp.float32).astype(b.dtype)
    return da, db


_einsum_low_precision.defvjp(_einsum_low_precision_fwd, _einsum_low_precision_bwd)


# ----------------------------------------------------------------------------- feed-forward


class MLP(nnx.Module):
    """``down(act(up(x)))``, or the gated form ``down(act(gate(x)) * up(x))`` (SwiGLU with silu).

    Submodules ``up`` (and ``gate`` when gated) with kernels ``(d_model, d_ff)`` and ``down``
    with kernel ``(d_ff, d_model)``; ``dropout`` follows ``down``.
    """

    def __init__(self, d_model: int, d_ff: int, *, act: str = "gelu", gated: bool = False, use_bias: bool = True,
                 dropout_rate: float = 0.0, std: float = 0.02, out_std: float | None = None,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.act = activation(act)
        self.act_name = act
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate = Linear(d_model, d_ff, axes=(EMBED, MLP_AXIS), std=std, **kw) if gated else None
        self.up = Linear(d_model, d_ff, axes=(EMBED, MLP_AXIS), std=std, **kw)
        self.down = Linear(d_ff, d_model, axes=(MLP_AXIS, EMBED), std=std if out_std is None else out_std, **kw)
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        if self.gate is not None:
            h = self.act(self.gate(x, jnp.float32)) * self.up(x, jnp.float32)
        else:
            h = self.act(self.up(x, jnp.float32))
        return self.dropout(self.down(h.astype(self.down.dtype)))


# ----------------------------------------------------------------------------- blocks


class PostNormBlock(nnx.Module):
    """BERT's layer: ``h = LN(x + drop(attn(x)))``, ``y = LN(h + mlp(h))`` (dropout inside ``mlp``)."""

    def __init__(self, attention: Attention, attention_norm: nnx.Module, mlp: MLP, mlp_norm: nnx.Module,
                 *, dropout_rate: float, rngs: nnx.Rngs):
        self.attention, self.attention_norm = attention, attention_norm
        self.mlp, self.mlp_norm = mlp, mlp_norm
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

    def __call__(self, x: Array, mask: Array | None) -> Array:
        a, _ = self.attention(x, mask=mask)
        h = self.attention_norm(x.astype(jnp.float32) + self.dropout(a).astype(jnp.float32))
        return self.mlp_norm(h.astype(jnp.float32) + self.mlp(h).astype(jnp.float32))


class PreNormBlock(nnx.Module):
    """GPT-2 / Llama layer: ``h = x + drop(attn(norm1(x)))``, ``y = h + mlp(norm2(h))``.

    The residual stream stays float32 whatever the compute dtype.
    """

    def __init__(self, attention_norm: nnx.Module, attention: Attention, mlp_norm: nnx.Module, mlp: MLP,
                 *, dropout_rate: float, rngs: nnx.Rngs):
        self.attention_norm, self.attention = attention_norm, attention
        self.mlp_norm, self.mlp = mlp_norm, mlp
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

    def __call__(self, x: Array, mask: Array | None, rotary: tuple[Array, Array] | None = None,
                 cache: tuple[Array, Array] | None = None, cache_index: Array | None = None
                 ) -> tuple[Array, tuple[Array, Array] | None]:
        a, new_cache = self.attention(self.attention_norm(x), mask=mask, rotary=rotary, cache=cache,
                                      cache_index=cache_index)
        h = x + self.dropout(a).astype(jnp.float32)
        return h + self.mlp(self.mlp_norm(h)).astype(jnp.float32), new_cache


#: What a rematerialised layer keeps from its forward pass for the backward pass:
#: ``"full"`` nothing but its input (everything is recomputed); ``"dots"`` the results of its
#: matrix products without batch dimensions (the projections and the MLP; attention scores,
#: softmax, norms and activations are recomputed).
REMAT_POLICIES: dict[str, Any] = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def remat_policy(remat: bool | str) -> str:
    """``remat`` as a policy name: ``"none"``, ``"full"`` or ``"dots"`` (``True`` is ``"full"``)."""
    name = {True: "full", False: "none"}.get(remat, remat) if isinstance(remat, bool) else remat
    if name != "none" and name not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r} is not one of none, {', '.join(REMAT_POLICIES)}")
    return name


def rematerialised(fn: Callable[..., Any], remat: bool | str) -> Callable[..., Any]:
    """``fn`` (a layer call ``(layer, x, *args)``) under ``nnx.remat`` with the policy
    ``remat`` names (:data:`REMAT_POLICIES`), or ``fn`` itself for ``"none"``.

    Values and gradients are those of ``fn``; only what the backward pass keeps changes."""
    name = remat_policy(remat)
    if name == "none":
        return fn
    return nnx.remat(fn, policy=REMAT_POLICIES[name])
