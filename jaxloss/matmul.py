r"""Matrix products with float32 (or wider) accumulation, in the fast operand layout of XLA:CPU.

Shared by the fused linear cross-entropy (:mod:`jaxloss.fused`) and the models' products
(``train.models.matmul``). For 2-D operands

.. math::
    \mathrm{dot}(a, b, 0)_{ij} = \sum_k a_{ik} b_{kj}, \qquad \mathrm{dot}(a, b, 1)_{ij} = \sum_k a_{ik} b_{jk}

(``a b`` and ``a b^T``), accumulated in float32, or float64 when an operand is float64,
so 16-bit operands enter the product as they are and only the result is wide. XLA:CPU's GEMM is
fast when the left operand's contracting axis is its last and both operands are row-major;
:func:`transposed` makes the row-major transposed copy that a product like ``x^T g`` needs
to have that form.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array
from jax.experimental.layout import Layout, with_layout_constraint

__all__ = ["accumulation_dtype", "dot", "transposed", "wider_float"]


def wider_float(*dtypes: jnp.dtype) -> jnp.dtype:
    """The narrowest float dtype holding all ``dtypes`` exactly (bf16 with f16 gives f32).

    Written out because ``jnp.promote_types`` refuses bf16 with f32 under
    ``jax_numpy_dtype_promotion="strict"``.

    Example:
      >>> wider_float(jnp.bfloat16, jnp.float16), wider_float(jnp.bfloat16, jnp.bfloat16)
      (dtype('float32'), dtype(bfloat16))
    """
    dtypes = [jnp.dtype(d) for d in dtypes]
    if all(d == dtypes[0] for d in dtypes):
        return dtypes[0]
    return jnp.dtype(jnp.float64) if any(d.itemsize == 8 for d in dtypes) else jnp.dtype(jnp.float32)


def accumulation_dtype(*dtypes: jnp.dtype) -> jnp.dtype:
    """float32, or float64 when any input is float64.

    Example:
      >>> accumulation_dtype(jnp.bfloat16), accumulation_dtype(jnp.float32, jnp.float64)
      (dtype('float32'), dtype('float64'))
    """
    return wider_float(jnp.float32, *dtypes)


def dot(a: Array, b: Array, contract_b: int, out_like: Array | None = None) -> Array:
    r"""``a @ b`` (``contract_b=0``) or ``a @ b.T`` (``contract_b=1``), accumulated in float32 or wider.

    For ``a`` of shape ``(M, K)``: ``y_{ij} = \sum_k a_{ik} b_{kj}`` with ``b`` of shape
    ``(K, N)``, or ``y_{ij} = \sum_k a_{ik} b_{jk}`` with ``b`` of shape ``(N, K)``; ``y`` is
    ``(M, N)`` in :func:`accumulation_dtype` of the operands, which are not converted.

    ``out_like``: an array whose sharding the result takes (needed under explicit mesh axes
    when the contracted axes are sharded).

    Example:
      >>> a = jnp.ones((2, 3), jnp.bfloat16); b = jnp.ones((4, 3), jnp.bfloat16)
      >>> y = dot(a, b, 1)
      >>> y.shape, y.dtype, float(y[0, 0])
      ((2, 4), dtype('float32'), 3.0)
      >>> dot(a, b.T, 0).shape
      (2, 4)
    """
    acc = accumulation_dtype(a.dtype, b.dtype)
    sharding = None if out_like is None else jax.typeof(out_like).sharding
    return jax.lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())), preferred_element_type=acc,
                               out_sharding=sharding)


def transposed(x: Array) -> Array:
    """A transposed copy of a 2-D array, laid out row-major on CPU.

    Equal to ``x.T``. Without the layout constraint XLA folds the transpose back into the
    matmul that reads it, which would contract the left operand's first axis: the slow path
    of XLA:CPU (and for bf16 x bf16 -> f32, a conversion of both operands to float32). So
    ``x^T g`` is computed natively as ``dot(transposed(x), g, 0)``. Other platforms get a
    plain ``jnp.transpose``.

    Example:
      >>> x = jnp.arange(6.0, dtype=jnp.float32).reshape(2, 3)
      >>> transposed(x).tolist()
      [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]
      >>> g = jnp.ones((2, 5), jnp.float32)
      >>> dot(transposed(x), g, 0).shape
      (3, 5)
    """
    return jax.lax.platform_dependent(x, cpu=_row_major_transpose, default=jnp.transpose)


def _row_major_transpose(x: Array) -> Array:
    return with_layout_constraint(x.T, Layout(major_to_minor=(0, 1)))
