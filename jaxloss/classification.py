"""Classification losses with PyTorch's semantics: cross-entropy, NLL and binary cross-entropy.

All of them compute in float32 for 16-bit inputs (and return float32), accept a boolean
``where`` mask, and reduce with ``"none" | "sum" | "mean" | "sum_count"`` (see
:mod:`jaxloss._reduce`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from jaxloss._softmax_stats import softmax_statistics
from jaxloss._reduce import AxisName, SumCount, check_mask, check_reduction, compute_dtype, reduce_loss
from jaxloss._validation import (
    as_float_array,
    canonical_axis,
    check_class_ids,
    check_class_weight,
    check_fraction,
    check_nonnegative,
    check_same_shape,
)


def _class_axis_last(logits: Array, axis: int, name: str = "logits") -> Array:
    if logits.ndim == 0:
        raise ValueError(f"{name} must have a class axis; got a scalar")
    axis = canonical_axis(axis, logits.ndim, logits.shape)
    return logits if axis == logits.ndim - 1 else jnp.moveaxis(logits, axis, -1)


def _take_class(x: Array, class_ids: Array) -> Array:
    """``x[..., class_ids]`` element-wise along the last axis; ``class_ids`` must be in range."""
    return jnp.take_along_axis(x, class_ids[..., None], axis=-1, mode="clip")[..., 0]


def _counted_mask(targets: Array, ignore_index: int, where: Array | None) -> Array:
    counted = targets != ignore_index
    if where is not None:
        counted = counted & where
    return counted


def _class_id_masks(
    targets: Array, num_classes: int, ignore_index: int, where: Array | None, validate: bool
) -> tuple[Array, Array, Array]:
    """Which elements count, which class ids are in range, and ids safe to index with (0 elsewhere)."""
    counted = _counted_mask(targets, ignore_index, check_mask(where, targets.shape))
    if validate:
        check_class_ids(targets, num_classes, counted)
    in_range = (targets >= 0) & (targets < num_classes)
    return counted, in_range, jnp.where(counted & in_range, targets, 0)


def _integer_targets(targets: Any, batch_shape: tuple[int, ...], logits_shape: tuple[int, ...]) -> Array:
    targets = jnp.asarray(targets)
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise TypeError(
            f"targets must be integer class ids of shape {batch_shape} or float class probabilities "
            f"of shape {logits_shape}; got dtype {targets.dtype} with shape {targets.shape}"
        )
    if targets.shape != batch_shape:
        raise ValueError(
            f"targets has shape {targets.shape} but logits of shape {logits_shape} need class ids of shape "
            f"{batch_shape} (the logits' shape without the class axis)"
        )
    return targets


def cross_entropy(
    logits: Array,
    targets: Array,
    *,
    weight: Array | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float | Array = 0.0,
    where: Array | None = None,
    axis: int = -1,
    z_loss: float | Array = 0.0,
    axis_name: AxisName = None,
    validate: bool = False,
) -> Array | SumCount:
    r"""Cross-entropy between ``logits`` and class ids or class probabilities, as ``torch.nn.functional.cross_entropy``.

    With class ids ``y_i``, class weights ``w`` (all ones by default), smoothing ``eps``
    over ``C`` classes and ``lse_i = logsumexp_c x_ic``:

    .. math::
        l_i = (1-\epsilon)\, w_{y_i} (lse_i - x_{i y_i})
              + \frac{\epsilon}{C} \sum_c w_c (lse_i - x_{ic})
              + \zeta\, w_{y_i}\, lse_i^2

    and ``"mean"`` divides ``sum_i l_i`` by ``sum_i w_{y_i}`` over counted elements (PyTorch's
    weighted mean). With probability targets ``p`` (same shape as ``logits``; smoothed as
    ``(1-eps) p + eps/C``), ``l_i = -sum_c w_c p_ic log_softmax(x_i)_c + zeta lse_i^2`` and
    ``"mean"`` divides by the number of counted elements. ``zeta`` is ``z_loss``
    (PaLM / t5x), which PyTorch does not have.

    Elements whose target equals ``ignore_index`` or whose ``where`` is False contribute
    nothing, have zero gradient even if their logits are NaN, and do not count in the mean.
    When nothing is counted, ``"mean"`` is NaN (as in PyTorch) while ``"sum_count"`` gives
    a pair whose ``.mean()`` is 0. A counted class id outside ``[0, C)`` gives NaN, never a
    plausible number; ``validate=True`` raises instead (on concrete inputs at once; under
    ``jit`` and other transformations when the compiled call runs, through
    ``jax.debug.callback``).

    A logit of ``-inf`` on a non-target class (a masked vocabulary) gives finite values and
    gradients; a ``-inf`` target logit gives ``inf``. With label smoothing every class enters
    the smoothing term, so ``-inf`` logits make it ``inf``, as in PyTorch. With probability
    targets a class of probability 0 contributes 0 even at a ``-inf`` logit (PyTorch gives
    NaN there).

    Args:
      logits: unnormalized scores, class axis at ``axis``; bf16 / f16 are computed in f32.
      targets: integer class ids of ``logits.shape`` without the class axis, or float class
        probabilities of ``logits.shape``.
      weight: optional per-class weights, shape ``(C,)``.
      ignore_index: class id whose elements are skipped (class-id targets only).
      reduction: ``"none" | "sum" | "mean" | "sum_count"``.
      label_smoothing: ``eps`` in [0, 1].
      where: optional boolean mask of the per-element loss shape; False elements are skipped.
      axis: the class axis of ``logits`` (and of probability ``targets``).
      z_loss: coefficient of the auxiliary ``logsumexp**2`` penalty.
      axis_name: ``shard_map`` / ``pmap`` axis name(s) to sum over before normalizing.
      validate: raise on counted class ids outside ``[0, C)`` instead of returning NaN.

    Returns:
      float32 (or float64) loss: per element for ``"none"``, a scalar for ``"sum"`` and
      ``"mean"``, a :class:`~jaxloss.SumCount` for ``"sum_count"``.

    Example:
      >>> import jax.numpy as jnp, jaxloss
      >>> logits = jnp.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
      >>> round(float(jaxloss.cross_entropy(logits, jnp.array([0, 2]))), 4)
      0.1755
      >>> round(float(jaxloss.cross_entropy(logits, jnp.array([0, -100]))), 4)
      0.2413
    """
    check_reduction(reduction)
    check_fraction(label_smoothing, "label_smoothing")
    check_nonnegative(z_loss, "z_loss")
    logits = as_float_array(logits, "logits")
    targets_in = jnp.asarray(targets)
    probability_targets = jnp.issubdtype(targets_in.dtype, jnp.floating) and targets_in.shape == logits.shape
    x = _class_axis_last(logits, axis)
    if probability_targets:
        p = _class_axis_last(targets_in, axis, "targets")
        losses, normalizer = _soft_target_losses(x, p, weight, label_smoothing, z_loss, where)
    else:
        t = _integer_targets(targets_in, x.shape[:-1], logits.shape)
        losses, normalizer = _class_id_losses(x, t, weight, ignore_index, label_smoothing, z_loss, where, validate)
    return reduce_loss(losses, normalizer, reduction, axis_name=axis_name)


def _class_id_losses(
    x: Array,
    targets: Array,
    weight: Array | None,
    ignore_index: int,
    label_smoothing: float | Array,
    z_loss: float | Array,
    where: Array | None,
    validate: bool,
) -> tuple[Array, Array]:
    num_classes = x.shape[-1]
    dtype = compute_dtype(x.dtype)
    weight = check_class_weight(weight, num_classes)
    counted, in_range, safe_targets = _class_id_masks(targets, num_classes, ignore_index, where, validate)
    smoothing = not _is_static_zero(label_smoothing)
    class_weight = jnp.ones((num_classes,), dtype) if weight is None else weight.astype(dtype)
    # Skipped rows get a zero gradient inside the kernel and are masked out of the loss with
    # jnp.where, so NaN / inf there cannot leak into
    # the value or the gradient (a product with a 0 mask would give NaN).
    dot_kind = "none" if not smoothing else "sum" if weight is None else "weighted"
    lse, picked, weighted_sum = softmax_statistics(x, safe_targets, counted, class_weight, dot_kind)
    target_weight = jnp.ones_like(lse) if weight is None else class_weight[safe_targets]
    loss = (lse - picked) * target_weight
    if smoothing:
        eps = jnp.asarray(label_smoothing, dtype)
        smooth = lse * jnp.sum(class_weight) - weighted_sum  # sum_c w_c (lse - x_c)
        loss = (1 - eps) * loss + eps / num_classes * smooth
    if not _is_static_zero(z_loss):
        loss = loss + jnp.asarray(z_loss, dtype) * target_weight * jnp.square(lse)
    nan = jnp.full((), jnp.nan, dtype)
    zero = jnp.zeros((), dtype)
    loss = jnp.where(counted, jnp.where(in_range, loss, nan), zero)
    normalizer = jnp.where(counted, target_weight, zero)
    return loss, normalizer


def _soft_target_losses(
    x: Array,
    probs: Array,
    weight: Array | None,
    label_smoothing: float | Array,
    z_loss: float | Array,
    where: Array | None,
) -> tuple[Array, Array]:
    num_classes = x.shape[-1]
    dtype = compute_dtype(x.dtype)
    weight = check_class_weight(weight, num_classes)
    where = check_mask(where, x.shape[:-1])
    counted = jnp.ones(x.shape[:-1], jnp.bool_) if where is None else where
    p = jnp.where(counted[..., None], probs.astype(dtype), jnp.zeros((), dtype))
    if not _is_static_zero(label_smoothing):
        eps = jnp.asarray(label_smoothing, dtype)
        p = (1 - eps) * p + eps / num_classes
    coefficients = p if weight is None else p * jnp.broadcast_to(weight.astype(dtype), p.shape)
    no_targets = jnp.zeros(x.shape[:-1], jnp.int32)
    # -sum_c a_c log_softmax_c = lse sum_c a_c - sum_c a_c x_c, with a = w p and 0 * -inf = 0.
    lse, _, weighted_sum = softmax_statistics(x, no_targets, counted, coefficients, "weighted")
    loss = lse * jnp.sum(coefficients, axis=-1) - weighted_sum
    if not _is_static_zero(z_loss):
        loss = loss + jnp.asarray(z_loss, dtype) * jnp.square(lse)
    loss = jnp.where(counted, loss, jnp.zeros((), dtype))
    return loss, counted.astype(dtype)


def _is_static_zero(value: float | Array) -> bool:
    return not isinstance(value, jax.core.Tracer) and float(np.asarray(value)) == 0.0


def nll_loss(
    log_probs: Array,
    targets: Array,
    *,
    weight: Array | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    where: Array | None = None,
    axis: int = -1,
    axis_name: AxisName = None,
    validate: bool = False,
) -> Array | SumCount:
    r"""Negative log-likelihood of class ids under given log-probabilities, as ``torch.nn.functional.nll_loss``.

    .. math:: l_i = -w_{y_i} \log p_{i y_i}, \qquad \text{mean} = \sum_i l_i / \sum_i w_{y_i}

    Skipped elements (``ignore_index`` or ``where`` False) contribute 0 and do not count.

    Example:
      >>> import jax, jax.numpy as jnp, jaxloss
      >>> log_probs = jax.nn.log_softmax(jnp.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]]))
      >>> round(float(jaxloss.nll_loss(log_probs, jnp.array([0, 2]))), 4)
      0.1755
    """
    check_reduction(reduction)
    log_probs = as_float_array(log_probs, "log_probs")
    x = _class_axis_last(log_probs, axis, "log_probs")
    targets = _integer_targets(targets, x.shape[:-1], log_probs.shape)
    num_classes = x.shape[-1]
    dtype = compute_dtype(x.dtype)
    weight = check_class_weight(weight, num_classes)
    counted, in_range, safe_targets = _class_id_masks(targets, num_classes, ignore_index, where, validate)
    target_weight = jnp.ones(targets.shape, dtype) if weight is None else weight.astype(dtype)[safe_targets]
    picked = _take_class(x, safe_targets).astype(dtype)
    nan = jnp.full((), jnp.nan, dtype)
    zero = jnp.zeros((), dtype)
    loss = jnp.where(counted, jnp.where(in_range, -picked * target_weight, nan), zero)
    normalizer = jnp.where(counted, target_weight, zero)
    return reduce_loss(loss, normalizer, reduction, axis_name=axis_name)


def binary_cross_entropy_with_logits(
    logits: Array,
    targets: Array,
    *,
    weight: Array | None = None,
    pos_weight: Array | None = None,
    reduction: str = "mean",
    where: Array | None = None,
    axis_name: AxisName = None,
) -> Array | SumCount:
    r"""Binary cross-entropy on logits, as ``torch.nn.functional.binary_cross_entropy_with_logits``.

    With ``q = pos_weight`` (broadcast over the last axis) and ``sp(z) = log(1 + e^z)``:

    .. math:: l = w\,[\, q\, y\, \mathrm{sp}(-x) + (1-y)\, \mathrm{sp}(x) \,]

    computed stably as ``(1-y) x + (1 + (q-1) y) (log1p(e^{-|x|}) + max(-x, 0))``.
    ``"mean"`` divides by the number of counted elements (``weight`` does not normalize).

    Example:
      >>> import jax.numpy as jnp, jaxloss
      >>> x = jnp.array([[1.5, -0.5], [0.0, 2.0]])
      >>> y = jnp.array([[1.0, 0.0], [1.0, 1.0]])
      >>> round(float(jaxloss.binary_cross_entropy_with_logits(x, y)), 4)
      0.3739
    """
    check_reduction(reduction)
    logits = as_float_array(logits, "logits")
    targets = as_float_array(targets, "targets")
    check_same_shape(targets, logits, "targets", "logits")
    dtype = compute_dtype(logits.dtype)
    where = check_mask(where, logits.shape)
    counted = jnp.ones(logits.shape, jnp.bool_) if where is None else where
    zero = jnp.zeros((), dtype)
    x = jnp.where(counted, logits.astype(dtype), zero)
    y = jnp.where(counted, targets.astype(dtype), zero)
    softplus_neg = jnp.log1p(jnp.exp(-jnp.abs(x))) + jnp.maximum(-x, zero)
    if pos_weight is None:
        loss = (1 - y) * x + softplus_neg
    else:
        q = _broadcast_weight(pos_weight, logits.shape, "pos_weight").astype(dtype)
        loss = (1 - y) * x + (1 + (q - 1) * y) * softplus_neg
    if weight is not None:
        loss = loss * _broadcast_weight(weight, logits.shape, "weight").astype(dtype)
    loss = jnp.where(counted, loss, zero)
    return reduce_loss(loss, counted.astype(dtype), reduction, axis_name=axis_name)


def _broadcast_weight(weight: Array, shape: tuple[int, ...], name: str) -> Array:
    weight = as_float_array(weight, name)
    try:
        return jnp.broadcast_to(weight, shape)
    except ValueError:
        raise ValueError(f"{name} has shape {weight.shape}, which does not broadcast to logits of shape {shape}") from None
