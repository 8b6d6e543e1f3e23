"""Every loss under jit, vmap, grad, jvp and shard_map (4 simulated CPU devices)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import jaxloss

RNG = np.random.default_rng(0)
LOGITS = RNG.normal(size=(8, 6)) * 2.0
TARGETS = RNG.integers(0, 6, size=8)
TARGETS[3] = -100
PROBS = RNG.dirichlet(np.ones(6), size=8)
MASK = RNG.random((8, 6)) < 0.7
ROW_MASK = np.array([True, True, False, True, True, True, False, True])
SEQ_LOGITS = RNG.normal(size=(2, 5, 6))
SEQ_IDS = RNG.integers(0, 6, size=(2, 5))
ATTENTION = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
Y = RNG.normal(size=(8, 6))


def _cases(dtype):
    """name -> (function of one float array, the point to evaluate at)."""
    f = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    t = jnp.asarray(TARGETS)
    return {
        "cross_entropy": (lambda x: jaxloss.cross_entropy(x, t, weight=f(np.linspace(0.5, 2, 6)), label_smoothing=0.1), f(LOGITS)),
        "cross_entropy_probs": (lambda x: jaxloss.cross_entropy(x, f(PROBS), where=jnp.asarray(ROW_MASK), z_loss=1e-3), f(LOGITS)),
        "nll_loss": (lambda x: jaxloss.nll_loss(jax.nn.log_softmax(x), t, reduction="sum"), f(LOGITS)),
        "bce": (lambda x: jaxloss.binary_cross_entropy_with_logits(x, f(PROBS), pos_weight=f(np.full(6, 2.0)), where=jnp.asarray(MASK)), f(LOGITS)),
        "mse": (lambda x: jaxloss.mse_loss(x, f(Y), where=jnp.asarray(MASK)), f(LOGITS)),
        "l1": (lambda x: jaxloss.l1_loss(x, f(Y)), f(LOGITS)),
        "smooth_l1": (lambda x: jaxloss.smooth_l1_loss(x, f(Y), beta=0.7), f(LOGITS)),
        "huber": (lambda x: jaxloss.huber_loss(x, f(Y), delta=1.3), f(LOGITS)),
        "kl_div": (lambda x: jaxloss.kl_div(jax.nn.log_softmax(x), f(PROBS), reduction="batchmean"), f(LOGITS)),
        "sequence_log_likelihood": (lambda x: jnp.sum(jaxloss.sequence_log_likelihood(x, jnp.asarray(SEQ_IDS))), f(SEQ_LOGITS)),
        "sequence_nll_loss": (lambda x: jaxloss.sequence_nll_loss(x, jnp.asarray(SEQ_IDS), normalize="sequence"), f(SEQ_LOGITS)),
        "causal_lm_loss": (lambda x: jaxloss.causal_lm_loss(x, jnp.asarray(SEQ_IDS), attention_mask=jnp.asarray(ATTENTION)), f(SEQ_LOGITS)),
        "perplexity": (lambda x: jaxloss.perplexity(x, jnp.asarray(SEQ_IDS)), f(SEQ_LOGITS)),
    }


CASE_NAMES = list(_cases(jnp.float32))


@pytest.mark.parametrize("name", ["cross_entropy", "cross_entropy_probs", "nll_loss", "bce", "huber", "kl_div"])
def test_jit_equals_eager(name):
    fn, x = _cases(jnp.float32)[name]
    eager_value, eager_grad = jax.value_and_grad(fn)(x)
    jit_value, jit_grad = jax.jit(jax.value_and_grad(fn))(x)
    np.testing.assert_allclose(float(jit_value), float(eager_value), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(jit_grad), np.asarray(eager_grad), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_gradient_and_jvp_match_central_differences_in_float64(name):
    """Reverse mode, forward mode and float64 finite differences agree on a random direction."""
    with jax.enable_x64(True):
        fn, x = _cases(jnp.float64)[name]
        direction = jnp.asarray(np.random.default_rng(1).normal(size=x.shape), jnp.float64)
        # Compiled: one program per transformation is cheaper than eager dispatch in float64.
        grad = jax.jit(jax.grad(fn))(x)
        _, forward = jax.jit(lambda x, d: jax.jvp(fn, (x,), (d,)))(x, direction)
        h = 1e-6
        f = jax.jit(fn)
        numeric = (f(x + h * direction) - f(x - h * direction)) / (2 * h)
        reverse = jnp.vdot(grad, direction)
        np.testing.assert_allclose(float(forward), float(reverse), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(float(forward), float(numeric), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["cross_entropy", "cross_entropy_probs", "bce", "mse", "kl_div", "sequence_nll_loss"])
def test_vmap_equals_a_loop(name):
    fn, x = _cases(jnp.float32)[name]
    stacked = jnp.stack([x, 0.5 * x, x + 1.0])
    batched = jax.jit(jax.vmap(jax.value_and_grad(fn)))(stacked)
    single = jax.jit(jax.value_and_grad(fn))
    for i in range(3):
        value, grad = single(stacked[i])
        np.testing.assert_allclose(float(batched[0][i]), float(value), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(batched[1][i]), np.asarray(grad), rtol=1e-5, atol=1e-7)


def test_vmap_over_targets_and_masks():
    logits = jnp.asarray(RNG.normal(size=(3, 4, 6)), jnp.float32)
    targets = jnp.asarray(RNG.integers(0, 6, size=(3, 4)))
    where = jnp.asarray(RNG.random((3, 4)) < 0.7)
    batched = jax.vmap(lambda x, t, w: jaxloss.cross_entropy(x, t, where=w, reduction="sum_count"))(logits, targets, where)
    for i in range(3):
        pair = jaxloss.cross_entropy(logits[i], targets[i], where=where[i], reduction="sum_count")
        np.testing.assert_allclose(float(batched.total[i]), float(pair.total), rtol=1e-6)
        assert float(batched.count[i]) == float(pair.count)


# --- shard_map over 4 simulated devices ------------------------------------------------


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < 4:
        pytest.skip("needs 4 devices (the root conftest.py simulates them on the CPU)")
    return Mesh(np.array(jax.devices()[:4]), ("data",))


def _sharded_problem():
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(16, 5)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(5, 7)) * 0.5, jnp.float32)
    targets = rng.integers(0, 7, size=16)
    targets[4:7] = -100  # device 1 has one counted element, the others four
    targets[8:12] = -100  # device 2 has none
    return x, w, jnp.asarray(targets)


@pytest.mark.parametrize("reduction", ["mean", "sum", "sum_count"])
def test_axis_name_gives_the_global_reduction_inside_shard_map(mesh, reduction):
    x, w, targets = _sharded_problem()
    class_weight = jnp.linspace(0.5, 2.0, 7, dtype=jnp.float32)

    @partial(jax.shard_map, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P())
    def sharded(logits, t):
        return jaxloss.cross_entropy(logits, t, weight=class_weight, reduction=reduction, axis_name="data")

    logits = x @ w
    out = jax.jit(sharded)(logits, targets)
    whole = jaxloss.cross_entropy(logits, targets, weight=class_weight, reduction=reduction)
    if reduction == "sum_count":
        np.testing.assert_allclose(float(out.total), float(whole.total), rtol=1e-6)
        np.testing.assert_allclose(float(out.count), float(whole.count), rtol=1e-6)
    else:
        np.testing.assert_allclose(float(out), float(whole), rtol=1e-6)


def test_axis_name_gives_the_global_mean_under_legacy_pmap(mesh):
    """``jax.pmap`` with an ``axis_name``: every device returns the global token mean; the usual
    ``pmean`` of per-device gradients then gives the exact gradient of that mean."""
    x, w, targets = _sharded_problem()
    t = targets.reshape(4, 4)

    def local(w, x, t):
        return jaxloss.cross_entropy(x @ w, t, label_smoothing=0.1, axis_name="data")

    def step(w, x, t):
        value, grad = jax.value_and_grad(local)(w, x, t)
        return value, jax.lax.pmean(grad, "data")

    replicated_w = jnp.broadcast_to(w, (4, *w.shape))
    value, grad = jax.pmap(step, axis_name="data")(replicated_w, x.reshape(4, 4, 5), t)
    whole = lambda w: jaxloss.cross_entropy(x @ w, targets, label_smoothing=0.1)  # noqa: E731
    want, want_grad = jax.value_and_grad(whole)(w)
    np.testing.assert_allclose(np.asarray(value), np.full(4, float(want)), rtol=1e-6)
    for device in range(4):
        np.testing.assert_allclose(np.asarray(grad[device]), np.asarray(want_grad), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "loss_name",
    ["cross_entropy", "mse_loss", "binary_cross_entropy_with_logits", "kl_div_batchmean", "sequence_nll_loss"],
)
def test_axis_name_for_every_family(mesh, loss_name):
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.normal(size=(8, 3, 4)), jnp.float32)
    y = jnp.asarray(rng.random((8, 3, 4)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 4, size=(8, 3)))
    where = jnp.asarray(rng.random((8, 3, 4)) < 0.6)

    def loss(a, b, ids, where, axis_name=None):
        if loss_name == "cross_entropy":
            return jaxloss.cross_entropy(a, ids, axis_name=axis_name)
        if loss_name == "mse_loss":
            return jaxloss.mse_loss(a, b, where=where, axis_name=axis_name)
        if loss_name == "binary_cross_entropy_with_logits":
            return jaxloss.binary_cross_entropy_with_logits(a, b, where=where, axis_name=axis_name)
        if loss_name == "kl_div_batchmean":
            return jaxloss.kl_div(jax.nn.log_softmax(a), b, reduction="batchmean", axis_name=axis_name)
        return jaxloss.sequence_nll_loss(a, ids, axis_name=axis_name)

    sharded = jax.shard_map(
        partial(loss, axis_name="data"), mesh=mesh, in_specs=(P("data"),) * 4, out_specs=P()
    )
    np.testing.assert_allclose(float(jax.jit(sharded)(x, y, ids, where)), float(loss(x, y, ids, where)), rtol=1e-6)


def test_gradient_wrt_replicated_parameter_under_shard_map_equals_single_device(mesh):
    x, w, targets = _sharded_problem()

    def single(w):
        return jaxloss.cross_entropy(x @ w, targets, label_smoothing=0.1)

    def per_shard(w, x_shard, t_shard):
        return jaxloss.cross_entropy(x_shard @ w, t_shard, label_smoothing=0.1, axis_name="data")

    sharded = jax.shard_map(per_shard, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P())
    value, grad = jax.jit(jax.value_and_grad(lambda w: sharded(w, x, targets)))(w)
    ref_value, ref_grad = jax.value_and_grad(single)(w)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(ref_grad), rtol=1e-5, atol=1e-7)

    # The gradient taken inside shard_map (one train step per device) is the same on every device.
    def grad_inside(w, x_shard, t_shard):
        return jax.grad(per_shard)(w, x_shard, t_shard)

    inside = jax.shard_map(grad_inside, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P())
    np.testing.assert_allclose(np.asarray(jax.jit(inside)(w, x, targets)), np.asarray(ref_grad), rtol=1e-5, atol=1e-7)


def test_sum_count_psum_inside_shard_map_then_mean(mesh):
    x, w, targets = _sharded_problem()

    def per_shard(w, x_shard, t_shard):
        pair = jaxloss.cross_entropy(x_shard @ w, t_shard, reduction="sum_count")
        return pair.psum("data").mean()

    sharded = jax.shard_map(per_shard, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P())
    value, grad = jax.jit(jax.value_and_grad(lambda w: sharded(w, x, targets)))(w)
    ref_value, ref_grad = jax.value_and_grad(lambda w: jaxloss.cross_entropy(x @ w, targets))(w)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(ref_grad), rtol=1e-5, atol=1e-7)


def test_validate_under_checkify_grad_and_vmap():
    from jax.experimental import checkify

    x = jnp.zeros((4, 3), jnp.float32)
    fn = checkify.checkify(jax.jit(lambda x, t: jaxloss.cross_entropy(x, t, validate=True)))
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"flat index 2: 9"):
        jax.block_until_ready(fn(x, jnp.array([0, 2, 9, 1])))
    err, value = fn(x, jnp.array([0, 2, -100, 1]))
    err.throw()
    np.testing.assert_allclose(float(value), np.log(3.0), rtol=1e-6)

    grad = jax.jit(jax.grad(lambda x, t: jaxloss.cross_entropy(x, t, validate=True)))
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"flat index 1: 3"):
        jax.block_until_ready(grad(x, jnp.array([0, 3, 1, 1])))
    np.testing.assert_allclose(np.asarray(grad(x, jnp.array([0, 1, 2, 1]))).sum(), 0.0, atol=1e-6)

    per_row = jax.jit(jax.vmap(lambda x, t: jaxloss.cross_entropy(x, t, validate=True)))
    rows = jnp.array([[0, 1], [2, -7]])
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"flat index 1: -7"):
        jax.block_until_ready(per_row(jnp.zeros((2, 2, 3), jnp.float32), rows))


def test_traced_label_smoothing_and_z_loss_equal_static_ones():
    logits = jnp.asarray(LOGITS, jnp.float32)
    targets = jnp.asarray(TARGETS)

    @jax.jit
    def traced(x, eps, zeta):
        return jaxloss.cross_entropy(x, targets, label_smoothing=eps, z_loss=zeta)

    static = jaxloss.cross_entropy(logits, targets, label_smoothing=0.2, z_loss=1e-2)
    np.testing.assert_allclose(float(traced(logits, 0.2, 1e-2)), float(static), rtol=1e-6)
    np.testing.assert_allclose(
        float(traced(logits, 0.0, 0.0)), float(jaxloss.cross_entropy(logits, targets)), rtol=1e-6
    )


@pytest.mark.parametrize("wrt", ["weight", "probabilities", "label_smoothing"])
def test_gradients_wrt_other_arguments_match_central_differences(wrt):
    """Class weights, probability targets (distillation) and the smoothing are differentiable too."""
    with jax.enable_x64(True):
        logits = jnp.asarray(LOGITS, jnp.float64)
        weight = jnp.asarray(np.linspace(0.5, 2.0, 6), jnp.float64)
        probs = jnp.asarray(PROBS, jnp.float64)
        targets = jnp.asarray(TARGETS)
        if wrt == "weight":
            fn, x = (lambda w: jaxloss.cross_entropy(logits, targets, weight=w, label_smoothing=0.1)), weight
        elif wrt == "probabilities":
            fn, x = (lambda p: jaxloss.cross_entropy(logits, p, weight=weight, label_smoothing=0.1)), probs
        else:
            fn, x = (lambda e: jaxloss.cross_entropy(logits, targets, weight=weight, label_smoothing=e)), jnp.float64(0.3)
        direction = jnp.asarray(np.random.default_rng(2).normal(size=x.shape), jnp.float64)
        grad = jax.jit(jax.grad(fn))(x)
        _, forward = jax.jit(lambda x, d: jax.jvp(fn, (x,), (d,)))(x, direction)
        h = 1e-6
        f = jax.jit(fn)
        numeric = (f(x + h * direction) - f(x - h * direction)) / (2 * h)
        np.testing.assert_allclose(float(jnp.vdot(grad, direction)), float(numeric), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(float(forward), float(numeric), rtol=1e-6, atol=1e-9)
