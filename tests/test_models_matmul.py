"""The models' matrix product (``train.models.matmul``): values and gradients against float64
numpy, its bfloat16 backward pass compiled to native bf16 x bf16 products on CPU, and its use
under vmap and sharding."""

from __future__ import annotations

import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jaxloss.matmul import transposed
from train.models.matmul import matmul

K, N = 24, 40


def _bf16_round(a) -> np.ndarray:
    """float64 values of ``a`` rounded to bfloat16."""
    return np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


def _inputs(transpose_w: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, 5, K)).astype(np.float32)
    w = (rng.standard_normal((N, K) if transpose_w else (K, N)) / np.sqrt(K)).astype(np.float32)
    ct = rng.standard_normal((3, 5, N)).astype(np.float32)  # upstream cotangent
    return x, w, ct


def _reference(x, w, ct, transpose_w: bool, dtype):
    """float64 ``(y, dx, dw)`` of ``sum(ct * (x @ w))``, inputs (and for bf16 the cotangent) rounded to ``dtype``."""
    rnd = _bf16_round if dtype == jnp.bfloat16 else (lambda a: np.asarray(a, np.float64))
    x64, w64, ct64 = rnd(x).reshape(-1, K), rnd(w), rnd(ct).reshape(-1, N)
    wk = w64.T if transpose_w else w64  # (K, N)
    y = x64 @ wk
    dx = ct64 @ wk.T
    dwk = x64.T @ ct64
    return y.reshape(ct.shape), dx.reshape(x.shape), dwk.T if transpose_w else dwk


@pytest.mark.parametrize("transpose_w", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_values_and_gradients_match_float64(transpose_w, dtype):
    x, w, ct = _inputs(transpose_w)

    def loss(x, w):
        return jnp.sum(jnp.asarray(ct) * matmul(x, w, dtype, transpose_w=transpose_w))

    y = matmul(jnp.asarray(x), jnp.asarray(w), dtype, transpose_w=transpose_w)
    dx, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(x), jnp.asarray(w))
    y_ref, dx_ref, dw_ref = _reference(x, w, ct, transpose_w, dtype)
    assert y.dtype == jnp.float32 and y.shape == (3, 5, N)
    assert dx.dtype == jnp.float32 and dw.dtype == jnp.float32  # gradients in the inputs' dtype
    # float32 accumulation of exactly rounded products; bf16 gradients are rounded once more (to bf16).
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx), dx_ref, **tol)
    np.testing.assert_allclose(np.asarray(dw), dw_ref, **tol)


@pytest.mark.parametrize("transpose_w", [False, True])
def test_bfloat16_gradients_agree_with_autodiff_of_jnp_matmul(transpose_w):
    """The custom backward pass equals autodiff of the plain product up to bf16 rounding."""
    x, w, ct = _inputs(transpose_w, seed=1)

    def ours(x, w):
        return jnp.sum(jnp.asarray(ct) * matmul(x, w, jnp.bfloat16, transpose_w=transpose_w))

    def plain(x, w):
        wb = w.astype(jnp.bfloat16)
        y = jnp.matmul(x.astype(jnp.bfloat16), wb.T if transpose_w else wb, preferred_element_type=jnp.float32)
        return jnp.sum(jnp.asarray(ct) * y)

    args = (jnp.asarray(x), jnp.asarray(w))
    for got, want in zip(jax.grad(ours, argnums=(0, 1))(*args), jax.grad(plain, argnums=(0, 1))(*args)):
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-2 * scale)


def _dot_operand_dtypes(hlo: str) -> list[list[str]]:
    """The operand dtypes of every ``dot`` in compiled HLO text (each dot sits in its own fused computation)."""
    found = []
    for computation in hlo.split("\n\n"):
        if " dot(" in computation:
            header = computation.strip().splitlines()[0]
            found.append(re.findall(r"param_[\d.]+: (\w+)\[", header))
    return found


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's bf16 GEMM layouts")
@pytest.mark.parametrize("transpose_w", [False, True])
def test_bfloat16_backward_compiles_to_native_bf16_products(transpose_w):
    """All three products (forward, dx, dw) take bf16 operands: none is converted to float32.

    Autodiff of ``jnp.matmul`` does not manage it: its float32 cotangent and its ``x^T g``
    (contracting both operands' first axes) make XLA:CPU convert the backward operands to
    float32, which this test checks as well, so that it keeps meaning something.
    """
    x = jnp.ones((64, 128, 256), jnp.float32)
    w = jnp.ones((512, 256) if transpose_w else (256, 512), jnp.float32)

    def ours(x, w):
        return jnp.sum(jnp.sin(matmul(x, w, jnp.bfloat16, transpose_w=transpose_w)))

    def plain(x, w):
        wb = w.astype(jnp.bfloat16)
        y = jnp.matmul(x.astype(jnp.bfloat16), wb.T if transpose_w else wb, preferred_element_type=jnp.float32)
        return jnp.sum(jnp.sin(y))

    def dots(f):
        return _dot_operand_dtypes(jax.jit(jax.grad(f, argnums=(0, 1))).lower(x, w).compile().as_text())

    assert dots(ours) == [["bf16", "bf16"]] * 3
    assert ["f32", "f32"] in dots(plain)


def test_transposed_copy_is_the_transpose():
    a = jnp.arange(12.0, dtype=jnp.float32).reshape(3, 4)
    np.testing.assert_array_equal(np.asarray(jax.jit(transposed)(a)), np.asarray(a).T)
    np.testing.assert_array_equal(np.asarray(transposed(a.astype(jnp.bfloat16)), np.float32), np.asarray(a).T)


def test_vmap_matches_loop():
    x, w, _ = _inputs(False)
    xs = jnp.stack([jnp.asarray(x), 2 * jnp.asarray(x)])

    def f(x):
        return jax.grad(lambda x, w: jnp.sum(jnp.square(matmul(x, w, jnp.bfloat16))), argnums=(0, 1))(x, jnp.asarray(w))

    batched = jax.vmap(f)(xs)
    for i in range(2):
        for got, want in zip(jax.tree.leaves(batched), jax.tree.leaves(f(xs[i]))):
            np.testing.assert_array_equal(np.asarray(got[i]), np.asarray(want))


@pytest.mark.parametrize("transpose_w", [False, True])
@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_sharded_over_devices_equals_one_device(axis_type, transpose_w):
    """Rows sharded over one mesh axis and the weight's output features over another, as the
    training system shards a batch (data) and a kernel (tensor); with explicit mesh axes the
    gradients take their inputs' shardings."""
    mesh = jax.make_mesh((2, 2), ("data", "tensor"), axis_types=(axis_type,) * 2, devices=jax.devices()[:4])
    x, w, ct = _inputs(transpose_w, seed=2)
    x = np.concatenate([x, x[:1]])  # 4 rows of (5, K)
    ct = np.concatenate([ct, ct[:1]])

    def loss(x, w):
        return jnp.sum(jnp.asarray(ct) * matmul(x, w, jnp.bfloat16, transpose_w=transpose_w))

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    want = step(jnp.asarray(x), jnp.asarray(w))
    w_spec = P("tensor") if transpose_w else P(None, "tensor")
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P("data")))
        ws = jax.device_put(w, NamedSharding(mesh, w_spec))
        got = step(xs, ws)
    # The loss sums per-device partial sums in another order: float32 rounding.
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=5e-5, atol=1e-6)
    if axis_type == AxisType.Explicit:
        _, (dx, dw) = got
        assert dx.sharding.is_equivalent_to(xs.sharding, dx.ndim)
        assert dw.sharding.is_equivalent_to(ws.sharding, dw.ndim)


def test_mismatched_shapes_name_both():
    with pytest.raises(ValueError, match=r"x \(3, 5\).*w \(4, 2\)"):
        matmul(jnp.ones((3, 5)), jnp.ones((4, 2)), jnp.float32)
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        matmul(jnp.ones((3, 5)), jnp.ones((5, 2)), jnp.float32, transpose_w=True)
