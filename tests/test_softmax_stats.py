"""The per-platform choices inside the cross-entropy kernel (``jaxloss/_softmax_stats.py``).

For bf16 logits, CPU shares a float32 ``e = exp(x - max)`` between the statistics and the
gradient, and sums the logits for label smoothing as a product with a column of ones (or of
the class weights); other platforms recompute ``exp`` in the gradient pass and use a plain
sum. Only the CPU branch runs here, so both branches are compared directly, and the lowering
for each platform is checked for the branch it takes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jaxloss
from jaxloss import _softmax_stats as stats


def _bf16_logits_with_infinities() -> jax.Array:
    x = np.random.default_rng(0).normal(size=(6, 40)).astype(np.float32) * 3
    x[1, 5:] = -np.inf  # a masked vocabulary
    x[2, 7] = np.inf
    x[3, 0], x[3, 1] = np.inf, -np.inf
    x[4, 9] = np.nan
    return jnp.asarray(x, jnp.bfloat16)


def test_shared_and_recomputed_softmax_agree():
    x = _bf16_logits_with_infinities()[jnp.array([0, 1, 5])]  # the rows a softmax is defined on
    lse = stats._logsumexp(x)
    shared_lse, shared = stats._shared_softmax(x, lse)
    recomputed_lse, recomputed = stats._recomputed_softmax(x, lse)
    x64 = np.asarray(x, np.float64)
    reference = np.exp(x64 - x64.max(axis=-1, keepdims=True))
    reference /= reference.sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(shared_lse), np.asarray(recomputed_lse), rtol=1e-6)
    for softmax in (shared, recomputed):
        assert softmax.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(softmax), reference, rtol=1e-5, atol=1e-7)


def test_sum_by_product_equals_plain_sum_with_infinities_and_nan():
    x = _bf16_logits_with_infinities()
    by_product = np.asarray(stats._sum_by_product(x))
    plain = np.asarray(stats._plain_sum(x))
    np.testing.assert_array_equal(np.isnan(by_product), np.isnan(plain))
    np.testing.assert_array_equal(np.isposinf(by_product), np.isposinf(plain))
    np.testing.assert_array_equal(np.isneginf(by_product), np.isneginf(plain))
    finite = np.isfinite(plain)
    assert finite.sum() == 2
    np.testing.assert_allclose(by_product[finite], np.asarray(x, np.float64)[finite].sum(-1), rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_weighted_sum_by_product_equals_safe_weighted_sum(dtype):
    """Class weights of 0 drop their classes even at -inf, inf or NaN (``0 * x = 0``); other
    weights multiply infinities as usual."""
    x = _bf16_logits_with_infinities().astype(dtype)
    weights = np.linspace(0.5, 2.0, x.shape[-1]).astype(np.float32)
    weights[[5, 6, 9]] = 0.0  # row 1's first masked classes, row 4's NaN
    a = jnp.asarray(weights)
    by_product = np.asarray(stats._weighted_sum_by_product(x, a))
    reference = np.asarray(stats._weighted_sum(x, a))
    np.testing.assert_array_equal(np.isnan(by_product), np.isnan(reference))
    np.testing.assert_array_equal(np.isinf(by_product), np.isinf(reference))
    finite = np.isfinite(reference)
    assert finite[4]  # the NaN sits at a class of weight 0
    x64 = np.where(weights == 0, 0.0, np.asarray(x, np.float64))
    np.testing.assert_allclose(by_product[finite], (x64 * weights)[finite].sum(-1), rtol=1e-5)


@pytest.mark.parametrize("platform", ["cpu", "cuda", "tpu"])
@pytest.mark.parametrize("targets", ["class_ids", "probabilities"])
def test_each_platform_lowers_its_branch(platform, targets):
    """CPU: one ``exp`` per logit (and for label smoothing the ones-column product);
    elsewhere two ``exp`` and a plain sum."""
    shape = (64, 1000)
    if targets == "class_ids":
        target_type = jax.ShapeDtypeStruct(shape[:1], jnp.int32)
        kwargs = {"label_smoothing": 0.1}
    else:
        target_type = jax.ShapeDtypeStruct(shape, jnp.float32)
        kwargs = {}
    loss = jax.jit(jax.value_and_grad(lambda x, t: jaxloss.cross_entropy(x, t, **kwargs)))
    module = export.export(loss, platforms=[platform])(
        jax.ShapeDtypeStruct(shape, jnp.bfloat16), target_type).mlir_module()
    on_cpu = platform == "cpu"
    assert module.count("stablehlo.exponential") == (1 if on_cpu else 2)
    assert ("stablehlo.dot_general" in module) == (on_cpu and targets == "class_ids")
