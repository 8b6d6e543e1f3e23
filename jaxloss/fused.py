r"""Fused linear cross-entropy: the loss of ``hidden @ weight + bias`` without its logits.

For a large vocabulary the last matmul and its loss dominate training memory: the float32
logits of 8,192 tokens x 256k classes take 8 GiB, and their gradient as much again.
:func:`linear_cross_entropy` computes exactly :func:`jaxloss.cross_entropy` of those logits
(same options, PyTorch's semantics) while holding only a tile of logits at a time; see
:mod:`jaxloss._fused_core` for the two strategies and :mod:`jaxloss._fused_blocks` for the
tile math.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from jaxloss import _fused_blocks as blk
from jaxloss._fused_core import Plan, Side, fused_total, token_losses, vary, varying_axes
from jaxloss._reduce import AxisName, SumCount, _axis_tuple, check_mask, check_reduction, compute_dtype, reduce_loss
from jaxloss._validation import as_float_array, check_class_ids, check_fraction, check_nonnegative
from jaxloss.matmul import wider_float

LAYOUTS = ("dv", "vd")
# float32 logits per tile of the fused-gradient strategy: 1/FUSED_TILE_FRACTION of its (D, V)
# weight-gradient accumulator, within [FUSED_TILE_MIN, FUSED_TILE_MAX] elements (32 to 128 MiB),
# and FUSED_ROWS rows whenever such a tile fits in FUSED_TILE_MAX.
FUSED_TILE_FRACTION = 32
FUSED_TILE_MIN = 1 << 23
FUSED_TILE_MAX = 1 << 25
FUSED_ROWS = 512
LOW_MEMORY_TOKEN_CHUNK = 1024
LOW_MEMORY_VOCAB_CHUNK = 4096


def linear_cross_entropy(
    hidden: Array,
    weight: Array,
    targets: Array,
    *,
    bias: Array | None = None,
    weight_layout: str = "dv",
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float | Array = 0.0,
    z_loss: float | Array = 0.0,
    logit_softcap: float | None = None,
    class_weight: Array | None = None,
    where: Array | None = None,
    low_memory: bool = False,
    token_chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    axis_name: AxisName = None,
    vocab_axis_name: AxisName = None,
    validate: bool = False,
) -> Array | SumCount:
    r"""``cross_entropy(hidden @ weight + bias, targets, ...)`` without materializing the logits.

    With ``z = h W + b`` and, given ``logit_softcap = kappa``, ``x = kappa tanh(z / kappa)``
    (Gemma 2), else ``x = z``, the per-token loss is that of
    :func:`jaxloss.cross_entropy` with class weights ``w``, smoothing ``eps`` and z-loss
    ``zeta``:

    .. math::
        l_i = (1-\epsilon) w_{t_i} (\mathrm{lse}_i - x_{i t_i})
              + \frac{\epsilon}{V} \sum_c w_c (\mathrm{lse}_i - x_{ic})
              + \zeta\, w_{t_i} \mathrm{lse}_i^2 ,

    reduced the same way (``"mean"`` divides by ``sum_i w_{t_i}`` over counted tokens).

    Two strategies, both a ``jax.custom_vjp`` over chunks:

    - default, for ``"mean" | "sum" | "sum_count"``: token chunks, each against the whole
      vocabulary; the gradients of ``hidden``, ``weight`` and ``bias`` are formed during the
      forward pass and the backward pass only scales them (three matmuls, the floor).
      Memory: a float32 ``(D, V)`` weight-gradient accumulator and one float32
      ``(token_chunk_size, V)`` logits tile (by default about 1/32 of the accumulator); the
      hidden gradient is written once per row in its dtype.
    - ``low_memory=True``, and always for ``reduction="none"``: the forward pass keeps
      ``logsumexp`` per token (token chunks x vocabulary chunks, online logsumexp); the
      backward pass recomputes each tile's logits with the vocabulary in the outer loop, so
      no float32 ``(D, V)`` buffer is ever held (four matmuls): each vocabulary slice of the
      weight gradient is finished in float32 and written once, in the weight's dtype, into
      the output. Memory: one float32 ``(token_chunk_size, vocab_chunk_size)`` tile, float32
      ``(D, vocab_chunk_size)`` slices and a float32 ``(N, D)`` hidden-gradient accumulator.

    16-bit ``hidden`` / ``weight`` are multiplied in their dtype with float32 accumulation;
    gradients accumulate in float32 and are returned in the inputs' dtypes. The loss is
    float32 (float64 for float64 inputs). ``class_weight`` is not differentiated.

    Sharding: under ``jax.shard_map`` with ``weight`` (and ``bias``, ``class_weight``) split
    over the vocabulary along ``vocab_axis_name`` in equal, contiguous slices in device
    order, each device passes its slice and the global ``targets``; the logsumexp, target
    logit and smoothing sums are combined across those devices and every device returns
    the same loss. With tokens split along ``axis_name``, reductions are summed over it
    (as in :func:`jaxloss.cross_entropy`). Under plain ``jax.jit`` with sharded inputs, XLA
    partitions the loops itself.

    Args:
      hidden: ``(..., D)`` float activations.
      weight: ``(D, V)`` (``weight_layout="dv"``, a Flax ``Dense`` kernel) or ``(V, D)``
        (``"vd"``, a tied embedding table or a PyTorch ``Linear`` weight; no transposed
        copy is made).
      targets: integer class ids of shape ``hidden.shape[:-1]``.
      bias: optional ``(V,)``.
      weight_layout: ``"dv"`` or ``"vd"``.
      ignore_index, reduction, label_smoothing, z_loss, where, validate: as in
        :func:`jaxloss.cross_entropy` (``reduction="sum_count"`` returns a
        :class:`~jaxloss.SumCount`).
      logit_softcap: ``kappa > 0`` to cap the logits at ``kappa tanh(z / kappa)`` before the loss.
      class_weight: optional ``(V,)`` per-class weights (PyTorch's ``weight=``).
      low_memory: use the recompute strategy with the vocabulary in the outer loop.
      token_chunk_size: tokens per tile (default 1024 for ``low_memory``; for the default
        strategy, 512 when a float32 ``(512, V)`` tile fits in 128 MiB, else the rows of a
        tile of ``D * V / 32`` elements clamped to [2**23, 2**25]; a power of two in
        [16, 1024]). Smaller chunks save memory; larger ones pass over the ``(D, V)``
        accumulator fewer times.
      vocab_chunk_size: classes per tile of the recompute strategy, and per slice of the
        default strategy's gradient step (which computes the logits of the whole
        vocabulary at once); default 4096.
      axis_name: ``shard_map`` axis (or axes) the tokens are split over.
      vocab_axis_name: ``shard_map`` axis (or axes) the vocabulary is split over.

    Returns:
      The loss: per token (shape ``hidden.shape[:-1]``) for ``"none"``, a scalar for
      ``"sum"`` / ``"mean"``, a :class:`~jaxloss.SumCount` for ``"sum_count"``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxloss
      >>> h = jax.random.normal(jax.random.key(0), (6, 8))
      >>> w = jax.random.normal(jax.random.key(1), (8, 50))
      >>> t = jnp.array([3, 7, -100, 49, 0, 12])
      >>> fused = jaxloss.linear_cross_entropy(h, w, t, token_chunk_size=4)
      >>> unfused = jaxloss.cross_entropy(h @ w, t)
      >>> bool(jnp.allclose(fused, unfused, rtol=1e-5))
      True
    """
    check_reduction(reduction)
    check_fraction(label_smoothing, "label_smoothing")
    check_nonnegative(z_loss, "z_loss")
    hidden, weight, targets = _check_operands(hidden, weight, targets, weight_layout)
    batch_shape, num_dims = targets.shape, hidden.shape[-1]
    vocab_local = weight.shape[1] if weight_layout == "dv" else weight.shape[0]
    bias = _check_vector(bias, vocab_local, "bias", "float")
    class_weight = _check_vector(class_weight, vocab_local, "class_weight", "float")
    softcap = _check_softcap(logit_softcap)
    where = check_mask(where, batch_shape)
    token_axes, vocab_axes = _axis_tuple(axis_name), _axis_tuple(vocab_axis_name)

    common = wider_float(hidden.dtype, weight.dtype)
    acc = compute_dtype(common)
    h = hidden.reshape(-1, num_dims).astype(common)
    w = weight.astype(common)
    t = targets.reshape(-1).astype(jnp.int32)
    num_shards = _axis_size(vocab_axes)
    num_classes = vocab_local * num_shards
    counted = t != ignore_index
    if where is not None:
        counted = counted & where.reshape(-1)
    if validate:
        check_class_ids(t, num_classes, counted)
    in_range = (t >= 0) & (t < num_classes)
    keep = counted & in_range

    offset = jax.lax.axis_index(vocab_axes) * vocab_local if vocab_axes else 0
    local_targets = t - offset
    cw = jnp.ones((vocab_local,), acc) if class_weight is None else jax.lax.stop_gradient(class_weight).astype(acc)
    target_weight = _target_weight(cw, local_targets, class_weight is not None, vocab_axes)
    target_weight = jnp.where(keep, target_weight, jnp.zeros((), acc))
    weight_sum = jnp.sum(cw)
    if vocab_axes:
        weight_sum = jax.lax.psum(weight_sum, vocab_axes)

    if h.shape[0] == 0:
        zeros = jnp.zeros(batch_shape, acc)
        return reduce_loss(zeros, zeros, reduction, axis_name=token_axes)

    count = jnp.sum(target_weight)
    if token_axes:
        count = jax.lax.psum(count, token_axes)
    strategy_fused = reduction != "none" and not low_memory
    if reduction == "mean":
        nonzero = count != 0
        scale = jnp.where(nonzero, 1 / jnp.where(nonzero, count, jnp.ones((), acc)), jnp.zeros((), acc))
    else:
        scale = jnp.ones((), acc)

    vmas = [h, w, t] + [a for a in (bias, where, class_weight) if a is not None]
    union = set(vocab_axes).union(*(varying_axes(a) for a in vmas))
    diff_vma = tuple(sorted(union))
    row_vma = tuple(sorted(union - set(vocab_axes)))
    plan = Plan(
        layout=weight_layout,
        tokens=blk.make_chunks(h.shape[0], _token_chunk(token_chunk_size, num_dims, vocab_local, strategy_fused)),
        vocab=blk.make_chunks(vocab_local, _positive(vocab_chunk_size, "vocab_chunk_size", LOW_MEMORY_VOCAB_CHUNK)),
        softcap=softcap,
        smoothing=not _is_static_zero(label_smoothing),
        z_loss=not _is_static_zero(z_loss),
        vocab_axes=vocab_axes,
        diff_vma=diff_vma,
        row_vma=row_vma,
        grad_dtypes=(w.dtype, None if bias is None else bias.dtype),
    )
    rows = lambda a: vary(a, row_vma)  # noqa: E731
    side = Side(
        local_targets=vary(local_targets, diff_vma),
        keep=rows(keep),
        target_weight=rows(target_weight),
        scale=rows(jnp.where(keep, scale, jnp.zeros((), acc))),
        class_weight=vary(cw, diff_vma),
        eps=jnp.asarray(label_smoothing, acc),
        zeta=jnp.asarray(z_loss, acc),
        weight_sum=weight_sum,
        num_classes=jnp.asarray(num_classes, acc),
    )
    h, w = vary(h, diff_vma), vary(w, diff_vma)
    b = None if bias is None else vary(bias, diff_vma)

    if strategy_fused:
        total = fused_total(plan, h, w, b, side)
        num_bad = jnp.sum((counted & ~in_range).astype(jnp.int32))
        if token_axes:
            total, num_bad = jax.lax.psum((total, num_bad), token_axes)
        total = jnp.where(num_bad > 0, jnp.full((), jnp.nan, acc), total)
        if reduction == "mean":
            return jnp.where(count != 0, total, jnp.full((), jnp.nan, acc))
        if reduction == "sum":
            return total
        return SumCount(total, count)

    losses = token_losses(plan, h, w, b, side)
    losses = jnp.where(counted & ~in_range, jnp.full((), jnp.nan, acc), losses)
    normalizer = jnp.where(counted, target_weight, jnp.zeros((), acc))
    return reduce_loss(losses.reshape(batch_shape), normalizer.reshape(batch_shape), reduction, axis_name=token_axes)


def _check_operands(hidden: Any, weight: Any, targets: Any, layout: str) -> tuple[Array, Array, Array]:
    if layout not in LAYOUTS:
        raise ValueError(f"weight_layout={layout!r} is not supported; expected 'dv' (D, V) or 'vd' (V, D)")
    hidden = as_float_array(hidden, "hidden")
    weight = as_float_array(weight, "weight")
    targets = jnp.asarray(targets)
    if hidden.ndim < 1:
        raise ValueError(f"hidden must have shape (..., D); got a scalar")
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D ({'(D, V)' if layout == 'dv' else '(V, D)'}), got shape {weight.shape}")
    d_axis = 0 if layout == "dv" else 1
    if weight.shape[d_axis] != hidden.shape[-1]:
        raise ValueError(
            f"hidden has shape {hidden.shape} (D = {hidden.shape[-1]}) but weight has shape {weight.shape}, "
            f"whose axis {d_axis} should be D for weight_layout={layout!r}"
        )
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise TypeError(f"targets must be integer class ids, got dtype {targets.dtype} with shape {targets.shape}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"targets has shape {targets.shape} but hidden of shape {hidden.shape} needs class ids of shape "
            f"{hidden.shape[:-1]}"
        )
    return hidden, weight, targets


def _check_vector(x: Any, size: int, name: str, kind: str) -> Array | None:
    if x is None:
        return None
    x = as_float_array(x, name)
    if x.shape != (size,):
        raise ValueError(f"{name} must have shape ({size},) (one per class of weight), got {x.shape}")
    return x


def _check_softcap(cap: Any) -> float | None:
    if cap is None:
        return None
    if isinstance(cap, jax.core.Tracer) or not np.isscalar(cap) and np.ndim(cap) != 0:
        raise TypeError(f"logit_softcap must be a Python number or None, got {cap!r}")
    value = float(cap)
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"logit_softcap must be a positive finite number or None, got {value}")
    return value


def _positive(value: int | None, name: str, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _token_chunk(size: int | None, dims: int, vocab: int, fused: bool) -> int:
    """Tokens per chunk: the given size, 1024 for ``low_memory``, else sized by the logits tile.

    The fused-gradient strategy holds a float32 ``(D, V)`` accumulator and one float32
    ``(token_chunk, V)`` logits tile, and every chunk reads and writes the whole
    accumulator once: 8 bytes per element against ``2 * token_chunk`` flops of the chunk's
    weight-gradient product. So a chunk gets ``FUSED_ROWS`` (512) tokens, which makes that
    traffic small next to the product, whenever the tile fits in 128 MiB. Beyond that memory
    comes first: the tile is about 1/32 of the accumulator (so the accumulator is nearly all
    the memory), at least 32 MiB and at most 128 MiB. A power of two in [16, 1024].

    Example:
      >>> _token_chunk(None, 1024, 50257, True), _token_chunk(None, 2048, 131072, True)
      (512, 64)
    """
    if size is not None or not fused:
        return _positive(size, "token_chunk_size", LOW_MEMORY_TOKEN_CHUNK)
    tile = max(FUSED_TILE_MIN, dims * vocab // FUSED_TILE_FRACTION)
    if FUSED_ROWS * vocab <= FUSED_TILE_MAX:
        tile = max(tile, FUSED_ROWS * vocab)
    rows = max(1, min(tile, FUSED_TILE_MAX) // max(vocab, 1))
    return int(min(1024, max(16, 1 << (rows.bit_length() - 1))))


def _axis_size(axes: tuple[str, ...]) -> int:
    return int(jax.lax.axis_size(axes)) if axes else 1


def _target_weight(cw: Array, local_targets: Array, weighted: bool, vocab_axes: tuple[str, ...]) -> Array:
    """``w[t]`` per token; with a split vocabulary, the device holding ``t`` supplies it."""
    if not weighted:
        return jnp.ones(local_targets.shape, cw.dtype)
    here = (local_targets >= 0) & (local_targets < cw.shape[0])
    picked = jnp.where(here, cw[jnp.clip(local_targets, 0, cw.shape[0] - 1)], jnp.zeros((), cw.dtype))
    return jax.lax.psum(picked, vocab_axes) if vocab_axes else picked


def _is_static_zero(value: float | Array) -> bool:
    return not isinstance(value, jax.core.Tracer) and float(np.asarray(value)) == 0.0
