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
Matmuls (:func:`jaxloss.matmul.dot`) take 16-bit operands and accumulate in float32
(``preferred_element_type``), with the contracting axis of the left operand last (the fast
layout of XLA:CPU's GEMM).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from jaxloss.matmul import dot, transposed

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

    def order(self) -> Array:
        """Chunk indices with the last (clamped) chunk first: ``[count - 1, 0, 1, ..., count - 2]``.

        Walked in this order, a loop can write each chunk's results whole (0 for items that
        are not fresh): the chunk that covers those items again comes later and overwrites
        them, so no write has to read the buffer back.
        """
        return jnp.roll(jnp.arange(self.count), 1)


def make_chunks(total: int, size: int) -> Chunks:
    """Chunks of at most ``size`` (at least 1) items over ``total`` items."""
    return Chunks(total, max(1, min(size, total)))


def _bits(x: Array) -> Array:
    """16-bit floats viewed as ``uint16`` (other arrays unchanged).

    XLA:CPU computes a 16-bit float ``slice`` / ``dynamic_slice`` / ``dynamic_update_slice``
    in float32 (``float-normalization``), and then converts the whole source array once,
    outside the loop: a float32 copy of the whole weight. Moving the bit pattern instead
    keeps every big buffer in its own dtype.
    """
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if _is_16bit_float(x) else x


def _from_bits(x: Array, dtype: jnp.dtype) -> Array:
    return jax.lax.bitcast_convert_type(x, dtype) if x.dtype != dtype else x


def _is_16bit_float(x: Array) -> bool:
    return jnp.dtype(x.dtype).itemsize == 2 and jnp.issubdtype(x.dtype, jnp.floating)


def dynamic_slice(x: Array, start: Array, size: int, axis: int) -> Array:
    """``x[start:start + size]`` along ``axis``; only the slice is read.

    A 16-bit float array is sliced as its bit pattern, and the barrier ties the array to
    the (loop-dependent) start: otherwise XLA hoists the loop-invariant bit view of the
    whole array out of the loop, where it is a full copy.
    """
    x, start = _tie(x, start)
    return _from_bits(jax.lax.dynamic_slice_in_dim(_bits(x), start, size, axis=axis), x.dtype)


def _tie(x: Array, start: Array) -> tuple[Array, Array]:
    """``(x, start)`` behind a barrier for a 16-bit float ``x`` (see :func:`dynamic_slice`)."""
    return jax.lax.optimization_barrier((x, start)) if _is_16bit_float(x) else (x, start)


def dynamic_update(x: Array, update: Array, start: Array, axis: int) -> Array:
    """``x`` with ``update`` (cast to ``x.dtype``) written at ``start`` along ``axis``, in place.

    A 16-bit float buffer is updated as its bit pattern and stays in its own dtype, so a
    loop-carried gradient buffer is already the final output (no conversion copy at the end).
    XLA:CPU runs that bit-level update as one in-place pass over the whole buffer, cheap next
    to the matmuls that produce each slice. The loop must not read the buffer otherwise
    (a second reader makes XLA copy it): see :meth:`Chunks.order`.
    """
    new = jax.lax.dynamic_update_slice_in_dim(_bits(x), _bits(update.astype(x.dtype)), start, axis=axis)
    return _from_bits(new, x.dtype)


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


def softcap_tanh(x: Array, softcap: float | None) -> Array | None:
    """``tanh(z / cap)`` recovered from capped logits ``x = cap tanh(z / cap)`` (``None`` without a cap)."""
    return None if softcap is None else x / jnp.asarray(softcap, x.dtype)


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
    smooth = _smoothing_sum(x, col_weight) if smoothing else jnp.zeros_like(picked)
    # A tile with no finite logit has peak -inf and scaled_sum 0, which merge_stats ignores.
    return TileStats(peak, scaled_sum, picked, smooth)


def _smoothing_sum(x: Array, col_weight: Array) -> Array:
    """``sum_c w_c x_c`` per row, with ``0 * x = 0`` (so masked ``-inf`` columns add nothing)."""
    zero = jnp.zeros((), x.dtype)
    return jnp.sum(jnp.where(col_weight[None, :] == 0, zero, col_weight[None, :] * x), axis=1)


def tile_stats_and_exp(x: Array, targets: Array, col_weight: Array, smoothing: bool) -> tuple[TileStats, Array, Array]:
    """``(stats, e, shift)``: :func:`tile_stats` of a tile holding all ``x.shape[1]`` columns
    (none masked) for rows whose targets are the column ids ``targets`` (out of range: no
    target here), with ``e = exp(x - shift)`` kept for the gradient (see
    :func:`tile_grad_from_exp`).

    ``e`` is an element-wise loop (all cores) and its sum a plain reduction, where
    ``sum(exp(...))`` inside a reduction runs ``exp`` on one core of XLA:CPU; the gradient
    then reuses ``e`` instead of computing ``exp`` again, so ``exp`` runs once per logit. The
    target logit is gathered (one read per row), not summed out of a masked copy of the tile.
    """
    zero = jnp.zeros((), x.dtype)
    here = (targets >= 0) & (targets < x.shape[1])
    gathered = jnp.take_along_axis(x, jnp.where(here, targets, 0)[:, None], axis=1)[:, 0]
    picked = jnp.where(here, gathered, zero)
    # max(row max, target logit) is the row max; written so, e depends on the gather, which
    # then reads x before e does and e may overwrite x in place (one tile buffer, not two)
    peak = jnp.maximum(jnp.max(x, axis=1), jnp.where(here, gathered, jnp.full((), -jnp.inf, x.dtype)))
    shift = jnp.where(jnp.isfinite(peak), peak, zero)
    smooth = _smoothing_sum(x, col_weight) if smoothing else jnp.zeros_like(picked)
    e = jnp.exp(x - shift[:, None])
    return TileStats(peak, jnp.sum(e, axis=1), picked, smooth), e, shift


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
    cols = col_start.astype(local_targets.dtype) + jnp.arange(col_fresh.shape[0], dtype=local_targets.dtype)
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
    return _grad_from_softmax_term(coef.a[:, None] * jnp.exp(x - lse[:, None]), tanh_z, masks, coef, smoothing)


def tile_grad_from_exp(e: Array, shift: Array, tanh_z: Array | None, masks: Masks, lse: Array,
                       coef: RowCoefficients, smoothing: bool) -> Array:
    """:func:`tile_grad` from ``e = exp(x - shift)`` (:func:`tile_stats_and_exp`): ``softmax(x) = e exp(shift - lse)``."""
    return _grad_from_softmax_term((coef.a * jnp.exp(shift - lse))[:, None] * e, tanh_z, masks, coef, smoothing)


def _grad_from_softmax_term(a_softmax: Array, tanh_z: Array | None, masks: Masks, coef: RowCoefficients,
                            smoothing: bool) -> Array:
    """The tile gradient given its first term ``a_i softmax(x_i)_c`` (see :func:`tile_grad`)."""
    zero = jnp.zeros((), a_softmax.dtype)
    grad = a_softmax - jnp.where(masks.hit, coef.b[:, None], zero)
    if smoothing:
        grad = grad - coef.c[:, None] * masks.col_weight[None, :]
    if tanh_z is not None:
        grad = grad * (1 - jnp.square(tanh_z))
    # Masked columns have x = -inf (softmax 0) and weight 0; where() also clears NaN there.
    return jnp.where(masks.cols[None, :], grad, zero)


def take_rows(x: Array, start: Array, size: int) -> Array:
    return dynamic_slice(x, start, size, 0)


def add_rows(buffer: Array, start: Array, rows: Array) -> Array:
    """``buffer[start:start + len(rows)] += rows``, in place."""
    return dynamic_update(buffer, take_rows(buffer, start, rows.shape[0]) + rows, start, 0)


def add_columns(buffer: Array, start: Array, cols: Array) -> Array:
    """``buffer[..., start:start + cols.shape[-1]] += cols`` (last axis), in place."""
    axis = buffer.ndim - 1
    return dynamic_update(buffer, dynamic_slice(buffer, start, cols.shape[-1], axis) + cols, start, axis)


def add_weight_columns(buffer: Array, layout: str, start: Array, h: Array, h_t: Array | None, dz: Array) -> Array:
    """Adds the weight gradient ``h^T dz`` of the vocabulary slice at ``start`` to ``buffer``, in place.

    ``buffer`` is ``(D, V)`` (``"dv"``; ``h_t`` is ``h`` transposed) or ``(V, D)`` (``"vd"``,
    where the slice is ``dz^T h``); each product has its left operand's contracting axis last.
    """
    product = weight_grad(layout, h, h_t, dz)
    return add_columns(buffer, start, product) if layout == DV else add_rows(buffer, start, product)


def weight_grad(layout: str, h: Array, h_t: Array | None, dz: Array) -> Array:
    """The weight gradient ``h^T dz`` of the whole vocabulary in the weight's layout (float32 or wider)."""
    if layout == DV:
        return dot(h_t, dz, 0)
    return dot(transposed(dz), h, 0)


def put_rows(buffer: Array, start: Array, rows: Array) -> Array:
    """Writes ``rows`` at ``start`` (in ``buffer``'s dtype), in place; walk the chunks in :meth:`Chunks.order`."""
    return dynamic_update(buffer, rows, start, 0)


def put_weight_columns(buffer: Array, layout: str, start: Array, grad_t: Array) -> Array:
    """Writes a ``(D, v)`` weight-gradient slice into ``buffer`` (``(D, V)`` or ``(V, D)``) at ``start``, in place.

    Walk the vocabulary chunks in :meth:`Chunks.order`.
    """
    if layout == DV:
        return dynamic_update(buffer, grad_t, start, 1)
    return dynamic_update(buffer, grad_t.T, start, 0)
