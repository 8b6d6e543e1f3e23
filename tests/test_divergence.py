"""``kl_div`` against ``torch.nn.functional.kl_div``: values and gradients, every reduction and dtype."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tests.torch_reference import JAX_DTYPES, assert_close, check_against_torch, round_to

import jaxloss

DTYPES = ["float32", "bfloat16", "float64"]
REDUCTIONS = ["none", "sum", "mean", "batchmean", "sum_count"]


def _inputs(seed=0, shape=(4, 3, 6)):
    rng = np.random.default_rng(seed)
    log_q = np.asarray(torch.log_softmax(torch.tensor(rng.normal(size=shape) * 2), dim=-1))
    p = np.exp(rng.normal(size=shape) * 2)
    p[rng.random(shape) < 0.2] = 0.0  # zero-probability classes: 0 log 0 = 0
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-12)
    return log_q, p


def _torch_kl(input, target, reduction, log_target):
    with warnings.catch_warnings():  # torch warns that "mean" is not the mathematical KL
        warnings.simplefilter("ignore", UserWarning)
        return F.kl_div(input, target, reduction=reduction, log_target=log_target)


@pytest.mark.parametrize("log_target", [False, True], ids=["prob_target", "log_target"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_torch(dtype, reduction, log_target):
    log_q, p = _inputs()
    target = np.log(np.where(p > 0, p, 1e-30)) if log_target else p
    target_seen = target if dtype == "float64" else round_to(target, dtype)
    torch_reduction = "sum" if reduction == "sum_count" else reduction
    with jax.enable_x64(dtype == "float64"):
        jax_target = jnp.asarray(target, JAX_DTYPES[dtype])

        def jax_fn(x):
            return jaxloss.kl_div(x, jax_target, reduction=reduction, log_target=log_target)

        def torch_fn(x):
            return _torch_kl(x, torch.tensor(target_seen, dtype=x.dtype), torch_reduction, log_target)

        check_against_torch(jax_fn, torch_fn, log_q, dtype, what=f"kl {dtype} {reduction} log_target={log_target}")
        if reduction == "sum_count":
            assert float(jax_fn(jnp.asarray(log_q, JAX_DTYPES[dtype])).count) == log_q.size


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradient_with_respect_to_target_matches_torch(reduction):
    log_q, p = _inputs(seed=1)
    p = np.clip(p, 1e-3, None)  # the gradient of t log t is unbounded at t = 0
    torch_reduction = "sum" if reduction == "sum_count" else reduction
    check_against_torch(
        lambda t: jaxloss.kl_div(jnp.asarray(log_q, jnp.float32), t, reduction=reduction),
        lambda t: _torch_kl(torch.tensor(log_q, dtype=t.dtype), t, torch_reduction, False),
        p,
        "float32",
        what=reduction,
    )


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "sum_count"])
def test_where_equals_dropping_the_masked_elements(reduction):
    log_q, p = _inputs(seed=2)
    mask = np.random.default_rng(3).random(log_q.shape) < 0.6
    torch_reduction = "sum" if reduction == "sum_count" else reduction

    def torch_fn(x):
        keep = torch.tensor(mask)
        t = torch.tensor(p, dtype=x.dtype)
        if reduction == "none":
            per = _torch_kl(x, t, "none", False)
            return torch.where(keep, per, torch.zeros((), dtype=per.dtype))
        return _torch_kl(x[keep], t[keep], torch_reduction, False)

    check_against_torch(
        lambda x: jaxloss.kl_div(x, jnp.asarray(p, jnp.float32), reduction=reduction, where=jnp.asarray(mask)),
        torch_fn,
        log_q,
        "float32",
        what=reduction,
    )


def test_batchmean_is_the_per_sample_kl():
    """With the class axis last, ``batchmean`` is the mean over samples of ``KL(p || q)`` (float64 closed form)."""
    log_q, p = _inputs(seed=4, shape=(5, 7))
    with jax.enable_x64(True):
        value = jaxloss.kl_div(jnp.asarray(log_q), jnp.asarray(p), reduction="batchmean")
    safe = np.where(p > 0, p, 1.0)
    expected = np.mean(np.sum(np.where(p > 0, p * (np.log(safe) - log_q), 0.0), axis=-1))
    assert_close(np.asarray(value), expected, (1e-12, 1e-14), "batchmean")


def test_negative_target_probability_is_nan_as_in_torch():
    log_q, p = _inputs(seed=5)
    p[0, 0, 0] = -0.1
    value = jaxloss.kl_div(jnp.asarray(log_q, jnp.float32), jnp.asarray(p, jnp.float32), reduction="sum")
    expected = _torch_kl(torch.tensor(log_q), torch.tensor(p), "sum", False)
    assert np.isnan(float(value)) and torch.isnan(expected)


def test_zero_target_with_minus_inf_input_is_finite():
    """``0 * log 0`` and ``0 * (-inf)`` terms contribute 0 (a class the student never predicts)."""
    log_q = jnp.array([[0.0, -jnp.inf]])
    p = jnp.array([[1.0, 0.0]])
    value, grad = jax.value_and_grad(lambda x: jaxloss.kl_div(x, p, reduction="sum"))(log_q)
    assert float(value) == 0.0
    np.testing.assert_array_equal(np.asarray(grad), [[-1.0, 0.0]])


def test_batchmean_with_masked_samples_equals_dropping_them():
    """A sample whose elements are all masked does not count in ``batchmean``'s batch size."""
    log_q, p = _inputs(seed=6, shape=(5, 6))
    keep = np.array([True, False, True, True, False])
    where = np.broadcast_to(keep[:, None], log_q.shape).copy()
    where[0, :2] = False  # a partly masked sample still counts
    check_against_torch(
        lambda x: jaxloss.kl_div(x, jnp.asarray(p, jnp.float32), reduction="batchmean", where=jnp.asarray(where)),
        lambda x: _torch_kl(
            torch.where(torch.tensor(where), x, torch.zeros((), dtype=x.dtype))[torch.tensor(keep)],
            torch.tensor(np.where(where, p, 0.0))[torch.tensor(keep)].to(x.dtype),
            "batchmean",
            False,
        ),
        log_q,
        "float32",
    )
    nothing = jaxloss.kl_div(jnp.asarray(log_q, jnp.float32), jnp.asarray(p, jnp.float32), reduction="batchmean",
                             where=jnp.zeros(log_q.shape, jnp.bool_))
    assert np.isnan(float(nothing))
