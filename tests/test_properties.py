"""Property tests (hypothesis): permutation invariance, masking equals dropping, exact
composition of (sum, count) pairs across arbitrary splits."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jaxloss

SETTINGS = settings(max_examples=12, deadline=None, derandomize=True)
C = 4


@st.composite
def classification_batches(draw, max_n=6):
    """Logits (n, C), class ids with some ignored, a row mask and class weights."""
    n = draw(st.integers(1, max_n))
    logits = draw(hnp.arrays(np.float32, (n, C), elements=st.floats(-30, 30, width=32)))
    targets = draw(hnp.arrays(np.int32, (n,), elements=st.integers(-1, C - 1)))
    targets = np.where(targets < 0, -100, targets).astype(np.int32)
    mask = draw(hnp.arrays(np.bool_, (n,)))
    weight = draw(hnp.arrays(np.float32, (C,), elements=st.floats(0.25, 4.0, width=32)))
    smoothing = draw(st.sampled_from([0.0, 0.1]))
    return logits, targets, mask, weight, smoothing


def _close(a, b, rtol=2e-5, atol=1e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, equal_nan=True)


@partial(jax.jit, static_argnames="reduction")
def _jit_ce(logits, targets, mask, weight, smoothing, reduction):
    return jaxloss.cross_entropy(logits, targets, where=mask, weight=weight, label_smoothing=smoothing, reduction=reduction)


def _ce(logits, targets, mask, weight, smoothing, reduction):
    """Compiled: one program per shape is cheaper than eager dispatch over many shapes."""
    mask = None if mask is None else jnp.asarray(mask)
    return _jit_ce(jnp.asarray(logits), jnp.asarray(targets), mask, jnp.asarray(weight), jnp.float32(smoothing), reduction)


@SETTINGS
@given(batch=classification_batches(), seed=st.integers(0, 2**16))
def test_batch_permutation_invariance(batch, seed):
    logits, targets, mask, weight, smoothing = batch
    perm = np.random.default_rng(seed).permutation(len(targets))
    for reduction in ("sum_count", "none"):
        a = _ce(logits, targets, mask, weight, smoothing, reduction)
        b = _ce(logits[perm], targets[perm], mask[perm], weight, smoothing, reduction)
        if reduction == "none":
            _close(np.asarray(a)[perm], b)
        else:
            _close(a.total, b.total)
            _close(a.count, b.count)


@SETTINGS
@given(batch=classification_batches())
def test_masking_equals_dropping_for_cross_entropy(batch):
    logits, targets, mask, weight, smoothing = batch
    if not mask.any():
        masked = _ce(logits, targets, mask, weight, smoothing, "sum_count")
        assert float(masked.total) == 0.0 and float(masked.count) == 0.0
        return
    for reduction in ("sum", "mean"):
        masked = _ce(logits, targets, mask, weight, smoothing, reduction)
        dropped = _ce(logits[mask], targets[mask], None, weight, smoothing, reduction)
        _close(masked, dropped)


@SETTINGS
@given(
    x=hnp.arrays(np.float32, (3, 5), elements=st.floats(-10, 10, width=32)),
    y=hnp.arrays(np.float32, (3, 5), elements=st.floats(-10, 10, width=32)),
    mask=hnp.arrays(np.bool_, (3, 5)),
    name=st.sampled_from(["mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "binary_cross_entropy_with_logits"]),
)
def test_masking_equals_dropping_for_elementwise_losses(x, y, mask, name):
    fn = getattr(jaxloss, name)
    if name == "binary_cross_entropy_with_logits":
        y = (y > 0).astype(np.float32)
    masked = fn(jnp.asarray(x), jnp.asarray(y), where=jnp.asarray(mask), reduction="sum_count")
    dropped = fn(jnp.asarray(x[mask]), jnp.asarray(y[mask]), reduction="sum")
    _close(masked.total, dropped)
    assert float(masked.count) == float(mask.sum())
    none = fn(jnp.asarray(x), jnp.asarray(y), where=jnp.asarray(mask), reduction="none")
    assert np.all(np.asarray(none)[~mask] == 0.0)


@SETTINGS
@given(batch=classification_batches(max_n=8), cuts=st.lists(st.integers(0, 8), max_size=3))
def test_sum_count_composes_across_arbitrary_splits(batch, cuts):
    logits, targets, mask, weight, smoothing = batch
    n = len(targets)
    bounds = [0] + sorted(min(c, n) for c in cuts) + [n]
    pairs = [
        _ce(logits[a:b], targets[a:b], mask[a:b], weight, smoothing, "sum_count")
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    whole = _ce(logits, targets, mask, weight, smoothing, "sum_count")
    combined = jaxloss.combine(*pairs)
    _close(combined.total, whole.total)
    _close(combined.count, whole.count)
    mean = _ce(logits, targets, mask, weight, smoothing, "mean")
    if float(whole.count) > 0:
        _close(combined.mean(), mean)
    else:
        assert float(combined.mean()) == 0.0 and np.isnan(float(mean))


@SETTINGS
@given(
    lengths=st.lists(st.integers(0, 5), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
    normalize=st.sampled_from(["sequence", "token"]),
)
def test_sequence_sum_count_composes_across_sequences(lengths, seed, normalize):
    rng = np.random.default_rng(seed)
    b, t, v = len(lengths), 5, 6
    logits = jnp.asarray(rng.normal(size=(b, t, v)), jnp.float32)
    ids = rng.integers(0, v, size=(b, t))
    ids = jnp.asarray(np.where(np.arange(t)[None] < np.asarray(lengths)[:, None], ids, -100))
    whole = jaxloss.sequence_nll_loss(logits, ids, normalize=normalize, reduction="sum_count")
    parts = [jaxloss.sequence_nll_loss(logits[i : i + 1], ids[i : i + 1], normalize=normalize, reduction="sum_count") for i in range(b)]
    combined = jaxloss.combine(*parts)
    _close(combined.total, whole.total)
    _close(combined.count, whole.count)
    expected_count = sum(lengths) if normalize == "token" else sum(1 for n in lengths if n > 0)
    assert float(whole.count) == expected_count
