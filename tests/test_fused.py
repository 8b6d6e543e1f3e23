"""linear_cross_entropy equals cross_entropy(hidden @ weight + bias) and torch's linear_cross_entropy."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxloss
from jaxloss.fused import linear_cross_entropy

torch = pytest.importorskip("torch")


def _inputs(n=29, d=12, v=70, seed=0, dtype=jnp.float32, lead=()):
    rng = np.random.default_rng(seed)
    h = rng.standard_normal(lead + (n, d)).astype(np.float32)
    w = (rng.standard_normal((d, v)) * 0.6).astype(np.float32)
    b = rng.standard_normal(v).astype(np.float32)
    t = rng.integers(0, v, size=lead + (n,))
    t.reshape(-1)[::7] = -100
    cw = rng.uniform(0.5, 2.0, v).astype(np.float32)
    where = rng.uniform(size=lead + (n,)) > 0.2
    return (jnp.asarray(h, dtype), jnp.asarray(w, dtype), jnp.asarray(b, dtype), jnp.asarray(t, jnp.int32),
            jnp.asarray(cw), jnp.asarray(where))


def _reference(h, w, b, t, *, reduction, class_weight=None, softcap=None, where=None, **options):
    z = jnp.matmul(h, w, preferred_element_type=jnp.float32)
    if b is not None:
        z = z + b.astype(jnp.float32)[(None,) * (z.ndim - 1)]
    if softcap is not None:
        z = softcap * jnp.tanh(z / softcap)
    return jaxloss.cross_entropy(z, t, weight=class_weight, reduction=reduction, where=where, **options)


def _scalarize(out):
    """A scalar whose gradient checks every per-token gradient separately (distinct weights)."""
    if isinstance(out, jaxloss.SumCount):
        return out.total * 1.5 + out.count
    if out.ndim == 0:
        return out
    return jnp.sum(out * jnp.linspace(0.5, 2.0, out.size).reshape(out.shape))


OPTIONS = [
    {},
    {"label_smoothing": 0.15},
    {"z_loss": 1e-2},
    {"softcap": 4.0},
    {"class_weight": True},
    {"class_weight": True, "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 6.0, "where": True},
]


CASES = [(o, "mean") for o in OPTIONS] + [(OPTIONS[-1], r) for r in ("sum", "none", "sum_count")] + [({}, "none")]


@pytest.mark.slow
@pytest.mark.parametrize("options,reduction", CASES, ids=lambda c: ("-".join(c) or "plain") if isinstance(c, dict) else c)
@pytest.mark.parametrize("low_memory", [False, True], ids=["fused", "low_memory"])
def test_equals_unfused(options, reduction, low_memory):
    h, w, b, t, cw, where = _inputs()
    kwargs = {k: v for k, v in options.items() if k not in ("class_weight", "where", "softcap")}
    cw_arg = cw if options.get("class_weight") else None
    where_arg = where if options.get("where") else None
    softcap = options.get("softcap")

    def ref(h, w, b):
        return _scalarize(_reference(h, w, b, t, reduction=reduction, class_weight=cw_arg, softcap=softcap,
                                     where=where_arg, **kwargs))

    def fused(h, w, b):
        out = linear_cross_entropy(h, w, t, bias=b, reduction=reduction, class_weight=cw_arg, logit_softcap=softcap,
                                   where=where_arg, low_memory=low_memory, token_chunk_size=8, vocab_chunk_size=16,
                                   **kwargs)
        return _scalarize(out)

    expected, expected_grads = jax.value_and_grad(ref, argnums=(0, 1, 2))(h, w, b)
    value, grads = jax.jit(jax.value_and_grad(fused, argnums=(0, 1, 2)))(h, w, b)
    np.testing.assert_allclose(value, expected, rtol=2e-6, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("n,v,token_chunk,vocab_chunk", [(1, 5, 4, 4), (33, 100, 32, 7), (10, 9, 100, 100)])
@pytest.mark.parametrize("low_memory", [False, True])
def test_chunk_sizes_and_vd_layout(n, v, token_chunk, vocab_chunk, low_memory):
    h, w, b, t, _, _ = _inputs(n=n, v=v, seed=n + v)

    def fused(h, w, b):
        return linear_cross_entropy(h, w, t, bias=b, weight_layout="vd", low_memory=low_memory,
                                    token_chunk_size=token_chunk, vocab_chunk_size=vocab_chunk)

    expected, expected_grads = jax.value_and_grad(lambda h, w, b: _reference(h, w, b, t, reduction="mean"),
                                                  argnums=(0, 1, 2))(h, w, b)
    value, (dh, dwt, db) = jax.jit(jax.value_and_grad(fused, argnums=(0, 1, 2)))(h, w.T, b)
    np.testing.assert_allclose(value, expected, rtol=2e-6)
    for got, want in zip((dh, dwt.T, db), expected_grads):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


def _torch_lce(h, w, b, t, cw, reduction, label_smoothing, chunked):
    f = torch.nn.functional
    options = torch.nn.LinearCrossEntropyOptions() if chunked else None
    th = torch.tensor(np.asarray(h), requires_grad=True)
    tw = torch.tensor(np.asarray(w).T.copy(), requires_grad=True)  # torch's (V, D)
    tb = torch.tensor(np.asarray(b), requires_grad=True)
    tt = torch.tensor(np.asarray(t), dtype=torch.long)
    tcw = None if cw is None else torch.tensor(np.asarray(cw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the chunked path warns when it falls back to the reference
        out = f.linear_cross_entropy(th, tw, tt, linear_bias=tb, weight=tcw, reduction=reduction,
                                     ignore_index=-100, label_smoothing=label_smoothing, options=options)
        weights = torch.linspace(0.5, 2.0, out.numel()).reshape(out.shape) if out.ndim else torch.tensor(1.0)
        (out * weights).sum().backward()
    return out.detach().numpy(), th.grad.numpy(), tw.grad.numpy().T, tb.grad.numpy()


@pytest.mark.slow
@pytest.mark.parametrize("chunked", [False, True], ids=["torch_reference", "torch_chunked"])
@pytest.mark.parametrize("reduction,low_memory", [("mean", False), ("sum", True), ("none", False), ("mean", True)])
@pytest.mark.parametrize("weighted,label_smoothing", [(False, 0.0), (True, 0.1)])
def test_matches_torch_linear_cross_entropy(chunked, reduction, weighted, label_smoothing, low_memory):
    h, w, b, t, cw, _ = _inputs(n=40, d=8, v=37, seed=3)
    cw_arg = cw if weighted else None
    want, want_dh, want_dw, want_db = _torch_lce(h, w, b, t, cw_arg, reduction, label_smoothing, chunked)

    def fused(h, w, b):
        return linear_cross_entropy(h, w, t, bias=b, class_weight=cw_arg, reduction=reduction,
                                    label_smoothing=label_smoothing, low_memory=low_memory, token_chunk_size=16,
                                    vocab_chunk_size=16)

    got = fused(h, w, b)
    grads = jax.grad(lambda *a: _scalarize(fused(*a)), argnums=(0, 1, 2))(h, w, b)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    for g, expected in zip(grads, (want_dh, want_dw, want_db)):
        np.testing.assert_allclose(g, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("low_memory", [False, True])
def test_bf16_at_least_as_accurate_as_unfused_bf16(low_memory):
    h, w, b, t, _, _ = _inputs(n=64, d=32, v=300, seed=5)
    h16, w16 = h.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    # float32 reference on the bf16-rounded inputs: only the computation's rounding differs.
    h32, w32 = h16.astype(jnp.float32), w16.astype(jnp.float32)
    ref_value, ref_grads = jax.value_and_grad(lambda h, w: _reference(h, w, None, t, reduction="mean"),
                                              argnums=(0, 1))(h32, w32)

    def unfused_bf16(h, w):
        return jaxloss.cross_entropy(jnp.matmul(h, w, preferred_element_type=jnp.float32).astype(h.dtype), t)

    # cross_entropy's bf16 path promotes bf16 with f32 implicitly, which strict mode refuses.
    with jax.numpy_dtype_promotion("standard"):
        naive_value, naive_grads = jax.value_and_grad(unfused_bf16, argnums=(0, 1))(h16, w16)
    value, grads = jax.jit(jax.value_and_grad(
        lambda h, w: linear_cross_entropy(h, w, t, low_memory=low_memory, token_chunk_size=16, vocab_chunk_size=64),
        argnums=(0, 1)))(h16, w16)
    assert grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.bfloat16 and value.dtype == jnp.float32
    assert abs(float(value - ref_value)) <= abs(float(naive_value - ref_value)) + 1e-6
    for got, naive, ref in zip(grads, naive_grads, ref_grads):
        err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - ref)))
        naive_err = float(jnp.max(jnp.abs(naive.astype(jnp.float32) - ref)))
        assert err <= naive_err * 1.01 + 1e-7, (err, naive_err)


@pytest.mark.parametrize("low_memory", [False, True])
def test_vmap_over_leading_axis_and_batch_dims(low_memory):
    h, w, b, t, _, _ = _inputs(n=9, v=23, lead=(3,))

    def one(h, t):
        return linear_cross_entropy(h, w, t, bias=b, low_memory=low_memory, token_chunk_size=4, vocab_chunk_size=8)

    got = jax.jit(jax.vmap(one))(h, t)
    want = jnp.stack([_reference(h[i], w, b, t[i], reduction="mean") for i in range(3)])
    np.testing.assert_allclose(got, want, rtol=2e-6)
    grad_got = jax.grad(lambda h: jnp.sum(jax.vmap(one)(h, t)))(h)
    grad_want = jax.grad(lambda h: sum(_reference(h[i], w, b, t[i], reduction="mean") for i in range(3)))(h)
    np.testing.assert_allclose(grad_got, grad_want, rtol=2e-5, atol=1e-6)
    # leading batch dims without vmap
    batched = linear_cross_entropy(h, w, t, bias=b, reduction="none", low_memory=low_memory, token_chunk_size=5)
    np.testing.assert_allclose(batched, _reference(h, w, b, t, reduction="none"), rtol=2e-6, atol=1e-6)


def test_skipped_rows_do_not_leak_nan_and_bad_targets_give_nan():
    h, w, b, t, _, _ = _inputs(n=12, v=20)
    h = h.at[0].set(jnp.nan)
    t = t.at[0].set(-100)
    for low_memory in (False, True):
        value, grads = jax.value_and_grad(
            lambda h, w: linear_cross_entropy(h, w, t, low_memory=low_memory, token_chunk_size=5), argnums=(0, 1))(h, w)
        assert np.isfinite(float(value)) and all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
        bad = linear_cross_entropy(h, w, t.at[3].set(20), low_memory=low_memory)
        assert np.isnan(float(bad))
    nothing = linear_cross_entropy(h, w, jnp.full_like(t, -100))
    assert np.isnan(float(nothing))  # PyTorch's mean over nothing
    pair = linear_cross_entropy(h, w, jnp.full_like(t, -100), reduction="sum_count")
    assert float(pair.mean()) == 0.0


@pytest.mark.parametrize("low_memory", [False, True])
@pytest.mark.parametrize("token_chunk", [4, 64], ids=["chunked", "one_chunk"])
def test_minus_inf_bias_masks_columns(low_memory, token_chunk):
    """A bias of -inf (padded vocabulary entries) gives finite values and gradients, equal to the
    unfused loss; a target at such a column gives inf, as in PyTorch."""
    h, w, b, t, _, _ = _inputs(n=13, v=24)
    padded = jnp.arange(24) >= 20
    b = jnp.where(padded, -jnp.inf, b)
    t = jnp.where(t >= 20, t - 4, t)
    options = dict(low_memory=low_memory, token_chunk_size=token_chunk, vocab_chunk_size=7)
    loss = lambda h, w, b: linear_cross_entropy(h, w, t, bias=b, **options)  # noqa: E731
    value, grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(h, w, b)
    ref_value, ref_grads = jax.value_and_grad(lambda h, w, b: _reference(h, w, b, t, reduction="mean"),
                                              argnums=(0, 1, 2))(h, w, b)
    assert np.isfinite(float(value)) and all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for g, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-6)
    assert float(grads[2][22]) == 0.0
    assert float(linear_cross_entropy(h, w, t.at[2].set(21), bias=b, **options)) == np.inf


def test_bad_input_errors_name_arguments():
    h, w, b, t, _, _ = _inputs(n=4, d=6, v=10)
    with pytest.raises(ValueError, match=r"hidden has shape \(4, 6\).*weight has shape \(10, 6\)"):
        linear_cross_entropy(h, w.T, t)
    with pytest.raises(ValueError, match="targets has shape"):
        linear_cross_entropy(h, w, t[:3])
    with pytest.raises(TypeError, match="targets must be integer"):
        linear_cross_entropy(h, w, t.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"bias must have shape \(10,\)"):
        linear_cross_entropy(h, w, t, bias=b[:5])
    with pytest.raises(ValueError, match="weight_layout"):
        linear_cross_entropy(h, w, t, weight_layout="kd")
    with pytest.raises(ValueError, match="logit_softcap"):
        linear_cross_entropy(h, w, t, logit_softcap=-1.0)
    with pytest.raises(ValueError, match="token_chunk_size"):
        linear_cross_entropy(h, w, t, token_chunk_size=0)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, t, reduction="avg")
    with pytest.raises(ValueError, match=r"targets\[1\] = 10"):
        linear_cross_entropy(h, w, t.at[1].set(10), validate=True)


def _mesh(n, name):
    if len(jax.devices()) < n:
        pytest.skip(f"needs {n} devices")
    return jax.make_mesh((n,), (name,), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n])


# Every simulated device (4 under tests/conftest.py); pass more with XLA_FLAGS to test 8.
DEVICE_COUNTS = [len(jax.devices())]


@pytest.mark.parametrize("num_devices", DEVICE_COUNTS)
@pytest.mark.parametrize("low_memory", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_vocabulary_parallel_shard_map_equals_one_device(num_devices, low_memory, reduction):
    h, w, b, t, cw, _ = _inputs(n=21, v=16 * num_devices, seed=7)
    mesh = _mesh(num_devices, "vocab")
    opts = dict(label_smoothing=0.1, z_loss=1e-3, reduction=reduction, low_memory=low_memory, token_chunk_size=8,
                vocab_chunk_size=6)

    def sharded(h, w, b, cw):
        return linear_cross_entropy(h, w, t, bias=b, class_weight=cw, vocab_axis_name="vocab", **opts)

    f = jax.shard_map(sharded, mesh=mesh, in_specs=(P(), P(None, "vocab"), P("vocab"), P("vocab")), out_specs=P())
    loss = lambda h, w, b: _scalarize(f(h, w, b, cw))  # noqa: E731
    one = lambda h, w, b: _scalarize(linear_cross_entropy(h, w, t, bias=b, class_weight=cw, **opts))  # noqa: E731
    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(h, w, b)
    want, want_grads = jax.value_and_grad(one, argnums=(0, 1, 2))(h, w, b)
    np.testing.assert_allclose(value, want, rtol=2e-6)
    for got, expected in zip(grads, want_grads):
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("num_devices", DEVICE_COUNTS)
@pytest.mark.parametrize("low_memory", [False, True])
def test_token_parallel_shard_map_equals_one_device(num_devices, low_memory):
    h, w, b, t, _, where = _inputs(n=8 * num_devices, v=30, seed=9)
    mesh = _mesh(num_devices, "data")

    def sharded(h, t, where, w, b):
        return linear_cross_entropy(h, w, t, bias=b, where=where, axis_name="data", low_memory=low_memory,
                                    token_chunk_size=3, vocab_chunk_size=8)

    f = jax.shard_map(sharded, mesh=mesh, in_specs=(P("data"), P("data"), P("data"), P(), P()), out_specs=P())
    value, grads = jax.jit(jax.value_and_grad(lambda h, w, b: f(h, t, where, w, b), argnums=(0, 1, 2)))(h, w, b)
    want, want_grads = jax.value_and_grad(
        lambda h, w, b: _reference(h, w, b, t, reduction="mean", where=where), argnums=(0, 1, 2))(h, w, b)
    np.testing.assert_allclose(value, want, rtol=2e-6)
    for got, expected in zip(grads, want_grads):
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("low_memory", [False, True])
def test_plain_jit_with_named_shardings_equals_one_device(low_memory):
    n = len(jax.devices())
    mesh = jax.make_mesh((n,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    h, w, b, t, _, _ = _inputs(n=4 * n, v=8 * n, seed=11)
    loss = lambda h, w, b: linear_cross_entropy(h, w, t, bias=b, low_memory=low_memory, token_chunk_size=4,  # noqa: E731
                                                vocab_chunk_size=8)
    want, want_grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(h, w, b)
    for h_spec, w_spec in ((P("x"), P()), (P(), P(None, "x"))):
        hs = jax.device_put(h, NamedSharding(mesh, h_spec))
        ws = jax.device_put(w, NamedSharding(mesh, w_spec))
        value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(hs, ws, b)
        np.testing.assert_allclose(value, want, rtol=2e-6)
        for got, expected in zip(grads, want_grads):
            np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-6)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's buffer assignment")
def test_compiled_memory_holds_no_extra_weight_sized_buffers():
    """Forward+backward temporaries (compiled, not run): only the float32 accumulators are large.

    The default strategy holds the float32 ``(D, V)`` weight-gradient accumulator plus a small
    tile; the recompute strategy holds the float32 ``(N, D)`` hidden-gradient accumulator
    plus slices, and writes the bf16 weight gradient straight into the output.
    """
    n, d, v = 2048, 512, 32768
    h = jax.ShapeDtypeStruct((n, d), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((d, v), jnp.bfloat16)
    t = jax.ShapeDtypeStruct((n,), jnp.int32)

    def temp_bytes(**options):
        loss = lambda h, w, t: linear_cross_entropy(h, w, t, token_chunk_size=32, vocab_chunk_size=1024,  # noqa: E731
                                                    **options)
        stats = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(h, w, t).compile().memory_analysis()
        assert stats.output_size_in_bytes >= 2 * (n * d + d * v)  # the bf16 gradients are outputs
        return stats.temp_size_in_bytes

    accumulator, weight = 4 * d * v, 2 * d * v
    assert temp_bytes() <= accumulator + weight // 4
    assert temp_bytes(low_memory=True) <= 4 * n * d + weight // 4


@pytest.mark.slow
@pytest.mark.skipif(len(jax.devices()) >= 8, reason="this process already has 8 devices: the tests above ran on them")
def test_sharded_tests_on_eight_devices():
    """The vocabulary-, token- and jit-sharded tests above, rerun on 8 simulated devices."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
         "-k", "shard_map_equals_one_device or named_shardings_equals_one_device"],
        env=env, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "8 passed" in proc.stdout, proc.stdout[-2000:]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's bf16 GEMM layouts")
@pytest.mark.parametrize("layout", ["dv", "vd"])
@pytest.mark.parametrize("low_memory", [False, True])
def test_bf16_products_stay_bf16(layout, low_memory):
    """Every product of forward + backward takes bf16 operands: none is converted to float32
    (a transposed operand that XLA:CPU cannot read natively would be, at twice the cost)."""
    import re

    n, d, v = 256, 128, 1024
    h = jax.ShapeDtypeStruct((n, d), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((d, v) if layout == "dv" else (v, d), jnp.bfloat16)
    t = jax.ShapeDtypeStruct((n,), jnp.int32)

    def loss(h, w, t):
        return linear_cross_entropy(h, w, t, weight_layout=layout, low_memory=low_memory, token_chunk_size=128,
                                    vocab_chunk_size=256)

    hlo = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(h, w, t).compile().as_text()
    operands = [re.findall(r"param_[\d.]+: (\w+)\[", c.strip().splitlines()[0]) for c in hlo.split("\n\n") if " dot(" in c]
    assert len(operands) >= 3
    assert all(o == ["bf16", "bf16"] for o in operands), operands
