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
  floor); holds one ``(token_chunk, V)`` float32 logits tile and a float32 ``(D, V)``
  weight-gradient accumulator.
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


def _rows(side: Side, tokens: blk.Chunks, k: Array) -> tuple[Array, Array, _Rows]:
    start, fresh = tokens.start(k), tokens.fresh(k)
    take = partial(blk.take_rows, start=start, size=tokens.size)
    rows = _Rows(take(side.local_targets), fresh & take(side.keep), take(side.target_weight), take(side.scale))
    return start, fresh, rows


def _hidden_rows(h: Array, start: Array, size: int, live: Array, dtype: jnp.dtype) -> Array:
    """Hidden rows of a chunk, 0 where not live (so NaN in skipped rows cannot leak)."""
    rows = blk.take_rows(h, start, size).astype(dtype)
    return jnp.where(live[:, None], rows, jnp.zeros((), dtype))


def _hidden_columns(h_t: Array, start: Array, size: int, live: Array, dtype: jnp.dtype) -> Array:
    """The same rows from the transposed hidden ``(D, N)``, as ``(D, size)``: the left operand of ``h^T dz``.

    Slicing a transposed copy made once keeps that matmul in the fast layout (contracting
    axis last); ``rows.T`` inside the loop would be folded into a slow transposed matmul.
    """
    cols = blk.dynamic_slice(h_t, start, size, 1).astype(dtype)
    return jnp.where(live[None, :], cols, jnp.zeros((), dtype))


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


def _weight_grad(dwt: Array, layout: str, dtype: jnp.dtype) -> Array:
    return (dwt if layout == blk.DV else dwt.T).astype(dtype)


# --------------------------------------------------------------------------- fused_total


def _fused_pass(plan: Plan, h: Array, w: Array, b: Array | None, side: Side):
    """``(sum_i scale_i l_i, (d/dh, d/dW, d/db))`` in one walk over token chunks."""
    tokens, n = plan.tokens, plan.tokens.size
    num_vocab = plan.vocab.total
    mm = w.dtype
    acc = blk.accumulation_dtype(mm)
    cols = jnp.arange(num_vocab, dtype=side.local_targets.dtype)
    every_col = jnp.ones((num_vocab,), jnp.bool_)

    def body(carry, k):
        dh, dwt, db, total = carry
        start, fresh, rows = _rows(side, tokens, k)
        hb = _hidden_rows(h, start, n, rows.live, mm)
        x, tanh_z = blk.tile_logits(hb, w, b, plan.layout, plan.softcap)
        masks = blk.Masks(every_col, cols[None, :] == rows.local_targets[:, None], side.class_weight)
        stats = blk.tile_stats(x, masks.hit, masks.col_weight, plan.smoothing)
        stats = blk.psum_stats(stats, plan.vocab_axes)
        loss, lse = _row_losses(stats, rows, side, plan)
        total = total + jnp.sum(rows.scale * loss)
        coef = _coefficients(lse, rows.scale, rows, side, plan)
        dz = blk.tile_grad(x, tanh_z, masks, lse, coef, plan.smoothing)
        dz_mm = dz.astype(mm)
        dh = blk.put_rows(dh, start, blk.dot(dz_mm, w, _grad_contract(plan.layout)), fresh, h.dtype)
        dwt = dwt + blk.dot(_hidden_columns(h_t, start, n, rows.live, mm), dz_mm, 0)
        if db is not None:
            db = db + jnp.sum(dz, axis=0)
        return (dh, dwt, db, total), None

    d = h.shape[1]
    h_t = blk.transposed(h)
    init = (
        blk.to_bits(_zeros(h.shape, h.dtype, plan.diff_vma)),
        _zeros((d, num_vocab), acc, plan.diff_vma),
        None if b is None else _zeros((num_vocab,), acc, plan.diff_vma),
        _zeros((), acc, plan.row_vma),
    )
    (dh, dwt, db, total), _ = jax.lax.scan(body, init, jnp.arange(tokens.count))
    grads = (blk.from_bits(dh, h.dtype), _weight_grad(dwt, plan.layout, w.dtype), None if b is None else db.astype(b.dtype))
    return total, grads


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def fused_total(plan: Plan, h: Array, w: Array, b: Array | None, side: Side) -> Array:
    """``sum_i side.scale_i * l_i`` with gradients formed during the forward pass.

    Example:
      See :func:`jaxloss.linear_cross_entropy`, which builds ``plan`` and ``side``.
    """
    return _fused_pass(plan, h, w, b, side)[0]


def _fused_total_fwd(plan, h, w, b, side):
    return _fused_pass(plan, h, w, b, side)


def _scaled(x: Array | None, g: Array) -> Array | None:
    if x is None:
        return None
    return (x.astype(blk.accumulation_dtype(x.dtype, g.dtype)) * g).astype(x.dtype)


def _fused_total_bwd(plan, grads, g):
    dh, dw, db = grads
    return _scaled(dh, g), _scaled(dw, g), _scaled(db, g), None


fused_total.defvjp(_fused_total_fwd, _fused_total_bwd)


# --------------------------------------------------------------------------- token_losses


def _column_slices(plan: Plan, w: Array, b: Array | None, side: Side, c: Array):
    vocab, v = plan.vocab, plan.vocab.size
    start, fresh = vocab.start(c), vocab.fresh(c)
    w_cols = blk.weight_columns(w, plan.layout, start, v)
    b_cols = None if b is None else blk.dynamic_slice(b, start, v, 0)
    cw = blk.dynamic_slice(side.class_weight, start, v, 0)
    return start, fresh, w_cols, b_cols, cw


def _stats_pass(plan: Plan, h: Array, w: Array, b: Array | None, side: Side) -> tuple[Array, Array]:
    """Per-token ``(loss, lse)``: token chunks outside, vocabulary chunks inside (online logsumexp)."""
    tokens, n = plan.tokens, plan.tokens.size
    acc = blk.accumulation_dtype(w.dtype)

    def token_body(carry, k):
        losses, lses = carry
        start, fresh, rows = _rows(side, tokens, k)
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
        return (blk.put_rows(losses, start, loss, fresh, acc), blk.put_rows(lses, start, lse, fresh, acc)), None

    init = (_zeros((tokens.total,), acc, plan.row_vma), _zeros((tokens.total,), acc, plan.row_vma))
    (losses, lses), _ = jax.lax.scan(token_body, init, jnp.arange(tokens.count))
    return losses, lses


def _grad_pass(plan: Plan, h: Array, w: Array, b: Array | None, side: Side, lses: Array, g: Array):
    """``(d/dh, d/dW, d/db)`` for per-token cotangents ``g``: vocabulary chunks outside, token chunks inside."""
    tokens, n, v = plan.tokens, plan.tokens.size, plan.vocab.size
    acc = blk.accumulation_dtype(w.dtype)
    g = g.astype(acc)
    h_t = blk.transposed(h)

    def vocab_body(carry, c):
        dh, dw, db = carry
        c_start, c_fresh, w_cols, b_cols, cw = _column_slices(plan, w, b, side, c)

        def token_body(inner, k):
            dh, dwt, dbc = inner
            start, _, rows = _rows(side, tokens, k)
            hb = _hidden_rows(h, start, n, rows.live, w.dtype)
            x, tanh_z = blk.tile_logits(hb, w_cols, b_cols, plan.layout, plan.softcap)
            masks = blk.tile_masks(c_start, c_fresh, rows.local_targets, cw)
            lse = blk.take_rows(lses, start, n)
            coef = _coefficients(lse, blk.take_rows(g, start, n), rows, side, plan)
            dz = blk.tile_grad(blk.mask_columns(x, masks.cols), tanh_z, masks, lse, coef, plan.smoothing)
            dz_mm = dz.astype(w.dtype)
            # Rows covered twice have live = False, so their dz is 0 and adding is exact.
            dh_rows = blk.take_rows(dh, start, n) + blk.dot(dz_mm, w_cols, _grad_contract(plan.layout))
            dh = jax.lax.dynamic_update_slice_in_dim(dh, dh_rows, start, axis=0)
            dwt = dwt + blk.dot(_hidden_columns(h_t, start, n, rows.live, w.dtype), dz_mm, 0)
            if dbc is not None:
                dbc = dbc + jnp.sum(dz, axis=0)
            return (dh, dwt, dbc), None

        d = h.shape[1]
        inner = (dh, _zeros((d, v), acc, plan.diff_vma), None if b is None else _zeros((v,), acc, plan.diff_vma))
        (dh, dwt, dbc), _ = jax.lax.scan(token_body, inner, jnp.arange(tokens.count))
        dw = blk.put_weight_columns(dw, plan.layout, c_start, dwt, c_fresh, w.dtype)
        if db is not None:
            db = blk.put_rows(db, c_start, dbc, c_fresh, b.dtype)
        return (dh, dw, db), None

    init = (
        _zeros(h.shape, acc, plan.diff_vma),
        blk.to_bits(_zeros(w.shape, w.dtype, plan.diff_vma)),
        None if b is None else blk.to_bits(_zeros(b.shape, b.dtype, plan.diff_vma)),
    )
    (dh, dw, db), _ = jax.lax.scan(vocab_body, init, jnp.arange(plan.vocab.count))
    return dh.astype(h.dtype), blk.from_bits(dw, w.dtype), None if b is None else blk.from_bits(db, b.dtype)


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
