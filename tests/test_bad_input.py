"""Bad input raises at trace time (also under jit), naming the argument and the shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxloss

LOGITS = jnp.zeros((4, 3), jnp.float32)
IDS = jnp.array([0, 1, 2, 0])


def _raises_eager_and_jit(fn, exc, match):
    """``fn(logits)`` raises ``exc`` matching ``match`` both eagerly and while tracing under jit."""
    with pytest.raises(exc, match=match):
        fn(LOGITS)
    with pytest.raises(exc, match=match):
        jax.jit(fn)(LOGITS)


CROSS_ENTROPY_CASES = {
    "float targets where class ids are needed": (
        lambda x: jaxloss.cross_entropy(x, jnp.array([0.0, 1.0, 2.0, 0.0])),
        TypeError,
        r"targets must be integer class ids of shape \(4,\).*float32 with shape \(4,\)",
    ),
    "float targets of another shape": (
        lambda x: jaxloss.cross_entropy(x, jnp.zeros((4, 2), jnp.float32)),
        TypeError,
        r"class probabilities of shape \(4, 3\).*shape \(4, 2\)",
    ),
    "class ids of the wrong shape": (
        lambda x: jaxloss.cross_entropy(x, jnp.array([0, 1, 2])),
        ValueError,
        r"targets has shape \(3,\) but logits of shape \(4, 3\) need class ids of shape \(4,\)",
    ),
    "label_smoothing above 1": (
        lambda x: jaxloss.cross_entropy(x, IDS, label_smoothing=1.5),
        ValueError,
        r"label_smoothing must lie in \[0, 1\], got 1.5",
    ),
    "label_smoothing below 0": (
        lambda x: jaxloss.cross_entropy(x, IDS, label_smoothing=-0.1),
        ValueError,
        r"label_smoothing must lie in \[0, 1\]",
    ),
    "unknown reduction": (
        lambda x: jaxloss.cross_entropy(x, IDS, reduction="avg"),
        ValueError,
        r"reduction='avg' is not supported",
    ),
    "class axis that does not exist": (
        lambda x: jaxloss.cross_entropy(x, IDS, axis=2),
        ValueError,
        r"axis=2 is out of range for logits of shape \(4, 3\)",
    ),
    "negative class axis that does not exist": (
        lambda x: jaxloss.cross_entropy(x, IDS, axis=-3),
        ValueError,
        r"axis=-3 is out of range for logits of shape \(4, 3\)",
    ),
    "non-integer axis": (
        lambda x: jaxloss.cross_entropy(x, IDS, axis=1.0),
        TypeError,
        r"axis must be an int",
    ),
    "class weight of the wrong shape": (
        lambda x: jaxloss.cross_entropy(x, IDS, weight=jnp.ones(4, jnp.float32)),
        ValueError,
        r"weight must have shape \(3,\).*got \(4,\)",
    ),
    "integer class weight": (
        lambda x: jaxloss.cross_entropy(x, IDS, weight=jnp.ones(3, jnp.int32)),
        TypeError,
        r"weight must be a floating-point array",
    ),
    "mask of the wrong shape": (
        lambda x: jaxloss.cross_entropy(x, IDS, where=jnp.ones((3,), jnp.bool_)),
        ValueError,
        r"where has shape \(3,\).*\(4,\)",
    ),
    "non-boolean mask": (
        lambda x: jaxloss.cross_entropy(x, IDS, where=jnp.ones((4,), jnp.float32)),
        TypeError,
        r"where must be a boolean mask",
    ),
    "negative z_loss": (
        lambda x: jaxloss.cross_entropy(x, IDS, z_loss=-1.0),
        ValueError,
        r"z_loss must be >= 0",
    ),
    "scalar logits": (
        lambda x: jaxloss.cross_entropy(x[0, 0], jnp.array(0)),
        ValueError,
        r"logits must have a class axis",
    ),
    "probability targets with a bad weight": (
        lambda x: jaxloss.cross_entropy(x, jnp.full((4, 3), 1 / 3, jnp.float32), weight=jnp.ones(2, jnp.float32)),
        ValueError,
        r"weight must have shape \(3,\)",
    ),
}


@pytest.mark.parametrize("case", list(CROSS_ENTROPY_CASES))
def test_cross_entropy_bad_input(case):
    fn, exc, match = CROSS_ENTROPY_CASES[case]
    _raises_eager_and_jit(fn, exc, match)


def test_integer_logits_are_rejected():
    with pytest.raises(TypeError, match=r"logits must be a floating-point array, got dtype int32 with shape \(4, 3\)"):
        jaxloss.cross_entropy(jnp.zeros((4, 3), jnp.int32), IDS)
    with pytest.raises(TypeError, match=r"input must be a floating-point array"):
        jaxloss.mse_loss(jnp.zeros((4,), jnp.int32), jnp.zeros((4,), jnp.float32))


OTHER_CASES = {
    "nll_loss float targets": (
        lambda x: jaxloss.nll_loss(x, jnp.zeros((4,), jnp.float32)), TypeError, r"targets must be integer class ids"
    ),
    "nll_loss wrong target shape": (
        lambda x: jaxloss.nll_loss(x, jnp.zeros((4, 3), jnp.int32)), ValueError, r"targets has shape \(4, 3\)"
    ),
    "nll_loss bad axis": (lambda x: jaxloss.nll_loss(x, IDS, axis=5), ValueError, r"axis=5 is out of range"),
    "nll_loss bad reduction": (lambda x: jaxloss.nll_loss(x, IDS, reduction="batchmean"), ValueError, r"reduction="),
    "bce shape mismatch": (
        lambda x: jaxloss.binary_cross_entropy_with_logits(x, jnp.zeros((4,), jnp.float32)),
        ValueError,
        r"targets has shape \(4,\) but logits has shape \(4, 3\)",
    ),
    "bce integer targets": (
        lambda x: jaxloss.binary_cross_entropy_with_logits(x, jnp.zeros((4, 3), jnp.int32)),
        TypeError,
        r"targets must be a floating-point array",
    ),
    "bce pos_weight that does not broadcast": (
        lambda x: jaxloss.binary_cross_entropy_with_logits(x, jnp.zeros((4, 3), jnp.float32), pos_weight=jnp.ones(4, jnp.float32)),
        ValueError,
        r"pos_weight has shape \(4,\), which does not broadcast to logits of shape \(4, 3\)",
    ),
    "bce weight that does not broadcast": (
        lambda x: jaxloss.binary_cross_entropy_with_logits(x, jnp.zeros((4, 3), jnp.float32), weight=jnp.ones((2, 3), jnp.float32)),
        ValueError,
        r"weight has shape \(2, 3\)",
    ),
    "mse shape mismatch": (
        lambda x: jaxloss.mse_loss(x, jnp.zeros((3, 4), jnp.float32)),
        ValueError,
        r"target has shape \(3, 4\) but input has shape \(4, 3\)",
    ),
    "l1 bad mask": (
        lambda x: jaxloss.l1_loss(x, x, where=jnp.ones((2, 3), jnp.bool_)), ValueError, r"where has shape \(2, 3\)"
    ),
    "smooth_l1 negative beta": (lambda x: jaxloss.smooth_l1_loss(x, x, beta=-1.0), ValueError, r"beta must be >= 0"),
    "huber zero delta": (lambda x: jaxloss.huber_loss(x, x, delta=0.0), ValueError, r"delta must be > 0"),
    "huber bad reduction": (lambda x: jaxloss.huber_loss(x, x, reduction="max"), ValueError, r"reduction='max'"),
    "kl_div shape mismatch": (
        lambda x: jaxloss.kl_div(x, jnp.zeros((4,), jnp.float32)), ValueError, r"target has shape \(4,\) but input"
    ),
    "kl_div bad reduction": (lambda x: jaxloss.kl_div(x, x, reduction="average"), ValueError, r"'batchmean'"),
    "kl_div batchmean of a scalar": (
        lambda x: jaxloss.kl_div(x[0, 0], x[0, 0], reduction="batchmean"), ValueError, r"batch axis"
    ),
    "sequence_nll_loss without a time axis": (
        lambda x: jaxloss.sequence_nll_loss(x[0], jnp.array(0)), ValueError, r"\(\.\.\., T, V\).*\(3,\)"
    ),
    "sequence_nll_loss targets shape": (
        lambda x: jaxloss.sequence_nll_loss(x, jnp.zeros((3,), jnp.int32)),
        ValueError,
        r"targets has shape \(3,\) but logits of shape \(4, 3\) need targets of shape \(4,\)",
    ),
    "sequence_nll_loss bad normalize": (
        lambda x: jaxloss.sequence_nll_loss(x[None], IDS[None], normalize="batch"), ValueError, r"normalize='batch'"
    ),
    "sequence_log_likelihood float targets": (
        lambda x: jaxloss.sequence_log_likelihood(x[None], jnp.zeros((1, 4), jnp.float32)),
        TypeError,
        r"targets must be integer class ids",
    ),
    "causal_lm_loss one position": (
        lambda x: jaxloss.causal_lm_loss(x[None, :1], IDS[None, :1]), ValueError, r"at least 2 positions"
    ),
    "causal_lm_loss attention mask shape": (
        lambda x: jaxloss.causal_lm_loss(x[None], IDS[None], attention_mask=jnp.ones((1, 3), jnp.int32)),
        ValueError,
        r"attention_mask has shape \(1, 3\) but input_ids has shape \(1, 4\)",
    ),
    "causal_lm_loss ids shape": (
        lambda x: jaxloss.causal_lm_loss(x[None], IDS[None, :3]),
        ValueError,
        r"targets has shape \(1, 3\)",
    ),
}


@pytest.mark.parametrize("case", list(OTHER_CASES))
def test_other_losses_bad_input(case):
    fn, exc, match = OTHER_CASES[case]
    _raises_eager_and_jit(fn, exc, match)


def test_validate_reports_the_first_bad_index():
    targets = np.array([0, 1, 3, 7])
    with pytest.raises(ValueError, match=r"targets\[2\] = 3 is not a class id in \[0, 3\).*2 such"):
        jaxloss.cross_entropy(LOGITS, jnp.asarray(targets), validate=True)


def test_combine_and_composite_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        jaxloss.combine()
    with pytest.raises(ValueError, match="distinct"):
        jaxloss.CompositeLoss(terms=())
