r"""Block math of the fused linear cross-entropy: one (tokens x vocabulary) tile at a time.

For a tile of hidden rows ``h`` (n, D) and vocabulary columns ``W_c``, the logits are

.. math::
    z = h W_c + b_c, \qquad x = \kappa \tanh(z / \kappa) \ \text{(with a soft cap } \kappa\text{, else } x = z)

and a tile contributes per row the running statistics of an online logsumexp
``(m, s) = (max_c x_c, sum_c e^{x_c - m})``, the target logit ``x_t`` and the class-weighted
sum ``sum_c w_c x_c`` (used by label smoothing). With ``lse`` known, the tile's logits
gradient for per-row coefficients ``(a, b, c)`` is

.. math::
    \frac{\partial l}{\partial x_{ic}} = a_i\, \mathrm{softmax}(x_i)_c - b_i [c = t_i] - c_i w_c,
    \qquad \frac{\partial l}{\partial z} = \frac{\partial l}{\partial x} (1 - \tanh^2(z/\kappa)).

Columns a tile covers twice (the last, clamped chunk of a vocabulary that the chunk size
does not divide) and padding are masked: their logit reads as ``-inf``, their class weight
as 0, so they enter neither the logsumexp, the target, the smoothing sum nor the gradient.
Matmuls take 16-bit operands and accumulate in float32 (``preferred_element_type``), with
the contracting axis of the left operand last (the fast layout of XLA:CPU's GEMM).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

DV = "dv"
VD = "vd"


class Chunks(NamedTuple):
    """``count`` chunks of ``size`` covering ``total`` items; the last one is clamped to end at ``total``."""

    total: int
    size: int

    @property
    def count(self) -> int:
        return -(-self.total // self.size)

    def start(self, k: Array) -> Array:
        """First item of chunk ``k``: ``min(k * size, total - size)`` (no out-of-bounds reads)."""
        return jnp.minimum(k * self.size, self.total - self.size)

    def fresh(self, k: Array) -> Array:
        """``(size,)`` mask of the chunk's items not covered by an earlier chunk."""
        return self.start(k) + jnp.arange(self.size) >= k * self.size


def make_chunks(total: int, size: int) -> Chunks:
    """Chunks of at most ``size`` (at least 1) items over ``total`` items."""
    return Chunks(total, max(1, min(size, total)))


def wider_float(*dtypes: jnp.dtype) -> jnp.dtype:
    """The narrowest float dtype holding all ``dtypes`` exactly (bf16 with f16 gives f32).

    Written out because ``jnp.promote_types`` refuses bf16 with f32 under
    ``jax_numpy_dtype_promotion="strict"``.
    """
    dtypes = [jnp.dtype(d) for d in dtypes]
    if all(d == dtypes[0] for d in dtypes):
        return dtypes[0]
    return jnp.dtype(jnp.float64) if any(d.itemsize == 8 for d in dtypes) else jnp.dtype(jnp.float32)


def accumulation_dtype(*dtypes: jnp.dtype) -> jnp.dtype:
    """float32, or float64 when any input is float64."""
    return wider_float(jnp.float32, *dtypes)


def dot(a: Array, b: Array, contract_b: int) -> Array:
    """``a @ b`` (``contract_b=0``) or ``a @ b.T`` (``contract_b=1``), accumulated in float32 or wider."""
    acc = accumulation_dtype(a.dtype, b.dtype)
    return jax.lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())), preferred_element_type=acc)


def _bits(x: Array) -> Array:
    """16-bit floats viewed as ``uint16``.

    XLA:CPU upcasts a bf16 ``dynamic_slice`` / ``dynamic_update_slice`` to float32, and
    hoists that convert out of the loop: a float32 copy of the whole weight. Slicing the
    bit pattern instead keeps every big buffer in its own dtype.
    """
    if jnp.dtype(x.dtype).itemsize == 2 and jnp.issubdtype(x.dtype, jnp.floating):
        return jax.lax.bitcast_convert_type(x, jnp.uint16)
    return x


def _from_bits(x: Array, dtype: jnp.dtype) -> Array:
    return jax.lax.bitcast_convert_type(x, dtype) if x.dtype != dtype else x


def dynamic_slice(x: Array, start: Array, size: int, axis: int) -> Array:
    """``x[start:start + size]`` along ``axis`` (in the bit domain for 16-bit floats)."""
    return _from_bits(jax.lax.dynamic_slice_in_dim(_bits(x), start, size, axis=axis), x.dtype)


def dynamic_update(x: Array, update: Array, start: Array, axis: int) -> Array:
    """``x`` with ``update`` written at ``start`` along ``axis`` (in the bit domain for 16-bit floats)."""
    new = jax.lax.dynamic_update_slice_in_dim(_bits(x), _bits(update.astype(x.dtype)), start, axis=axis)
    return _from_bits(new, x.dtype)


def transposed(x: Array) -> Array:
    """A transposed copy of a 2-D array, kept as a real copy.

    The barrier stops XLA from folding the transpose back into the matmul that reads it,
    which would contract the left operand's first axis: the slow path of XLA:CPU (and for
    bf16 x bf16 -> f32, an unsupported one).
    """
    return jax.lax.optimization_barrier(_from_bits(_bits(x).T, x.dtype))


def weight_columns(weight: Array, layout: str, start: Array, size: int) -> Array:
    """The vocabulary slice ``[start, start + size)`` of ``weight`` in its own layout."""
    return dynamic_slice(weight, start, size, 1 if layout == DV else 0)


def tile_logits(h: Array, w_cols: Array, b_cols: Array | None, layout: str, softcap: float | None) -> tuple[Array, Array | None]:
    """``(x, tanh(z / cap))`` for hidden rows ``h`` and a weight slice; ``x`` in float32 (or wider)."""
    z = dot(h, w_cols, 0 if layout == DV else 1)
    if b_cols is not None:
        z = z + b_cols.astype(z.dtype)[None, :]
    if softcap is None:
        return z, None
    cap = jnp.asarray(softcap, z.dtype)
    t = jnp.tanh(z / cap)
    return cap * t, t


class TileStats(NamedTuple):
    """Per-row statistics of a tile (or of everything merged so far)."""

    peak: Array  # m = max_c x_c
    scaled_sum: Array  # s = sum_c exp(x_c - m)
    picked: Array  # x_t (0 where the target is elsewhere)
    smooth: Array  # sum_c w_c x_c (0 when smoothing is off)

    def lse(self) -> Array:
        return self.peak + jnp.log(self.scaled_sum)


def empty_stats(rows: int, dtype: jnp.dtype) -> TileStats:
    zeros = jnp.zeros((rows,), dtype)
    return TileStats(jnp.full((rows,), -jnp.inf, dtype), zeros, zeros, zeros)


def tile_stats(x: Array, hit: Array, col_weight: Array, smoothing: bool) -> TileStats:
    """Statistics of masked logits ``x`` (``-inf`` at masked columns); ``hit`` marks target cells."""
    zero = jnp.zeros((), x.dtype)
    peak = jnp.max(x, axis=1)
    shift = jnp.where(jnp.isfinite(peak), peak, zero)
    scaled_sum = jnp.sum(jnp.exp(x - shift[:, None]), axis=1)
    picked = jnp.sum(jnp.where(hit, x, zero), axis=1)
    if smoothing:
        smooth = jnp.sum(jnp.where(col_weight[None, :] == 0, zero, col_weight[None, :] * x), axis=1)
    else:
        smooth = jnp.zeros_like(picked)
    # A tile with no finite logit has peak -inf and scaled_sum 0, which merge_stats ignores.
    return TileStats(peak, scaled_sum, picked, smooth)


def merge_stats(a: TileStats, b: TileStats) -> TileStats:
    """Online logsumexp merge: ``lse(merge) = logaddexp(lse(a), lse(b))``; sums add."""
    peak = jnp.maximum(a.peak, b.peak)
    finite = jnp.isfinite(peak)
    ref = jnp.where(finite, peak, jnp.zeros((), peak.dtype))
    scale_a = jnp.where(jnp.isfinite(a.peak), jnp.exp(a.peak - ref), jnp.zeros((), peak.dtype))
    scale_b = jnp.where(jnp.isfinite(b.peak), jnp.exp(b.peak - ref), jnp.zeros((), peak.dtype))
    return TileStats(peak, a.scaled_sum * scale_a + b.scaled_sum * scale_b, a.picked + b.picked, a.smooth + b.smooth)


def psum_stats(stats: TileStats, axes: tuple[str, ...]) -> TileStats:
    """Combines the statistics of vocabulary slices held by the devices along ``axes``."""
    if not axes:
        return stats
    peak = jax.lax.pmax(stats.peak, axes)
    ref = jnp.where(jnp.isfinite(peak), peak, jnp.zeros((), peak.dtype))
    local = jnp.where(jnp.isfinite(stats.peak), stats.scaled_sum * jnp.exp(stats.peak - ref), jnp.zeros((), peak.dtype))
    scaled_sum, picked, smooth = jax.lax.psum((local, stats.picked, stats.smooth), axes)
    return TileStats(peak, scaled_sum, picked, smooth)


class Masks(NamedTuple):
    """Which cells of a tile are live, and where the targets are."""

    cols: Array  # (v,) columns not masked
    hit: Array  # (n, v) target cells
    col_weight: Array  # (v,) class weight, 0 at masked columns


def tile_masks(col_start: Array, col_fresh: Array, local_targets: Array, class_weight: Array) -> Masks:
    """Masks of a tile whose columns start at ``col_start`` (``local_targets`` index this device's vocabulary)."""
    cols = col_start + jnp.arange(col_fresh.shape[0], dtype=local_targets.dtype)
    hit = (cols[None, :] == local_targets[:, None]) & col_fresh[None, :]
    col_weight = jnp.where(col_fresh, class_weight, jnp.zeros((), class_weight.dtype))
    return Masks(col_fresh, hit, col_weight)


def mask_columns(x: Array, cols: Array) -> Array:
    return jnp.where(cols[None, :], x, jnp.full((), -jnp.inf, x.dtype))


class RowCoefficients(NamedTuple):
    """``dl/dx = a softmax(x) - b [c = t] - c w_c`` per row (already times the upstream cotangent)."""

    a: Array
    b: Array
    c: Array


def tile_grad(x: Array, tanh_z: Array | None, masks: Masks, lse: Array, coef: RowCoefficients, smoothing: bool) -> Array:
    """Gradient of the rows' losses w.r.t. the tile's pre-cap logits ``z`` (float32, ``(n, v)``)."""
    zero = jnp.zeros((), x.dtype)
    grad = coef.a[:, None] * jnp.exp(x - lse[:, None]) - jnp.where(masks.hit, coef.b[:, None], zero)
    if smoothing:
        grad = grad - coef.c[:, None] * masks.col_weight[None, :]
    if tanh_z is not None:
        grad = grad * (1 - jnp.square(tanh_z))
    # Masked columns have x = -inf (softmax 0) and weight 0; where() also clears NaN there.
    return jnp.where(masks.cols[None, :], grad, zero)


def take_rows(x: Array, start: Array, size: int) -> Array:
    return dynamic_slice(x, start, size, 0)


def to_bits(x: Array) -> Array:
    """A buffer for :func:`put_rows` / :func:`put_weight_columns`: 16-bit floats as their bit pattern.

    Loop-carried 16-bit float buffers updated in place must stay integers inside the loop
    (see :func:`_bits`); :func:`from_bits` turns the finished buffer back.
    """
    return _bits(x)


def from_bits(x: Array, dtype: jnp.dtype) -> Array:
    return _from_bits(x, jnp.dtype(dtype))


def _put(buffer: Array, start: Array, values: Array, fresh: Array, axis: int, dtype: jnp.dtype) -> Array:
    """Writes ``values`` (as ``dtype``) at ``start`` along ``axis`` of a :func:`to_bits` buffer, keeping the old contents where ``fresh`` is False."""
    old = jax.lax.dynamic_slice_in_dim(buffer, start, values.shape[axis], axis=axis)
    keep = jnp.expand_dims(fresh, [a for a in range(values.ndim) if a != axis])
    new = jnp.where(keep, _bits(values.astype(dtype)), old)
    return jax.lax.dynamic_update_slice_in_dim(buffer, new, start, axis=axis)


def put_rows(buffer: Array, start: Array, rows: Array, fresh: Array, dtype: jnp.dtype) -> Array:
    """Writes ``rows`` at ``start``, keeping the old contents where ``fresh`` is False."""
    return _put(buffer, start, rows, fresh, 0, dtype)


def put_weight_columns(buffer: Array, layout: str, start: Array, grad_t: Array, fresh: Array, dtype: jnp.dtype) -> Array:
    """Writes a ``(D, v)`` weight-gradient slice into ``buffer`` (``(D, V)`` or ``(V, D)``) at ``start``."""
    if layout == DV:
        return _put(buffer, start, grad_t, fresh, 1, dtype)
    return _put(buffer, start, grad_t.T, fresh, 0, dtype)
