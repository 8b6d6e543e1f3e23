r"""Matrix products of the models: 16-bit operands, float32 accumulation, every pass native.

A layer's product and its two gradients are three GEMMs:

.. math::
    y = x W, \qquad \frac{\partial L}{\partial x} = g W^\top, \qquad \frac{\partial L}{\partial W} = x^\top g

(or, for a tied embedding table ``E`` of shape ``(V, D)``: ``y = x E^T``, ``dx = g E``,
``dE = g^T x``). With bfloat16 operands XLA:CPU runs a product natively (the AVX512-BF16
instructions, about twice float32's rate) only when both operands are laid out row-major
and the left operand's contracting axis is its last. Reverse-mode autodiff of a bf16
product gives none of that: its cotangent is float32 (the product accumulated in float32),
and ``x^T g`` contracts the first axis of both operands, so XLA converts everything to
float32 and all backward products run at the float32 rate, after full-size conversions.

:func:`matmul` gives the low-precision products a custom VJP that forms each gradient in a
native form: the cotangent is rounded to the compute dtype once (as
``jax.lax.DotAlgorithmPreset.BF16_BF16_F32`` does), ``g W^T`` and ``g E`` contract a
row-major weight directly, and the one operand that must be transposed (``x`` or ``g``) is
copied into a row-major transposed buffer (on CPU through a layout constraint, since XLA
would otherwise fold a plain transpose back into the product). The products and the copy
are the fused loss's own (:func:`jaxloss.matmul.dot` and :func:`jaxloss.matmul.transposed`).
The copy reads ``M x K`` elements for a ``2 M K N``-flop product. float32 products keep
plain autodiff: XLA:CPU runs every float32 form at the same rate.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import Array

from jaxloss.matmul import dot, transposed

Dtype = jnp.dtype | type


def matmul(x: Array, w: Array, dtype: Dtype, *, transpose_w: bool = False) -> Array:
    """``x @ w`` (``w`` of shape ``(K, N)``) or ``x @ w.T`` (``transpose_w``, ``w`` of shape ``(N, K)``).

    Operands are cast to ``dtype``; the result is float32 (the accumulator), shape
    ``x.shape[:-1] + (N,)``. For a 16-bit ``dtype`` the backward pass forms ``dx`` and
    ``dw`` as native products (module docstring); values and gradients equal autodiff of
    ``jnp.matmul`` with ``preferred_element_type=float32`` up to that rounding of the cotangent.

    Example:
      >>> x = jnp.ones((2, 3, 4)); w = jnp.ones((4, 5))
      >>> matmul(x, w, jnp.bfloat16).shape, matmul(x, w.T, jnp.float32, transpose_w=True).dtype
      ((2, 3, 5), dtype('float32'))
    """
    k = w.shape[1] if transpose_w else w.shape[0]
    if w.ndim != 2 or x.shape[-1] != k:
        raise ValueError(f"matmul expects x (..., K) and w {'(N, K)' if transpose_w else '(K, N)'} with matching K; "
                         f"got x {x.shape}, w {w.shape}")
    x, w = x.astype(dtype), w.astype(dtype)
    lead_shape = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if jnp.dtype(dtype).itemsize >= 4:
        y = dot(x2, w, int(transpose_w))
    else:
        y = _low_precision_dot(int(transpose_w), x2, w)
    return y.reshape(lead_shape + (y.shape[-1],))


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _low_precision_dot(contract_w: int, x: Array, w: Array) -> Array:
    return dot(x, w, contract_w)


def _low_precision_dot_fwd(contract_w: int, x: Array, w: Array) -> tuple[Array, tuple[Array, Array]]:
    return dot(x, w, contract_w), (x, w)


def _low_precision_dot_bwd(contract_w: int, residuals: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    x, w = residuals
    g = g.astype(x.dtype)
    if contract_w == 0:  # y = x W: dx = g W^T, dW = x^T g
        dx = dot(g, w, 1, out_like=x)
        dw = dot(transposed(x), g, 0, out_like=w)
    else:  # y = x E^T: dx = g E, dE = g^T x
        dx = dot(g, w, 0, out_like=x)
        dw = dot(transposed(g), x, 0, out_like=w)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_low_precision_dot.defvjp(_low_precision_dot_fwd, _low_precision_dot_bwd)
