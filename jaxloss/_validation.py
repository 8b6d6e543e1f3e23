"""Argument checks that run at trace time and name the offending argument and shapes."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array


def as_float_array(x: Any, name: str) -> Array:
    """``jnp.asarray(x)``, raising ``TypeError`` naming ``name`` unless it is floating point."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype} with shape {x.shape}")
    return x


def canonical_axis(axis: int, ndim: int, shape: tuple[int, ...], name: str = "axis") -> int:
    """Returns ``axis`` as a non-negative index into an array of ``shape``, or raises ``ValueError``."""
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
        raise TypeError(f"{name} must be an int, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis} is out of range for logits of shape {shape} ({ndim} dimensions)")
    return int(axis) % ndim


def check_same_shape(a: Array, b: Array, name_a: str, name_b: str) -> None:
    """Raises ``ValueError`` unless ``a`` and ``b`` have exactly the same shape."""
    if a.shape != b.shape:
        raise ValueError(f"{name_a} has shape {a.shape} but {name_b} has shape {b.shape}; they must be equal")


def check_fraction(value: Any, name: str) -> None:
    """Raises ``ValueError`` when a concrete ``value`` lies outside [0, 1] (traced values pass)."""
    if isinstance(value, jax.core.Tracer):
        return
    v = float(np.asarray(value))
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {v}")


def check_nonnegative(value: Any, name: str) -> None:
    """Raises ``ValueError`` when a concrete ``value`` is negative (traced values pass)."""
    if isinstance(value, jax.core.Tracer):
        return
    v = float(np.asarray(value))
    if not v >= 0.0:
        raise ValueError(f"{name} must be >= 0, got {v}")


def check_class_weight(weight: Any, num_classes: int, name: str = "weight") -> Array | None:
    """Validates a per-class weight vector of shape ``(num_classes,)``."""
    if weight is None:
        return None
    weight = as_float_array(weight, name)
    if weight.shape != (num_classes,):
        raise ValueError(f"{name} must have shape ({num_classes},) (one per class), got {weight.shape}")
    return weight


def check_class_ids(
    targets: Array,
    num_classes: int,
    counted: Array,
    *,
    name: str = "targets",
) -> None:
    """Raises when a counted class id lies outside ``[0, num_classes)``.

    On concrete arrays this raises ``ValueError`` at once, naming the first bad position and
    value. Under a transformation (``jit``, ``grad``, ``vmap``, ``shard_map``,
    ``checkify``) the check runs on the device values through ``jax.debug.callback``: the
    call raises ``jax.errors.JaxRuntimeError`` whose message ends with the same
    ``ValueError``. That costs one host round trip per call, so ``validate=True`` is a
    debugging aid, off by default.
    """
    bad = counted & ((targets < 0) | (targets >= num_classes))
    if isinstance(bad, jax.core.Tracer) or isinstance(targets, jax.core.Tracer):
        flat_bad = bad.reshape(-1)
        flat_index = jnp.argmax(flat_bad)
        jax.debug.callback(
            _raise_for_bad_class_id,
            jnp.sum(flat_bad),
            flat_index,
            targets.reshape(-1)[flat_index],
            name=name,
            num_classes=num_classes,
        )
        return
    bad_np = np.asarray(bad)
    if bad_np.any():
        position = tuple(int(i) for i in np.argwhere(bad_np)[0])
        value = int(np.asarray(targets)[position])
        raise ValueError(
            f"{name}[{', '.join(map(str, position))}] = {value} is not a class id in [0, {num_classes}) "
            f"(and is not the ignore_index); {int(bad_np.sum())} such element(s) in total"
        )


def _raise_for_bad_class_id(count: Any, flat_index: Any, value: Any, *, name: str, num_classes: int) -> None:
    """Host side of the traced class-id check: raises ``ValueError`` when ``count > 0``.

    Under ``vmap`` the arguments arrive batched; the first batch element with a bad id is
    reported.
    """
    counts = np.asarray(count).reshape(-1)
    if not counts.any():
        return
    first = int(np.argmax(counts > 0))
    index = int(np.asarray(flat_index).reshape(-1)[first])
    bad_value = int(np.asarray(value).reshape(-1)[first])
    raise ValueError(
        f"{name} holds a class id outside [0, {num_classes}) at flat index {index}: {bad_value} "
        f"(and it is not the ignore_index); {int(counts.sum())} such element(s) in total"
    )
