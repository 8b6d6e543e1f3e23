"""Kullback-Leibler divergence with PyTorch's semantics (distillation, soft targets)."""

from __future__ import annotations

import jax.numpy as jnp
from jax import Array

from jaxloss._reduce import REDUCTIONS, AxisName, SumCount, check_mask, check_reduction, compute_dtype, reduce_loss
from jaxloss._validation import as_float_array, check_same_shape


def kl_div(
    input: Array,
    target: Array,
    *,
    reduction: str = "mean",
    log_target: bool = False,
    where: Array | None = None,
    axis_name: AxisName = None,
) -> Array | SumCount:
    r"""Pointwise KL divergence ``target * (log target - input)``, as ``torch.nn.functional.kl_div``.

    ``input`` holds log-probabilities. With ``log_target=True`` the target is given as
    log-probabilities too and ``l = e^t (t - x)``; otherwise ``l = t (log t - x)`` with
    ``0 log 0 = 0``. ``"mean"`` averages over every counted element (PyTorch's default,
    which is not the mathematical KL); ``"batchmean"`` divides the sum by ``input.shape[0]``,
    which is the KL divergence per sample when the class axis is last (with ``axis_name``,
    the sum and the batch size are both summed over devices; with ``where``, a sample whose
    elements are all masked does not count, so masking a sample equals dropping it).

    Example:
      >>> import jax, jax.numpy as jnp, jaxloss
      >>> log_q = jax.nn.log_softmax(jnp.array([[1.0, 2.0, 3.0]]))
      >>> p = jnp.array([[0.2, 0.3, 0.5]])
      >>> round(float(jaxloss.kl_div(log_q, p, reduction="batchmean")), 5)
      0.07795
    """
    check_reduction(reduction, REDUCTIONS + ("batchmean",))
    input = as_float_array(input, "input")
    target = as_float_array(target, "target")
    check_same_shape(target, input, "target", "input")
    dtype = compute_dtype(input.dtype)
    where = check_mask(where, input.shape)
    zero = jnp.zeros((), dtype)
    x = input.astype(dtype)
    t = target.astype(dtype)
    if where is not None:
        x = jnp.where(where, x, zero)
        t = jnp.where(where, t, zero)
    if log_target:
        losses = jnp.exp(t) * (t - x)
    else:
        safe_t = jnp.where(t > 0, t, jnp.ones((), dtype))
        losses = jnp.where(t > 0, t * (jnp.log(safe_t) - x), jnp.where(t == 0, zero, jnp.full((), jnp.nan, dtype)))
    counted = jnp.ones(input.shape, dtype) if where is None else where.astype(dtype)
    if where is not None:
        losses = jnp.where(where, losses, zero)
    if reduction == "batchmean":
        if input.ndim == 0:
            raise ValueError("reduction='batchmean' needs an input with a batch axis; got a scalar")
        if where is None:
            samples = jnp.ones(input.shape[:1], dtype)
        else:  # a sample counts when any of its elements does: masking a whole sample drops it
            samples = jnp.any(where, axis=tuple(range(1, input.ndim))).astype(dtype)
        pair = reduce_loss(losses, samples, "sum_count", axis_name=axis_name)
        return pair.total / pair.count
    return reduce_loss(losses, counted, reduction, axis_name=axis_name)
