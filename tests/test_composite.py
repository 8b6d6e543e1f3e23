"""CompositeLoss / Term: static, scheduled and learned-uncertainty weights against closed forms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxloss
from jaxloss import CompositeLoss, SumCount, Term


def test_static_weights_are_a_weighted_sum():
    loss = CompositeLoss(terms=(Term("ce", 1.0), Term("mse", 0.25, kind="regression"), Term("ll", 2.0)))
    values = {"ce": 0.7, "mse": 3.0, "ll": 1.5}
    out = loss({k: jnp.asarray(v, jnp.float32) for k, v in values.items()})
    np.testing.assert_allclose(float(out.total), 0.7 + 0.25 * 3.0 + 2.0 * 1.5, rtol=1e-6)
    for name, weight in (("ce", 1.0), ("mse", 0.25), ("ll", 2.0)):
        np.testing.assert_allclose(float(out.unweighted[name]), values[name], rtol=1e-6)
        np.testing.assert_allclose(float(out.weighted[name]), weight * values[name], rtol=1e-6)
        np.testing.assert_allclose(float(out.weights[name]), weight, rtol=1e-6)
        assert bool(out.present[name])
    assert loss.init() == {}
    logs = out.logs()
    assert set(logs) == {"loss/total"} | {f"loss/{n}{s}" for n in values for s in ("", "_weighted", "_weight")}


def test_gradient_of_the_total_is_the_weight():
    loss = CompositeLoss(terms=(Term("a", 0.3), Term("b", 2.0)))
    grads = jax.grad(lambda v: loss({"a": v[0], "b": v[1]}).total)(jnp.array([1.0, 5.0]))
    np.testing.assert_allclose(np.asarray(grads), [0.3, 2.0], rtol=1e-6)


def test_scheduled_weight_follows_an_optax_schedule_under_jit():
    schedule = optax.linear_schedule(init_value=0.0, end_value=1.0, transition_steps=100)
    loss = CompositeLoss(terms=(Term("ce", 1.0), Term("ll", schedule)))

    @jax.jit
    def total(step):
        return loss({"ce": jnp.float32(2.0), "ll": jnp.float32(4.0)}, step=step).total

    for step in (0, 25, 100, 400):
        expected = 2.0 + min(step / 100, 1.0) * 4.0
        np.testing.assert_allclose(float(total(jnp.asarray(step))), expected, rtol=1e-6)


def test_sum_count_terms_use_their_mean():
    loss = CompositeLoss(terms=(Term("ce", 0.5),))
    out = loss({"ce": SumCount(jnp.float32(6.0), jnp.float32(4.0))})
    np.testing.assert_allclose(float(out.total), 0.5 * 1.5, rtol=1e-6)


@pytest.mark.parametrize("balancing", ["static", "uncertainty"])
def test_absent_terms_contribute_nothing_and_get_no_gradient(balancing):
    loss = CompositeLoss(terms=(Term("ce"), Term("mse", kind="regression"), Term("ll")), balancing=balancing)
    log_vars = loss.init() if balancing == "uncertainty" else None
    if log_vars is not None:
        log_vars = {k: jnp.float32(0.3) for k in log_vars}

    def total(values, log_vars):
        losses = {
            "ce": values[0],
            "mse": SumCount(values[1] * 0.0, jnp.float32(0.0)),  # labels absent from the batch
        }  # "ll" missing entirely
        out = loss(losses, log_vars=log_vars)
        return out.total, out

    (value, out), (g_values, g_log_vars) = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(
        jnp.array([1.2, 7.0]), log_vars
    )
    assert not bool(out.present["mse"]) and not bool(out.present["ll"]) and bool(out.present["ce"])
    assert float(out.weighted["mse"]) == 0.0 and float(out.weighted["ll"]) == 0.0
    assert float(g_values[1]) == 0.0 and np.isfinite(np.asarray(g_values)).all()
    if balancing == "uncertainty":
        np.testing.assert_allclose(float(value), np.exp(-0.3) * 1.2 + 0.15, rtol=1e-6)
        assert float(g_log_vars["mse"]) == 0.0 and float(g_log_vars["ll"]) == 0.0
        assert float(g_log_vars["ce"]) != 0.0
    else:
        np.testing.assert_allclose(float(value), 1.2, rtol=1e-6)


def test_uncertainty_weights_match_kendall_closed_form():
    """``w e^{-s} L + s/2`` (classification) and ``w e^{-s} L / 2 + s/2`` (regression), with s = log sigma^2."""
    loss = CompositeLoss(
        terms=(Term("ce", 1.0), Term("mse", 0.5, kind="regression"), Term("ll", 2.0)), balancing="uncertainty"
    )
    L = {"ce": 0.9, "mse": 4.0, "ll": 2.5}
    s = {"ce": -0.4, "mse": 1.1, "ll": 0.2}
    w = {"ce": 1.0, "mse": 0.5, "ll": 2.0}
    sigma2 = {k: np.exp(v) for k, v in s.items()}
    expected = {
        "ce": w["ce"] * L["ce"] / sigma2["ce"] + np.log(np.sqrt(sigma2["ce"])),
        "mse": w["mse"] * L["mse"] / (2 * sigma2["mse"]) + np.log(np.sqrt(sigma2["mse"])),
        "ll": w["ll"] * L["ll"] / sigma2["ll"] + np.log(np.sqrt(sigma2["ll"])),
    }
    out = loss({k: jnp.float32(v) for k, v in L.items()}, log_vars={k: jnp.float32(v) for k, v in s.items()})
    for k in L:
        np.testing.assert_allclose(float(out.weighted[k]), expected[k], rtol=1e-6)
    np.testing.assert_allclose(float(out.total), sum(expected.values()), rtol=1e-6)
    np.testing.assert_allclose(float(out.weights["mse"]), 0.5 * 0.5 * np.exp(-1.1), rtol=1e-6)
    assert set(loss.init()) == set(L) and all(float(v) == 0.0 for v in loss.init().values())


def test_learned_log_variances_converge_to_the_closed_form_optimum():
    """d/ds [w e^{-s} L + s/2] = 0 gives s* = log(2 w L); for regression s* = log(w L)."""
    loss = CompositeLoss(
        terms=(Term("ce", 1.0), Term("mse", 1.0, kind="regression"), Term("ll", 0.5)), balancing="uncertainty"
    )
    L = {"ce": jnp.float32(0.8), "mse": jnp.float32(3.0), "ll": jnp.float32(4.0)}
    optimum = {"ce": np.log(2 * 0.8), "mse": np.log(3.0), "ll": np.log(2 * 0.5 * 4.0)}
    optimizer = optax.adam(0.05)
    log_vars = loss.init()
    state = optimizer.init(log_vars)

    @jax.jit
    def step(log_vars, state):
        grads = jax.grad(lambda lv: loss(L, log_vars=lv).total)(log_vars)
        updates, state = optimizer.update(grads, state, log_vars)
        return optax.apply_updates(log_vars, updates), state

    start_gap = {k: abs(0.0 - optimum[k]) for k in L}
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes Python floats and int32 counts
        for _ in range(600):
            log_vars, state = step(log_vars, state)
    for k in L:
        assert abs(float(log_vars[k]) - optimum[k]) < 0.02, (k, float(log_vars[k]), optimum[k])
        assert abs(float(log_vars[k]) - optimum[k]) < start_gap[k] or start_gap[k] < 0.02
    # At the optimum the effective weight on L_k is 1 / (2 L_k): every term contributes 1/2.
    out = loss(L, log_vars=log_vars)
    for k in L:
        np.testing.assert_allclose(float(out.weights[k] * L[k]), 0.5, rtol=0.03)


def test_bad_configuration_raises():
    with pytest.raises(ValueError, match="kind"):
        Term("x", kind="ranking")
    with pytest.raises(ValueError, match="weight"):
        Term("x", weight=-1.0)
    with pytest.raises(ValueError, match="distinct"):
        CompositeLoss(terms=(Term("x"), Term("x")))
    with pytest.raises(ValueError, match="balancing"):
        CompositeLoss(terms=(Term("x"),), balancing="gradnorm")
    loss = CompositeLoss(terms=(Term("x"),), balancing="uncertainty")
    with pytest.raises(ValueError, match="log_vars"):
        loss({"x": jnp.float32(1.0)})
    with pytest.raises(KeyError, match="y"):
        loss({"y": jnp.float32(1.0)}, log_vars=loss.init())
    with pytest.raises(ValueError, match="shape"):
        CompositeLoss(terms=(Term("x"),))({"x": jnp.ones(3)})


def test_composite_of_real_losses_end_to_end():
    """``L = a L_ce + b L_mse + c L_ll`` built from the library's own losses."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 5, size=4))
    pred, target = jnp.asarray(rng.normal(size=(4,)), jnp.float32), jnp.asarray(rng.normal(size=(4,)), jnp.float32)
    seq_logits = jnp.asarray(rng.normal(size=(2, 3, 7)), jnp.float32)
    seq = jnp.asarray(rng.integers(0, 7, size=(2, 3)))
    loss = CompositeLoss(terms=(Term("ce", 1.0), Term("mse", 0.5, kind="regression"), Term("ll", 0.1)))
    out = loss({
        "ce": jaxloss.cross_entropy(logits, labels, reduction="sum_count"),
        "mse": jaxloss.mse_loss(pred, target),
        "ll": jaxloss.sequence_nll_loss(seq_logits, seq),
    })
    expected = (
        jaxloss.cross_entropy(logits, labels)
        + 0.5 * jaxloss.mse_loss(pred, target)
        + 0.1 * jaxloss.sequence_nll_loss(seq_logits, seq)
    )
    np.testing.assert_allclose(float(out.total), float(expected), rtol=1e-6)
