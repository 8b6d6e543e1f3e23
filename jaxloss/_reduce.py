"""Reductions shared by every loss: ``none``, ``sum``, ``mean`` and the exact ``(sum, count)`` pair.

Every loss in :mod:`jaxloss` first computes a per-element loss ``l_i`` and a per-element
normalizer ``w_i`` (1 for a counted element, the target's class weight for a class-weighted
loss, 0 for a masked or ignored element), then reduces them here:

=============== ==========================================================
``"none"``      ``l_i`` (0 where masked or ignored)
``"sum"``       ``sum_i l_i``
``"mean"``      ``sum_i l_i / sum_i w_i`` (NaN when nothing is counted, as in PyTorch)
``"sum_count"`` ``SumCount(total=sum_i l_i, count=sum_i w_i)``
=============== ==========================================================

``SumCount`` pairs add exactly across micro-batches and devices, so the mean over a whole
batch split any way equals ``psum(total) / psum(count)``; averaging micro-batch means does
not (it weights a short micro-batch like a long one).
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
from jax import Array

Reduction = Literal["none", "sum", "mean", "sum_count"]
REDUCTIONS: tuple[str, ...] = ("none", "sum", "mean", "sum_count")
AxisName = Union[str, Sequence[str], None]


class SumCount(NamedTuple):
    """An unnormalized loss sum and the count (or total weight) it is normalized by.

    A pytree, so ``jax.lax.psum(pair, axis_name)`` and ``jax.tree.map(jnp.add, a, b)``
    combine pairs, and it passes through ``jit``, ``grad`` (``has_aux``) and ``scan``.

    Example:
      >>> import jax.numpy as jnp, jaxloss
      >>> logits = jnp.array([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
      >>> a = jaxloss.cross_entropy(logits[:1], jnp.array([0]), reduction="sum_count")
      >>> b = jaxloss.cross_entropy(logits[1:], jnp.array([1, 0]), reduction="sum_count")
      >>> whole = jaxloss.cross_entropy(logits, jnp.array([0, 1, 0]))
      >>> bool(jnp.allclose(jaxloss.combine(a, b).mean(), whole))
      True
    """

    total: Array
    count: Array

    def mean(self) -> Array:
        """``total / count``, or 0 with a zero gradient when ``count == 0``.

        Unlike ``reduction="mean"`` (which follows PyTorch and gives NaN when every element
        is ignored), an empty pair contributes nothing: a micro-batch or device with no
        counted token must not poison the step.
        """
        nonzero = self.count != 0
        safe_count = jnp.where(nonzero, self.count, jnp.ones_like(self.count))
        return jnp.where(nonzero, self.total / safe_count, jnp.zeros_like(self.total))

    def psum(self, axis_name: AxisName) -> "SumCount":
        """Sums both fields over a named mapped axis (``shard_map`` / ``pmap``)."""
        return SumCount(*jax.lax.psum((self.total, self.count), _axis_tuple(axis_name)))


def combine(*pairs: SumCount) -> SumCount:
    """Adds ``SumCount`` pairs field by field: the exact way to merge micro-batches."""
    if not pairs:
        raise ValueError("combine() needs at least one SumCount")
    return SumCount(
        total=sum((p.total for p in pairs[1:]), start=pairs[0].total),
        count=sum((p.count for p in pairs[1:]), start=pairs[0].count),
    )


def _axis_tuple(axis_name: AxisName) -> tuple[str, ...]:
    if axis_name is None:
        return ()
    if isinstance(axis_name, str):
        return (axis_name,)
    return tuple(axis_name)


def check_reduction(reduction: str, allowed: Sequence[str] = REDUCTIONS) -> None:
    """Raises ``ValueError`` naming the argument when ``reduction`` is not one of ``allowed``."""
    if reduction not in allowed:
        raise ValueError(
            f"reduction={reduction!r} is not supported; expected one of {', '.join(map(repr, allowed))}"
        )


def reduce_loss(
    losses: Array,
    normalizer: Array,
    reduction: str,
    *,
    axis_name: AxisName = None,
) -> Array | SumCount:
    """Reduces per-element ``losses`` (already 0 where not counted) with per-element ``normalizer``.

    Args:
      losses: per-element losses, 0 at masked or ignored elements.
      normalizer: per-element contribution to the mean's denominator, same shape.
      reduction: ``"none" | "sum" | "mean" | "sum_count"``.
      axis_name: a ``shard_map`` / ``pmap`` axis name (or several) to sum over before
        normalizing, so ``"mean"`` is the global mean over every device's elements.
    """
    check_reduction(reduction)
    if reduction == "none":
        return losses
    axes = _axis_tuple(axis_name)
    total = jnp.sum(losses)
    count = jnp.sum(normalizer)
    if axes:
        total, count = jax.lax.psum((total, count), axes)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / count
    return SumCount(total, count)


def compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """The float dtype a loss is computed and returned in: float32 for 16-bit inputs, else itself."""
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"expected a floating-point array, got dtype {dtype}")
    if dtype.itemsize < 4:
        return jnp.dtype(jnp.float32)
    return dtype


def check_mask(where: Array | None, shape: tuple[int, ...], name: str = "where") -> Array | None:
    """Validates a boolean element mask that must broadcast to ``shape``; returns it broadcast."""
    if where is None:
        return None
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_:
        raise TypeError(f"{name} must be a boolean mask, got dtype {where.dtype}")
    try:
        shape_out = jnp.broadcast_shapes(where.shape, shape)
    except ValueError:
        shape_out = None
    if shape_out != tuple(shape):
        raise ValueError(
            f"{name} has shape {where.shape}, which does not broadcast to the per-element loss shape {shape}"
        )
    return jnp.broadcast_to(where, shape)
