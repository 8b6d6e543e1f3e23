"""Vocabularies long enough that the logsumexp is summed in pieces equal the float64 formula."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxloss
from jaxloss._softmax_stats import MAX_ROW, _row_pieces


def test_row_pieces_divide_long_rows():
    assert _row_pieces(MAX_ROW) == 1
    assert _row_pieces(128256) == 4 and 128256 // 4 <= MAX_ROW
    assert _row_pieces(50257) == 29  # 29 x 1733
    assert _row_pieces(2 * 65537) == 1  # no divisor up to 64: one piece


@pytest.mark.parametrize("num_classes", [40000, 2 * 65537])
def test_long_rows_match_float64(num_classes):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, num_classes)).astype(np.float32) * 4
    logits[1, ::3] = -np.inf  # a masked vocabulary
    targets = np.array([5, 7, num_classes - 1])
    loss, grad = jax.value_and_grad(jaxloss.cross_entropy)(jnp.asarray(logits), jnp.asarray(targets))
    x = logits.astype(np.float64)
    peak = x.max(-1, keepdims=True)
    lse = np.log(np.exp(x - peak).sum(-1)) + peak[:, 0]
    expected = np.mean(lse - x[np.arange(3), targets])
    softmax = np.exp(x - lse[:, None])
    softmax[np.arange(3), targets] -= 1
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), softmax / 3, atol=1e-7)
