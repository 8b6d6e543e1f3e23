"""Reductions, the (sum, count) pair and exact accumulation across micro-batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxloss
from jaxloss import SumCount, combine
from jaxloss._reduce import check_mask, compute_dtype, reduce_loss


def _losses():
    rng = np.random.default_rng(0)
    losses = rng.uniform(0, 3, size=(4, 5))
    normalizer = rng.uniform(0.5, 2, size=(4, 5))
    normalizer[0, :2] = 0.0
    losses[0, :2] = 0.0
    return losses, normalizer


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "sum_count"])
def test_reduce_loss_against_numpy(reduction):
    losses, normalizer = _losses()
    out = reduce_loss(jnp.asarray(losses, jnp.float32), jnp.asarray(normalizer, jnp.float32), reduction)
    expected = {
        "none": losses,
        "sum": losses.sum(),
        "mean": losses.sum() / normalizer.sum(),
    }
    if reduction == "sum_count":
        assert isinstance(out, SumCount)
        np.testing.assert_allclose(float(out.total), losses.sum(), rtol=1e-6)
        np.testing.assert_allclose(float(out.count), normalizer.sum(), rtol=1e-6)
        np.testing.assert_allclose(float(out.mean()), losses.sum() / normalizer.sum(), rtol=1e-6)
    else:
        np.testing.assert_allclose(np.asarray(out), expected[reduction], rtol=1e-6)


def test_unknown_reduction_names_the_argument():
    with pytest.raises(ValueError, match="reduction='avg'"):
        reduce_loss(jnp.ones(3), jnp.ones(3), "avg")
    assert jaxloss.REDUCTIONS == ("none", "sum", "mean", "sum_count")


def test_empty_pair_mean_is_zero_with_zero_gradient():
    def mean_of(total, count):
        return SumCount(total, count).mean()

    value, grads = jax.value_and_grad(mean_of, argnums=(0, 1))(jnp.float32(0.0), jnp.float32(0.0))
    assert float(value) == 0.0
    assert float(grads[0]) == 0.0 and float(grads[1]) == 0.0
    # A non-empty pair: d(total / count) = (1 / count, -total / count^2).
    value, grads = jax.value_and_grad(mean_of, argnums=(0, 1))(jnp.float32(3.0), jnp.float32(2.0))
    np.testing.assert_allclose([float(value), float(grads[0]), float(grads[1])], [1.5, 0.5, -0.75], rtol=1e-6)


def test_empty_pair_from_a_loss_has_zero_gradient_even_with_nan_logits():
    logits = jnp.full((3, 4), jnp.nan, jnp.float32)
    targets = jnp.array([-100, -100, -100])

    def f(x):
        return jaxloss.cross_entropy(x, targets, reduction="sum_count").mean()

    value, grad = jax.jit(jax.value_and_grad(f))(logits)
    assert float(value) == 0.0
    assert np.all(np.asarray(grad) == 0.0)


def test_combine_adds_fieldwise_and_needs_a_pair():
    a = SumCount(jnp.float32(1.0), jnp.float32(2.0))
    b = SumCount(jnp.float32(5.0), jnp.float32(3.0))
    c = combine(a, b, a)
    assert float(c.total) == 7.0 and float(c.count) == 7.0
    assert combine(a) == a
    with pytest.raises(ValueError, match="at least one"):
        combine()
    # A pytree: tree utilities combine pairs the same way.
    d = jax.tree.map(jnp.add, a, b)
    assert isinstance(d, SumCount) and float(d.total) == 6.0


def test_micro_batch_pairs_give_the_whole_batch_mean_but_mean_of_means_does_not():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(10, 6)), jnp.float32)
    targets = np.asarray(rng.integers(0, 6, size=10))
    targets[7:] = -100  # the last micro-batch is mostly ignored
    targets = jnp.asarray(targets)
    ce = jax.jit(jaxloss.cross_entropy, static_argnames="reduction")
    whole = ce(logits, targets)
    splits = [(0, 4), (4, 8), (8, 10)]
    pairs = [ce(logits[a:b], targets[a:b], reduction="sum_count") for a, b in splits]
    np.testing.assert_allclose(float(combine(*pairs).mean()), float(whole), rtol=1e-6)
    means = [float(p.mean()) for p in pairs]
    assert abs(np.mean(means) - float(whole)) > 1e-3


def test_pair_passes_through_jit_grad_and_scan():
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(4, 3, 5)), jnp.float32)
    targets = jnp.asarray(np.random.default_rng(3).integers(0, 5, size=(4, 3)))

    @jax.jit
    def accumulate(logits):
        def body(carry, xs):
            x, t = xs
            return combine(carry, jaxloss.cross_entropy(x, t, reduction="sum_count")), None

        init = SumCount(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        pair, _ = jax.lax.scan(body, init, (logits, targets))
        return pair.mean(), pair

    (value, pair), grad = jax.value_and_grad(accumulate, has_aux=True)(logits)
    whole, whole_grad = jax.jit(jax.value_and_grad(
        lambda x: jaxloss.cross_entropy(x.reshape(-1, 5), targets.reshape(-1))
    ))(logits)
    assert isinstance(pair, SumCount) and float(pair.count) == 12.0
    np.testing.assert_allclose(float(value), float(whole), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(whole_grad), rtol=1e-5, atol=1e-7)


def test_compute_dtype():
    assert compute_dtype(jnp.bfloat16) == jnp.float32
    assert compute_dtype(jnp.float16) == jnp.float32
    assert compute_dtype(jnp.float32) == jnp.float32
    assert compute_dtype(jnp.float64) == jnp.float64
    with pytest.raises(TypeError, match="floating"):
        compute_dtype(jnp.int32)


def test_check_mask():
    assert check_mask(None, (2, 3)) is None
    assert check_mask(jnp.array([True, False, True]), (2, 3)).shape == (2, 3)
    with pytest.raises(TypeError, match="boolean"):
        check_mask(jnp.ones((2, 3)), (2, 3))
    with pytest.raises(ValueError, match=r"\(4,\).*\(2, 3\)"):
        check_mask(jnp.ones((4,), jnp.bool_), (2, 3))
    with pytest.raises(ValueError, match="does not broadcast"):
        check_mask(jnp.ones((2, 3, 1), jnp.bool_), (2, 3))


def test_mean_of_nothing_counted_is_nan_as_in_torch():
    import torch
    import torch.nn.functional as F

    logits = np.random.default_rng(4).normal(size=(3, 4))
    targets = np.array([-100, -100, -100])
    ours = jaxloss.cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(targets))
    theirs = F.cross_entropy(torch.tensor(logits), torch.tensor(targets))
    assert np.isnan(float(ours)) and bool(torch.isnan(theirs))
    pair = jaxloss.cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(targets), reduction="sum_count")
    assert float(pair.total) == 0.0 and float(pair.count) == 0.0 and float(pair.mean()) == 0.0
