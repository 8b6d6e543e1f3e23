"""Regression losses with PyTorch's semantics: MSE, L1, smooth L1 and Huber.

Each takes ``(input, target, *, reduction="mean", where=None)`` with ``input`` and ``target``
of the same shape; ``"mean"`` divides by the number of counted elements.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
from jax import Array

from jaxloss._reduce import AxisName, SumCount, check_mask, check_reduction, compute_dtype, reduce_loss
from jaxloss._validation import as_float_array, check_nonnegative, check_same_shape


def _pointwise(
    input: Array,
    target: Array,
    loss_of_difference: Callable[[Array], Array],
    reduction: str,
    where: Array | None,
    axis_name: AxisName,
) -> Array | SumCount:
    check_reduction(reduction)
    input = as_float_array(input, "input")
    target = as_float_array(target, "target")
    check_same_shape(target, input, "target", "input")
    dtype = compute_dtype(input.dtype)
    where = check_mask(where, input.shape)
    zero = jnp.zeros((), dtype)
    difference = input.astype(dtype) - target.astype(dtype)
    if where is None:
        return reduce_loss(loss_of_difference(difference), jnp.ones(input.shape, dtype), reduction, axis_name=axis_name)
    difference = jnp.where(where, difference, zero)
    losses = jnp.where(where, loss_of_difference(difference), zero)
    return reduce_loss(losses, where.astype(dtype), reduction, axis_name=axis_name)


def mse_loss(
    input: Array,
    target: Array,
    *,
    reduction: str = "mean",
    where: Array | None = None,
    axis_name: AxisName = None,
) -> Array | SumCount:
    r"""Squared error ``l = (x - y)^2``, as ``torch.nn.functional.mse_loss``.

    Example:
      >>> import jax.numpy as jnp, jaxloss
      >>> float(jaxloss.mse_loss(jnp.array([1.0, 2.0, 4.0]), jnp.array([1.0, 0.0, 1.0])))
      4.333333492279053
    """
    return _pointwise(input, target, jnp.square, reduction, where, axis_name)


def l1_loss(
    input: Array,
    target: Array,
    *,
    reduction: str = "mean",
    where: Array | None = None,
    axis_name: AxisName = None,
) -> Array | SumCount:
    r"""Absolute error ``l = |x - y|``, as ``torch.nn.functional.l1_loss``.

    Example:
      >>> import jax.numpy as jnp, jaxloss
      >>> float(jaxloss.l1_loss(jnp.array([1.0, 2.0, 4.0]), jnp.array([1.0, 0.0, 1.0])))
      1.6666666269302368
    """
    return _pointwise(input, target, jnp.abs, reduction, where, axis_name)


def smooth_l1_loss(
    input: Array,
    target: Array,
    *,
    reduction: str = "mean",
    where: Array | None = None,
    beta: float = 1.0,
    axis_name: AxisName = None,
) -> Array | SumCount:
    r"""Smooth L1, as ``torch.nn.functional.smooth_l1_loss``.

    .. math:: l = 0.5\, d^2 / \beta \ \text{if}\ |d| < \beta \ \text{else}\ |d| - 0.5 \beta,
              \qquad d = x - y

    ``beta = 0`` is exactly the L1 loss.

    Example:
      >>> import jax.numpy as jnp, jaxloss
      >>> float(jaxloss.smooth_l1_loss(jnp.array([0.5, 3.0]), jnp.array([0.0, 0.0])))
      1.3125
    """
    check_nonnegative(beta, "beta")
    if float(beta) == 0.0:
        return _pointwise(input, target, jnp.abs, reduction, where, axis_name)

    def smooth_l1(d: Array) -> Array:
        a = jnp.abs(d)
        return jnp.where(a < beta, 0.5 * d * d / beta, a - 0.5 * beta)

    return _pointwise(input, target, smooth_l1, reduction, where, axis_name)


def huber_loss(
    input: Array,
    target: Array,
    *,
    reduction: str = "mean",
    where: Array | None = None,
    delta: float = 1.0,
    axis_name: AxisName = None,
) -> Array | SumCount:
    r"""Huber loss, as ``torch.nn.functional.huber_loss``.

    .. math:: l = 0.5\, d^2 \ \text{if}\ |d| < \delta \ \text{else}\ \delta (|d| - 0.5 \delta)

    Example:
      >>> import jax.numpy as jnp, jaxloss
      >>> float(jaxloss.huber_loss(jnp.array([0.5, 3.0]), jnp.array([0.0, 0.0]), delta=2.0))
      2.0625
    """
    check_nonnegative(delta, "delta")
    if not float(delta) > 0.0:
        raise ValueError(f"delta must be > 0, got {delta}")

    def huber(d: Array) -> Array:
        a = jnp.abs(d)
        return jnp.where(a < delta, 0.5 * d * d, delta * (a - 0.5 * delta))

    return _pointwise(input, target, huber, reduction, where, axis_name)
