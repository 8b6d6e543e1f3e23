"""The optimizer: AdamW with decoupled weight decay on matrices only, warmup then decay, clipping.

.. math::
    \\eta_t = \\eta \\cdot \\min(1, t / T_w) \\cdot d(t), \\qquad
    d \\in \\{ \\text{linear to 0 at } T, \\text{cosine to 0 at } T, 1 \\}

with ``T`` the run's horizon: its step budget, or the steps its wall-clock budget allows.

Weight decay applies to parameters with at least two dimensions (kernels and embeddings),
never to biases, norm scales or the loss-balancing log-variances.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax


def learning_rate_at(step: int, horizon: int, peak: float, warmup_steps: int | None, kind: str) -> float:
    """The learning rate of ``step`` in a run of ``horizon`` steps: linear warmup from 0 to
    ``peak`` over ``warmup_steps`` (default: 6% of the horizon), then ``kind`` decay
    (``linear`` or ``cosine`` to 0 at the horizon, or ``constant``).

    A run with a wall-clock budget re-estimates its horizon from its pace, so the schedule
    fits the steps the budget allows.

    Example:
      >>> [round(learning_rate_at(s, 100, 1.0, 10, "linear"), 3) for s in (0, 5, 10, 55, 100)]
      [0.0, 0.5, 1.0, 0.5, 0.0]
      >>> round(learning_rate_at(55, 100, 1.0, 10, "cosine"), 3), learning_rate_at(90, 100, 2.0, 10, "constant")
      (0.5, 2.0)
    """
    if kind not in ("linear", "cosine", "constant"):
        raise ValueError(f"schedule={kind!r} must be linear, cosine or constant")
    horizon = max(1, int(horizon))
    warmup = int(0.06 * horizon) if warmup_steps is None else max(0, min(int(warmup_steps), horizon))
    if step < warmup:
        return peak * step / warmup
    if kind == "constant":
        return peak
    progress = min(1.0, (step - warmup) / max(1, horizon - warmup))
    if kind == "linear":
        return peak * (1.0 - progress)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: those with at least 2 dimensions."""
    return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)


def make_optimizer(
    *,
    weight_decay: float,
    clip_norm: float,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """Gradient clipping by global norm (when ``clip_norm > 0``) followed by masked AdamW at
    unit learning rate: the training step scales its updates by the step's learning rate
    (:func:`learning_rate_at`), which equals AdamW with that schedule."""
    adamw = optax.adamw(1.0, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    if clip_norm and clip_norm > 0:
        return in_float32(optax.chain(optax.clip_by_global_norm(clip_norm), adamw))
    return in_float32(adamw)


def in_float32(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` computed in float32 whatever the parameters' dtype: its state (AdamW's
    moments) is float32, gradients and parameters are read as float32, and the updates come
    out float32 (``optax.apply_updates`` adds them in float32 and rounds the sum to the
    parameter's dtype once). With bfloat16 parameters, moments and updates in bfloat16 would
    lose every update smaller than a parameter's last bit; for float32 parameters nothing changes.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> opt = in_float32(optax.adam(1e-3))
      >>> state = opt.init({"w": jnp.ones(2, jnp.bfloat16)})
      >>> state[0].mu["w"].dtype
      dtype('float32')
    """
    def as_float32(tree: Any) -> Any:
        return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    def init(params: Any) -> Any:
        return inner.init(as_float32(params))

    def update(updates: Any, state: Any, params: Any = None, **extra: Any) -> tuple[Any, Any]:
        return inner.update(as_float32(updates), state, None if params is None else as_float32(params), **extra)

    return optax.GradientTransformationExtraArgs(init, update)
