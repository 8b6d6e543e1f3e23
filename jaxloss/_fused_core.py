r"""The two custom-VJP strategies of the fused linear cross-entropy.

Per token ``i`` with target ``t``, target weight ``w_t``, class weights ``w_c`` (sum ``S``),
smoothing ``eps`` over ``V`` classes and z-loss ``zeta``:

.. math::
    l_i = (1-\epsilon) w_t (\mathrm{lse}_i - x_{it})
          + \frac{\epsilon}{V} (S\, \mathrm{lse}_i - \textstyle\sum_c w_c x_{ic})
          + \zeta w_t \mathrm{lse}_i^2

and for an upstream cotangent ``g_i``,
``dl/dx_ic = a_i softmax(x_i)_c - b_i [c = t] - c_i w_c`` with
``a_i = g_i ((1-eps) w_t + eps S / V + 2 zeta w_t lse_i)``, ``b_i = g_i (1-eps) w_t`` and
``c_i = g_i eps / V``.

- :func:`fused_total` (scalar losses): walks token chunks, each against the whole
  vocabulary, and forms the gradients of hidden, weight and bias during the forward pass;
  the backward pass only scales them by the incoming cotangent. Three matmuls in all (the
  floor) and one ``exp`` per logit; holds one ``(token_chunk, V)`` float32 logits tile and a
  float32 ``(D, V)`` weight-gradient accumulator.
- :func:`token_losses` (per-token losses): the forward pass walks token chunks x vocabulary
  chunks with an online logsumexp and saves ``lse`` per token; the backward pass recomputes
  each tile's logits, walking the vocabulary in the outer loop so each weight-gradient slice
  is finished (and cast) before the next: no float32 ``(D, V)`` buffer, one float32 ``(N, D)``
  hidden-gradient accumulator. Four matmuls.

Under ``shard_map`` each device may hold a slice of the vocabulary (``plan.vocab_axes``): the
per-token statistics are combined with ``pmax`` / ``psum``, each device forms the gradient of
its slice, and the inputs are cast to "varying" beforehand so that JAX sums the hidden
gradient over the vocabulary devices (and the weight gradient over token devices).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from jaxloss import _fused_blocks as blk
from jaxloss.matmul import accumulation_dtype, dot, transposed


class Plan(NamedTuple):
    """Static description of one call (hashable: a ``nondiff_argnums`` argument)."""

    layout: str
    tokens: blk.Chunks
    vocab: blk.Chunks  # over this device's vocabulary slice
    softcap: float | None
    smoothing: bool
    z_loss: bool
    vocab_axes: tuple[str, ...]
    diff_vma: tuple[str, ...]  # axes along which tiles (and the differentiable inputs) vary
    row_vma: tuple[str, ...]  # axes along which per-token results vary
    grad_dtypes: tuple[jnp.dtype, jnp.dtype | None]  # dtypes of the weight and bias (and of their gradients)


class Side(NamedTuple):
    """Per-call arrays that are not differentiated."""

    local_targets: Array  # (N,) target id minus this device's first vocabulary id
    keep: Array  # (N,) counted and in range
    target_weight: Array  # (N,) w_t
    scale: Array  # (N,) cotangent of each token's loss in fused_total (0 where not kept)
    class_weight: Array  # (V_local,) w_c
    eps: Array  # label smoothing
    zeta: Array  # z-loss coefficient
    weight_sum: Array  # S = sum_c w_c over the whole vocabulary
    num_classes: Array  # V over the whole vocabulary, as a float


def varying_axes(x: Array) -> frozenset:
    """The ``shard_map`` axes along which ``x`` varies (empty outside ``shard_map``)."""
    return frozenset(getattr(getattr(jax.typeof(x), "mat", None), "varying", ()))


def vary(x: Array, axes: tuple[str, ...]) -> Array:
    """``x`` cast to vary along every axis in ``axes`` (a no-op outside ``shard_map``)."""
    missing = tuple(a for a in axes if a not in varying_axes(x))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def _zeros(shape: tuple[int, ...], dtype: jnp.dtype, axes: tuple[str, ...]) -> Array:
    return vary(jnp.zeros(shape, dtype), axes)


class _Rows(NamedTuple):
    local_targets: Array
    live: Array
    target_weight: Array
    scale: Array


def _rows(side: Side, tokens: blk.Chunks, k: Array) -> tuple[Array, _Rows]:
    start, fresh = tokens.start(k), tokens.fresh(k)
    take = partial(blk.take_rows, start=start, size=tokens.size)
    rows = _Rows(take(side.local_targets), fresh & take(side.keep), take(side.target_weight), take(side.scale))
    return start, rows


def _hidden_rows(h: Array, start: Array, size: int, live: Array, dtype: jnp.dtype) -> Array:
    """Hidden rows of a chunk, 0 where not live (so NaN in skipped rows cannot leak)."""
    rows = blk.take_rows(h, start, size).astype(dtype)
    return jnp.where(live[:, None], rows, jnp.zeros((), dtype))


def _row_losses(stats: blk.TileStats, rows: _Rows, side: Side, plan: Plan) -> tuple[Array, Array]:
    """Per-row ``(loss, lse)`` from merged statistics (loss 0 where not live)."""
    lse = stats.lse()
    loss = (1 - side.eps) * rows.target_weight * (lse - stats.picked)
    if plan.smoothing:
        loss = loss + side.eps / side.num_classes * (side.weight_sum * lse - stats.smooth)
    if plan.z_loss:
        loss = loss + side.zeta * rows.target_weight * jnp.square(lse)
    return jnp.where(rows.live, loss, jnp.zeros((), loss.dtype)), lse


def _coefficients(lse: Array, g: Array, rows: _Rows, side: Side, plan: Plan) -> blk.RowCoefficients:
    g = jnp.where(rows.live, g, jnp.zeros((), g.dtype))
    b = g * (1 - side.eps) * rows.target_weight
    a = b
    if plan.smoothing:
        a = a + g * side.eps * side.weight_sum / side.num_classes
    if plan.z_loss:
        a = a + g * 2 * side.zeta * rows.target_weight * lse
    return blk.RowCoefficients(a, b, g * side.eps / side.num_classes)


def _grad_contract(layout: str) -> int:
    """Contracting axis of the weight in ``dz @ W^T`` (``(D, V)`` layout) or ``dz @ W`` (``(V, D)``)."""
    return 1 if layout == blk.DV else 0


def _column_slices(plan: Plan, w: Array, b: Array | None, side: Side, c: Array):
    vocab, v = plan.vocab, plan.vocab.size
    start, fresh = vocab.start(c), vocab.fresh(c)
    w_cols = blk.weight_columns(w, plan.layout, start, v)
    b_cols = None if b is None else blk.dynamic_slice(b, start, v, 0)
    cw = blk.dynamic_slice(side.class_weight, start, v, 0)
    return start, fresh, w_cols, b_cols, cw


# --------------------------------------------------------------------------- fused_total


def _fused_pass(plan: Plan, h: Array, w: Array, b: Array | None, side: Side):
    """``(sum_i scale_i l_i, (d/dh, d/dW, d/db))`` in one walk over token chunks.

    Per token chunk: the logits against the whole vocabulary (the one full-width float32
    tile), ``e = exp(x - max)`` over the tile in place, and the statistics; then a walk over
    vocabulary slices that turns each slice of ``e`` into its logits gradient and adds its
    share to the hidden rows' gradient and, in place, to the float32 weight-gradient
    accumulator (in the weight's layout). Adding slice by slice matters: a matmul's result is
    a new buffer on XLA:CPU, so one weight-sized product per chunk would double the
    accumulator's memory. The first chunk has no accumulator to add to: its whole-vocabulary
    products start the accumulators (no zero-filled buffer, one read-modify-write of the
    accumulator fewer). The hidden gradient comes back in its dtype, the weight and bias
    gradients in float32, for the backward pass to scale and round once.
    """
    tokens, n = plan.tokens, plan.tokens.size
    num_vocab, v = plan.vocab.total, plan.vocab.size
    mm = w.dtype
    acc = accumulation_dtype(mm)
    d = h.shape[1]

    def head(k):
        """The chunk's rows, logits, ``e``, statistics, loss sum and gradient coefficients."""
        start, rows = _rows(side, tokens, k)
        hb = _hidden_rows(h, start, n, rows.live, mm)
        x, _ = blk.tile_logits(hb, w, b, plan.layout, plan.softcap)
        stats, e, shift = blk.tile_stats_and_exp(x, rows.local_targets, side.class_weight, plan.smoothing)
        stats = blk.psum_stats(stats, plan.vocab_axes)
        loss, lse = _row_losses(stats, rows, side, plan)
        coef = _coefficients(lse, rows.scale, rows, side, plan)
        hb_t = transposed(hb) if plan.layout == blk.DV else None
        return start, rows, hb, hb_t, x, e, shift, lse, coef, jnp.sum(rows.scale * loss)

    def first(k):
        """The first chunk's gradients as whole products: they start the accumulators."""
        start, rows, hb, hb_t, x, e, shift, lse, coef, total = head(k)
        masks = blk.tile_masks(jnp.zeros((), jnp.int32), jnp.ones((num_vocab,), bool), rows.local_targets,
                               side.class_weight)
        tanh_z = blk.softcap_tanh(x, plan.softcap)
        dz = blk.tile_grad_from_exp(e, shift, tanh_z, masks, lse, coef, plan.smoothing)
        dz_mm = dz.astype(mm)
        dh = blk.put_rows(_zeros(h.shape, h.dtype, plan.diff_vma), start, dot(dz_mm, w, _grad_contract(plan.layout)))
        dw = blk.weight_grad(plan.layout, hb, hb_t, dz_mm)
        db = None if b is None else jnp.sum(dz, axis=0)
        return dh, dw, db, total

    def body(carry, k):
        dh, dw, db, total = carry
        start, rows, hb, hb_t, x, e, shift, lse, coef, chunk_total = head(k)

        def slice_body(inner, c):
            dh_rows, dw, db = inner
            c_start, c_fresh, w_cols, _, cw = _column_slices(plan, w, None, side, c)
            es = blk.dynamic_slice(e, c_start, v, 1)
            tanh_z = None if plan.softcap is None else blk.softcap_tanh(blk.dynamic_slice(x, c_start, v, 1), plan.softcap)
            masks = blk.tile_masks(c_start, c_fresh, rows.local_targets, cw)
            dz = blk.tile_grad_from_exp(es, shift, tanh_z, masks, lse, coef, plan.smoothing)
            dz_mm = dz.astype(mm)
            # Columns covered twice have dz = 0 (not fresh), so adding is exact.
            dh_rows = dh_rows + dot(dz_mm, w_cols, _grad_contract(plan.layout))
            dw = blk.add_weight_columns(dw, plan.layout, c_start, hb, hb_t, dz_mm)
            if db is not None:
                db = blk.add_columns(db, c_start, jnp.sum(dz, axis=0))
            return (dh_rows, dw, db), None

        inner = (_zeros((n, d), acc, plan.diff_vma), dw, db)
        (dh_rows, dw, db), _ = jax.lax.scan(slice_body, inner, jnp.arange(plan.vocab.count))
        dh = blk.put_rows(dh, start, dh_rows)
        return (dh, dw, db, total + chunk_total), None

    order = tokens.order()
    carry = first(order[0])
    if tokens.count > 1:
        carry, _ = jax.lax.scan(body, carry, order[1:])
    dh, dw, db, total = carry
    return total, (dh, dw, db)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def fused_total(plan: Plan, h: Array, w: Array, b: Array | None, side: Side) -> Array:
    """``sum_i side.scale_i * l_i`` with gradients formed during the forward pass.

    Example:
      See :func:`jaxloss.linear_cross_entropy`, which builds ``plan`` and ``side``.
    """
    return _fused_pass(plan, h, w, b, side)[0]


def _fused_total_fwd(plan, h, w, b, side):
    return _fused_pass(plan, h, w, b, side)


def _scaled(x: Array, g: Array, dtype: jnp.dtype) -> Array:
    """``x * g`` rounded once to ``dtype`` (an elementwise op: it may reuse ``x``'s buffer)."""
    return (x.astype(accumulation_dtype(x.dtype, g.dtype)) * g).astype(dtype)


def _fused_total_bwd(plan, residuals, g):
    dh, dw, db = residuals
    w_dtype, b_dtype = plan.grad_dtypes
    return _scaled(dh, g, dh.dtype), _scaled(dw, g, w_dtype), None if db is None else _scaled(db, g, b_dtype), None


fused_total.defvjp(_fused_total_fwd, _fused_total_bwd)


# --------------------------------------------------------------------------- token_losses


def _stats_pass(plan: Plan, h: Array, w: Array, b: Array | None, side: Side) -> tuple[Array, Array]:
    """Per-token ``(loss, lse)``: token chunks outside, vocabulary chunks inside (online logsumexp)."""
    tokens, n = plan.tokens, plan.tokens.size
    acc = accumulation_dtype(w.dtype)

    def token_body(carry, k):
        losses, lses = carry
        start, rows = _rows(side, tokens, k)
        hb = _hidden_rows(h, start, n, rows.live, w.dtype)

        def vocab_body(stats, c):
            c_start, c_fresh, w_cols, b_cols, cw = _column_slices(plan, w, b, side, c)
            x, _ = blk.tile_logits(hb, w_cols, b_cols, plan.layout, plan.softcap)
            masks = blk.tile_masks(c_start, c_fresh, rows.local_targets, cw)
            tile = blk.tile_stats(blk.mask_columns(x, masks.cols), masks.hit, masks.col_weight, plan.smoothing)
            return blk.merge_stats(stats, tile), None

        empty = jax.tree.map(lambda z: vary(z, plan.diff_vma), blk.empty_stats(n, acc))
        stats, _ = jax.lax.scan(vocab_body, empty, jnp.arange(plan.vocab.count))
        stats = blk.psum_stats(stats, plan.vocab_axes)
        loss, lse = _row_losses(stats, rows, side, plan)
        return (blk.put_rows(losses, start, loss), blk.put_rows(lses, start, lse)), None

    init = (_zeros((tokens.total,), acc, plan.row_vma), _zeros((tokens.total,), acc, plan.row_vma))
    (losses, lses), _ = jax.lax.scan(token_body, init, tokens.order())
    return losses, lses


def _grad_pass(plan: Plan, h: Array, w: Array, b: Array | None, side: Side, lses: Array, g: Array):
    """``(d/dh, d/dW, d/db)`` for per-token cotangents ``g``: vocabulary chunks outside, token chunks inside.

    Each vocabulary chunk's weight (and bias) gradient is finished in a float32 ``(D, v)``
    buffer and written once, in the weight's dtype, into the output buffer carried through
    the loop; the hidden gradient accumulates in float32 over the vocabulary chunks.
    """
    tokens, n, v = plan.tokens, plan.tokens.size, plan.vocab.size
    acc = accumulation_dtype(w.dtype)
    g = g.astype(acc)
    d = h.shape[1]

    def vocab_body(carry, c):
        dh, dw, db = carry
        c_start, c_fresh, w_cols, b_cols, cw = _column_slices(plan, w, b, side, c)

        def token_body(inner, k):
            dh, dwt, dbc = inner
            start, rows = _rows(side, tokens, k)
            hb = _hidden_rows(h, start, n, rows.live, w.dtype)
            x, tanh_z = blk.tile_logits(hb, w_cols, b_cols, plan.layout, plan.softcap)
            masks = blk.tile_masks(c_start, c_fresh, rows.local_targets, cw)
            lse = blk.take_rows(lses, start, n)
            coef = _coefficients(lse, blk.take_rows(g, start, n), rows, side, plan)
            dz = blk.tile_grad(blk.mask_columns(x, masks.cols), tanh_z, masks, lse, coef, plan.smoothing)
            dz_mm = dz.astype(w.dtype)
            # Rows covered twice have live = False, so their dz is 0 and adding is exact.
            dh = blk.add_rows(dh, start, dot(dz_mm, w_cols, _grad_contract(plan.layout)))
            dwt = dwt + dot(transposed(hb), dz_mm, 0)
            if dbc is not None:
                dbc = dbc + jnp.sum(dz, axis=0)
            return (dh, dwt, dbc), None

        inner = (dh, _zeros((d, v), acc, plan.diff_vma), None if b is None else _zeros((v,), acc, plan.diff_vma))
        (dh, dwt, dbc), _ = jax.lax.scan(token_body, inner, jnp.arange(tokens.count))
        dw = blk.put_weight_columns(dw, plan.layout, c_start, dwt)
        if db is not None:
            db = blk.put_rows(db, c_start, dbc)
        return (dh, dw, db), None

    init = (
        _zeros(h.shape, acc, plan.diff_vma),
        _zeros(w.shape, w.dtype, plan.diff_vma),
        None if b is None else _zeros(b.shape, b.dtype, plan.diff_vma),
    )
    (dh, dw, db), _ = jax.lax.scan(vocab_body, init, plan.vocab.order())
    return dh.astype(h.dtype), dw, db


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def token_losses(plan: Plan, h: Array, w: Array, b: Array | None, side: Side) -> Array:
    """Per-token losses ``l_i`` (0 where not kept); the backward pass recomputes the logits.

    Example:
      See :func:`jaxloss.linear_cross_entropy`, which builds ``plan`` and ``side``.
    """
    return _stats_pass(plan, h, w, b, side)[0]


def _token_losses_fwd(plan, h, w, b, side):
    losses, lses = _stats_pass(plan, h, w, b, side)
    return losses, (h, w, b, side, lses)


def _token_losses_bwd(plan, residuals, g):
    h, w, b, side, lses = residuals
    dh, dw, db = _grad_pass(plan, h, w, b, side, lses, g)
    return dh, dw, db, None


token_losses.defvjp(_token_losses_fwd, _token_losses_bwd)
