r"""Per-row softmax statistics with a one-pass gradient: the kernel under every cross-entropy.

For logits ``x`` of shape ``(..., C)``, :func:`softmax_statistics` returns per row

.. math::
    \mathrm{lse} = \log \sum_c e^{x_c}, \qquad
    \mathrm{picked} = x_{t}, \qquad
    \mathrm{dot} = \sum_c a_c\, x_c

for class ids ``t`` and coefficients ``a`` (class weights, or class probabilities times
weights), with ``0 * x = 0`` even where ``x = -inf``. Rows whose ``keep`` is False get a zero
gradient whatever their logits hold (NaN or inf included); their statistics are
meaningless and callers must mask them out of the loss with ``jnp.where``.

Its derivative is defined once, in forward mode (``jax.custom_jvp``):

.. math::
    d\,\mathrm{lse} = \sum_c \mathrm{softmax}(x)_c\, dx_c, \quad
    d\,\mathrm{picked} = dx_t, \quad
    d\,\mathrm{dot} = \sum_c a_c\, dx_c + x_c\, da_c

JAX transposes it for reverse mode into one element-wise expression,
``softmax(x) g_lse + [c = t] g_picked + a g_dot``, which XLA fuses into a single pass that
writes the logits' gradient, in the logits' dtype, without materializing a float32 copy, the
softmax or a one-hot matrix. Automatic differentiation of the plain formula instead keeps
the softmax and a scattered one-hot as separate full-size buffers (five passes instead of
one on XLA:CPU).

The derivative reuses the forward's ``e = exp(x - max)``, computed once in an element-wise
loop, and the softmax is ``e / sum(e)``: ``exp`` then runs once per logit on all cores, where
inside a reduction XLA:CPU runs it on one, and the gradient overwrites ``e`` in place. For
float32 (and float64) logits ``e`` lives in the gradient's own buffer.

For 16-bit logits ``e`` is a float32 buffer twice their size, so only CPU shares it
(``jax.lax.platform_dependent``): XLA:CPU writes a float32 copy of 16-bit logits for
``sum(exp(x))`` anyway (``memory_analysis()``: 2004 MiB of temporaries at 4096 x 128256 bf16
either way), so there sharing costs no memory and saves one ``exp`` per logit
(``value_and_grad`` 569 -> 373 ms, with huge pages). Other platforms fuse the conversion
into their reductions and recompute ``exp(x - lse)`` in the gradient pass instead.

On CPU a ``dot`` over bf16 logits with unit coefficients (label smoothing without class
weights) is a product with a column of ones, which reads the bf16 logits where a sum would
make XLA:CPU keep a float32 copy of them (``value_and_grad`` with label smoothing 1274 ->
485 ms at 4096 x 128256 bf16, and one float32 buffer instead of two). With class weights
it is a matrix-vector product with the weights (zero-weight classes dropped first), for
float32 logits too: no float32 copy and no weights broadcast to the logits' shape (at
8192 x 4096 with label smoothing: float32 0 float32 copies instead of 1, bf16 1 instead of
2; 874 -> 442 ms at 4096 x 128256 bf16). Probability targets keep two float32 arrays with
or without a shared ``e``, so CPU shares it there too (497 -> 324 ms at 8192 x 32000 bf16).
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp
from jax import Array
from jax.custom_derivatives import SymbolicZero

from jaxloss._reduce import compute_dtype


#: How :func:`softmax_statistics` forms ``dot``.
DotKind = Literal["none", "sum", "weighted"]


def _f32(x: Array) -> Array:
    """``x`` in at least float32 (16-bit floats widen; float32 and float64 stay)."""
    return x.astype(compute_dtype(x.dtype))


def _kept(x: Array, keep: Array) -> Array:
    """``x`` in its compute dtype, with dropped rows set to 0."""
    x = _f32(x)
    return jnp.where(keep[..., None], x, jnp.zeros((), x.dtype))


#: Rows longer than this are summed in equal pieces (see :func:`_row_pieces`).
MAX_ROW = 32768


def _row_pieces(num_classes: int) -> int:
    """How many equal, contiguous pieces to cut a row of ``num_classes`` into for ``sum(exp)``.

    XLA:CPU sums ``exp`` over rows of 128k classes about 5x slower than over four times as
    many rows of 32k (measured: 1.43 s vs 0.26 s at 4096 x 128256, float32), so long rows are
    reshaped (a free bitcast) into the smallest number of equal pieces of at most
    ``MAX_ROW``; 1 when no divisor up to 64 gives such pieces.
    """
    if num_classes <= MAX_ROW:
        return 1
    for pieces in range(-(-num_classes // MAX_ROW), 65):
        if num_classes % pieces == 0:
            return pieces
    return 1


def _row_peak(logits: Array) -> Array:
    """The maximum of each row in the compute dtype; 0 where it is not finite."""
    # The maximum is exact in any precision: taking it before the cast lets XLA read 16-bit
    # logits twice instead of materializing a float32 copy.
    peak = _f32(jnp.max(logits, axis=-1))
    return jnp.where(jnp.isfinite(peak), peak, jnp.zeros((), peak.dtype))


def _logsumexp(logits: Array) -> Array:
    peak = _row_peak(logits)
    pieces = _row_pieces(logits.shape[-1])
    if pieces == 1:
        return jnp.log(jnp.sum(jnp.exp(_f32(logits) - peak[..., None]), axis=-1)) + peak
    # a plain 2-D (rows, classes) reduction: XLA:CPU's fast path needs that shape, with the
    # reshape before the exp (reshaping exp's result instead runs 1.4x-2.4x slower at 128k)
    rows = logits.reshape(-1, logits.shape[-1] // pieces)
    row_peak = jnp.repeat(peak.reshape(-1), pieces)[:, None]
    piece_sums = jnp.sum(jnp.exp(_f32(rows) - row_peak), axis=-1)
    return jnp.log(jnp.sum(piece_sums.reshape(*peak.shape, pieces), axis=-1)) + peak


def _shifted_exp(logits: Array) -> tuple[Array, Array, Array]:
    """``(peak, e, s)``: the row maximum, ``e = exp(x - peak)`` and ``s = sum(e)``, all in
    the compute dtype. ``e`` is an element-wise loop (all cores) that the gradient reuses, so
    ``exp`` runs once per logit; its sum is taken in 2-D pieces like :func:`_logsumexp`'s."""
    peak = _row_peak(logits)
    e = jnp.exp(_f32(logits) - peak[..., None])
    pieces = _row_pieces(logits.shape[-1])
    if pieces == 1:
        return peak, e, jnp.sum(e, axis=-1)
    piece_sums = jnp.sum(e.reshape(-1, logits.shape[-1] // pieces), axis=-1)
    return peak, e, jnp.sum(piece_sums.reshape(*peak.shape, pieces), axis=-1)


def _pick(x: Array, targets: Array) -> Array:
    return jnp.take_along_axis(x, targets[..., None], axis=-1, mode="clip")[..., 0]


def _safe_product(a: Array, x: Array) -> Array:
    """``a * x`` with ``0 * anything = 0`` (so ``0 * -inf`` is 0, not NaN)."""
    return jnp.where(a == 0, jnp.zeros((), x.dtype), a * x)


def _plain_sum(logits: Array) -> Array:
    return jnp.sum(_f32(logits), axis=-1)


def _sum_by_product(logits: Array) -> Array:
    ones = jnp.ones((logits.shape[-1], 1), logits.dtype)
    column = jax.lax.dot_general(logits, ones, (((logits.ndim - 1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
    return column[..., 0]


def _dot(logits: Array, coefficients: Array, dot_kind: DotKind) -> Array:
    """``sum_c a_c x_c`` per row, with ``0 * x = 0``; ``sum_c x_c`` when ``dot_kind == "sum"``."""
    if dot_kind == "sum" and logits.dtype == jnp.bfloat16:
        # on CPU a product with a column of ones, exact (f32 accumulation) and reading the
        # bf16 logits in place, where XLA:CPU's sum would keep a float32 copy of them
        return jax.lax.platform_dependent(logits, cpu=_sum_by_product, default=_plain_sum)
    if dot_kind == "sum":
        return _plain_sum(logits)
    if coefficients.ndim == 1:
        return jax.lax.platform_dependent(logits, coefficients, cpu=_weighted_sum_by_product, default=_weighted_sum)
    return _weighted_sum(logits, coefficients)


def _weighted_sum(logits: Array, coefficients: Array) -> Array:
    """``sum_c a_c x_c`` with ``0 * x = 0``, for any coefficients broadcastable to the logits."""
    return jnp.sum(_safe_product(jnp.broadcast_to(_f32(coefficients), logits.shape), _f32(logits)), axis=-1)


def _weighted_sum_by_product(logits: Array, coefficients: Array) -> Array:
    """:func:`_weighted_sum` for class weights ``(C,)`` as a matrix-vector product, with the
    logits of zero-weight classes set to 0 first: XLA:CPU then reads the logits once and
    keeps neither a float32 copy of them nor the weights broadcast to their shape."""
    a = _f32(coefficients)
    x = jnp.where(jnp.broadcast_to(a == 0, logits.shape), jnp.zeros((), a.dtype), _f32(logits))
    return jax.lax.dot_general(x, a, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=a.dtype)


def _class_mask(x: Array, targets: Array) -> Array:
    classes = jax.lax.broadcasted_iota(targets.dtype, x.shape, x.ndim - 1)
    return classes == targets[..., None]


@partial(jax.custom_jvp, nondiff_argnums=(4,))
def softmax_statistics(
    logits: Array,
    targets: Array,
    keep: Array,
    coefficients: Array,
    dot_kind: DotKind,
) -> tuple[Array, Array, Array]:
    """``(lse, picked, dot)`` per row of ``logits`` (see the module docstring).

    Args:
      logits: ``(..., C)`` floats of any precision; computed in at least float32.
      targets: ``(...)`` class ids in ``[0, C)`` (callers clamp invalid ones).
      keep: ``(...)`` booleans; False rows get a zero gradient.
      coefficients: ``a``, broadcastable to ``logits`` (``(C,)`` or ``(..., C)``), float.
      dot_kind: ``"none"`` (``dot`` is 0), ``"sum"`` (the caller promises ``a = 1``
        everywhere: ``dot = sum_c x_c``) or ``"weighted"``.

    Example:
      >>> import jax.numpy as jnp
      >>> lse, picked, dot = softmax_statistics(
      ...     jnp.array([[0.0, 0.0]]), jnp.array([1]), jnp.array([True]), jnp.ones(2), "sum")
      >>> round(float(lse[0]), 4), float(picked[0]), float(dot[0])
      (0.6931, 0.0, 0.0)
    """
    lse = _logsumexp(logits)
    picked = _f32(_pick(logits, targets))  # gathered before the cast: no float32 copy
    dot = _dot(logits, coefficients, dot_kind) if dot_kind != "none" else jnp.zeros_like(lse)
    return lse, picked, dot


def _cpu_can_share_exp(logits: Array, dot_kind: DotKind) -> bool:
    """Whether XLA:CPU can share a float32 ``e`` for 16-bit ``logits`` at no memory cost.

    XLA:CPU keeps a float32 copy of 16-bit logits for ``sum(exp(x))`` anyway, and ``e``
    takes its place; other platforms would need a new buffer. The dots of :func:`_dot` read
    the logits without a copy of their own, except a plain sum of float16 logits.
    """
    return dot_kind != "sum" or logits.dtype == jnp.bfloat16


def _shared_softmax(logits: Array, lse: Array) -> tuple[Array, Array]:
    """``(lse, softmax)`` from a shared ``e = exp(x - peak)``: ``exp`` once per logit, and the
    gradient's element-wise loop can overwrite ``e`` in place (``lse`` is recomputed from
    ``e``'s sum, the same value)."""
    del lse
    peak, e, total = _shifted_exp(logits)
    return jnp.log(total) + peak, e * jnp.where(total > 0, 1 / total, jnp.zeros((), total.dtype))[..., None]


def _recomputed_softmax(logits: Array, lse: Array) -> tuple[Array, Array]:
    """``(lse, exp(x - lse))``: XLA fuses the ``exp`` into the gradient's pass."""
    return lse, jnp.exp(_f32(logits) - lse[..., None])


def _softmax_statistics_jvp(
    dot_kind: DotKind,
    primals: tuple[Array, Array, Array, Array],
    tangents: tuple[Array, Array, Array, Array],
) -> tuple[tuple[Array, Array, Array], tuple[Array, Array, Array]]:
    logits, targets, keep, coefficients = primals
    d_logits, _, _, d_coefficients = tangents
    x = _f32(logits)
    zero = jnp.zeros((), x.dtype)
    with_dot = dot_kind != "none"
    lse, picked, dot = softmax_statistics(logits, targets, keep, coefficients, dot_kind)
    if isinstance(d_logits, SymbolicZero):
        d_lse = d_picked = d_dot = jnp.zeros_like(lse)
    else:
        if logits.dtype == x.dtype:
            lse, softmax = _shared_softmax(logits, lse)
        elif _cpu_can_share_exp(logits, dot_kind):
            lse, softmax = jax.lax.platform_dependent(logits, lse, cpu=_shared_softmax, default=_recomputed_softmax)
        else:
            lse, softmax = _recomputed_softmax(logits, lse)
        dx = _kept(d_logits, keep)
        d_lse = jnp.sum(softmax * dx, axis=-1)
        d_picked = jnp.sum(jnp.where(_class_mask(x, targets), dx, zero), axis=-1)
        d_dot = jnp.zeros_like(lse)
        if with_dot:
            a = jnp.broadcast_to(_f32(coefficients), x.shape)
            d_dot = jnp.sum(_safe_product(a, dx), axis=-1)
    if with_dot and not isinstance(d_coefficients, SymbolicZero):
        da = jnp.where(keep[..., None], jnp.broadcast_to(_f32(d_coefficients), x.shape), zero)
        d_dot = d_dot + jnp.sum(jnp.where(jnp.isfinite(x), x, zero) * da, axis=-1)
    return (lse, picked, dot), (d_lse, d_picked, d_dot)


softmax_statistics.defjvp(_softmax_statistics_jvp, symbolic_zeros=True)
