"""The optimizer: AdamW with decoupled weight decay on matrices only, warmup then decay, clipping.

.. math::
    \\eta_t = \\eta \\cdot \\min(1, t / T_w) \\cdot d(t), \\qquad
    d \\in \\{ \\text{linear to 0}, \\text{cosine to 0}, 1 \\}

Weight decay applies to parameters with at least two dimensions (kernels and embeddings),
never to biases, norm scales or the loss-balancing log-variances.
"""

from __future__ import annotations

from typing import Any

import jax
import optax


def learning_rate_schedule(peak: float, total_steps: int, warmup_steps: int, kind: str) -> optax.Schedule:
    """Linear warmup from 0 to ``peak`` over ``warmup_steps``, then ``kind`` decay to 0 at ``total_steps``.

    Example:
      >>> s = learning_rate_schedule(1.0, 100, 10, "linear")
      >>> float(s(0)), float(s(10)), float(s(55)), float(s(100))
      (0.0, 1.0, 0.5, 0.0)
    """
    warmup_steps = max(0, min(warmup_steps, total_steps))
    decay_steps = max(1, total_steps - warmup_steps)
    if kind == "linear":
        decay = optax.linear_schedule(peak, 0.0, decay_steps)
    elif kind == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps)
    elif kind == "constant":
        decay = optax.constant_schedule(peak)
    else:
        raise ValueError(f"schedule={kind!r} must be linear, cosine or constant")
    if warmup_steps == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps), decay], [warmup_steps])


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: those with at least 2 dimensions."""
    return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)


def make_optimizer(
    *,
    learning_rate: optax.Schedule | float,
    weight_decay: float,
    clip_norm: float,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """Gradient clipping by global norm (when ``clip_norm > 0``) followed by masked AdamW."""
    adamw = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    if clip_norm and clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(clip_norm), adamw)
    return adamw
