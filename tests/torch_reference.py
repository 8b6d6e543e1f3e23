"""Shared helpers for checking jaxloss against ``torch.nn.functional`` and float64 references.

A loss ``f(x, ...)`` is compared through the scalar ``sum(f(x) * g)`` with a fixed random
cotangent ``g`` of the output's shape: its value checks every output element and its
gradient with respect to ``x`` checks the vector-Jacobian product for that ``g``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch

import jaxloss

JAX_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64, "float16": jnp.float16}
TORCH_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "float16": torch.float16,
}

# (rtol, atol) for a value or gradient computed in float32 from the same inputs by two
# implementations (the 16-bit rows: jaxloss in float32 against torch in float32 on the
# 16-bit values; the gradient is rounded to 16 bits once more).
VALUE_TOL = {"float64": (1e-10, 1e-12), "float32": (2e-5, 2e-6), "bfloat16": (2e-5, 2e-6), "float16": (2e-5, 2e-6)}
GRAD_TOL = {"float64": (1e-10, 1e-12), "float32": (2e-5, 2e-6), "bfloat16": (1e-2, 1e-4), "float16": (2e-3, 1e-5)}


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` rounded to ``dtype`` and returned as float64 (the exact values both sides see)."""
    return np.asarray(jnp.asarray(x, JAX_DTYPES[dtype]).astype(jnp.float32), np.float64)


def to_jax(x: np.ndarray, dtype: str) -> jax.Array:
    return jnp.asarray(np.asarray(x, np.float64).astype(np.float32) if dtype != "float64" else x, JAX_DTYPES[dtype])


def to_torch(x: np.ndarray, dtype: str, requires_grad: bool = False) -> torch.Tensor:
    t = torch.tensor(np.asarray(x, np.float64), dtype=torch.float64).to(TORCH_DTYPES[dtype])
    return t.requires_grad_(requires_grad)


def cotangent_like(shape: tuple[int, ...], seed: int = 1) -> np.ndarray:
    """A fixed random cotangent with entries in [0.5, 1.5] (never 0, so no element is skipped)."""
    return np.random.default_rng(seed).uniform(0.5, 1.5, size=shape)


def jax_value_and_grad(
    fn: Callable[[jax.Array], Any], x: np.ndarray, dtype: str, *, seed: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """``fn(x)`` (array or ``SumCount.total``) and the gradient of ``sum(fn(x) * g)``, as float64."""

    def scalar(x_):
        out = fn(x_)
        if isinstance(out, jaxloss.SumCount):
            out = out.total
        g = jnp.asarray(cotangent_like(out.shape, seed), out.dtype)
        return jnp.sum(out * g), out

    (_, out), grad = jax.value_and_grad(scalar, has_aux=True)(to_jax(x, dtype))
    assert grad.dtype == JAX_DTYPES[dtype], (grad.dtype, dtype)
    if dtype != "float64":  # numpy has no bfloat16: widen exactly through float32
        out, grad = out.astype(jnp.float32), grad.astype(jnp.float32)
    return np.asarray(out, np.float64), np.asarray(grad, np.float64)


def torch_value_and_grad(
    fn: Callable[[torch.Tensor], torch.Tensor], x: np.ndarray, dtype: str, *, seed: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Same as :func:`jax_value_and_grad` for a torch function, with ``x`` cast to ``dtype``."""
    xt = to_torch(x, dtype, requires_grad=True)
    out = fn(xt)
    g = torch.tensor(cotangent_like(tuple(out.shape), seed), dtype=torch.float64)
    (out.double() * g).sum().backward()
    return out.detach().double().numpy(), xt.grad.detach().double().numpy()


def assert_close(actual: np.ndarray, expected: np.ndarray, tol: tuple[float, float], what: str = "") -> None:
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    rtol, atol = tol
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what, equal_nan=True)


def check_against_torch(
    jax_fn: Callable[[jax.Array], Any],
    torch_fn: Callable[[torch.Tensor], torch.Tensor],
    x: np.ndarray,
    dtype: str,
    *,
    what: str = "",
) -> None:
    """Values and gradients of ``jax_fn`` on ``x`` in ``dtype`` against ``torch_fn``.

    For 16-bit dtypes torch runs in float32 on the rounded 16-bit values: jaxloss promises
    float32 arithmetic on 16-bit inputs, so the two must agree to float32 rounding (the
    gradient, which jaxloss returns in the input's dtype, to one more 16-bit rounding).
    """
    torch_dtype = dtype if dtype in ("float32", "float64") else "float32"
    x_ref = round_to(x, dtype) if dtype != "float64" else x
    value, grad = jax_value_and_grad(jax_fn, x, dtype)
    ref_value, ref_grad = torch_value_and_grad(torch_fn, x_ref, torch_dtype)
    assert_close(value, ref_value, VALUE_TOL[dtype], f"{what} value")
    assert_close(grad, ref_grad, GRAD_TOL[dtype], f"{what} gradient")
