"""Regression losses against ``torch.nn.functional``: values and gradients, every reduction and dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tests.torch_reference import JAX_DTYPES, assert_close, check_against_torch, round_to

import jaxloss

DTYPES = ["float32", "bfloat16", "float64"]
REDUCTIONS = ["none", "sum", "mean", "sum_count"]

# name -> (jaxloss function, torch function, keyword options given to both)
LOSSES = {
    "mse": (jaxloss.mse_loss, F.mse_loss, {}),
    "l1": (jaxloss.l1_loss, F.l1_loss, {}),
    "smooth_l1": (jaxloss.smooth_l1_loss, F.smooth_l1_loss, {}),
    "smooth_l1_beta0.5": (jaxloss.smooth_l1_loss, F.smooth_l1_loss, {"beta": 0.5}),
    "smooth_l1_beta0": (jaxloss.smooth_l1_loss, F.smooth_l1_loss, {"beta": 0.0}),
    "huber": (jaxloss.huber_loss, F.huber_loss, {}),
    "huber_delta2.5": (jaxloss.huber_loss, F.huber_loss, {"delta": 2.5}),
}


def _inputs(shape=(4, 3, 5), seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape) * 2.0, rng.normal(size=shape) * 2.0


@pytest.mark.parametrize(
    ("dtype", "reduction", "masked"),
    [(d, r, m) for d in DTYPES for r in REDUCTIONS for m in (False, True) if d == "float32" or not m or r == "mean"],
)
@pytest.mark.parametrize("name", list(LOSSES))
def test_matches_torch(name, dtype, reduction, masked):
    jax_loss, torch_loss, opts = LOSSES[name]
    x, y = _inputs()
    y_seen = y if dtype == "float64" else round_to(y, dtype)
    mask = np.random.default_rng(1).random(x.shape) < 0.6 if masked else None
    torch_reduction = "sum" if reduction == "sum_count" else reduction
    with jax.enable_x64(dtype == "float64"):
        where = None if mask is None else jnp.asarray(mask)

        def jax_fn(a):
            return jax_loss(a, jnp.asarray(y, JAX_DTYPES[dtype]), reduction=reduction, where=where, **opts)

        def torch_fn(a):
            b = torch.tensor(y_seen, dtype=a.dtype)
            if mask is None:
                return torch_loss(a, b, reduction=torch_reduction, **opts)
            # A mask equals dropping the masked elements.
            keep = torch.tensor(mask)
            if reduction == "none":
                per = torch_loss(a, b, reduction="none", **opts)
                return torch.where(keep, per, torch.zeros((), dtype=per.dtype))
            return torch_loss(a[keep], b[keep], reduction=torch_reduction, **opts)

        check_against_torch(jax_fn, torch_fn, x, dtype, what=f"{name} {dtype} {reduction} masked={masked}")
        if reduction == "sum_count":
            pair = jax_fn(jnp.asarray(x, JAX_DTYPES[dtype]))
            assert float(pair.count) == (x.size if mask is None else int(mask.sum()))


@pytest.mark.parametrize("name", ["mse", "smooth_l1_beta0.5", "huber_delta2.5"])
def test_gradient_with_respect_to_target_matches_torch(name):
    jax_loss, torch_loss, opts = LOSSES[name]
    x, y = _inputs(seed=4)
    check_against_torch(
        lambda b: jax_loss(jnp.asarray(x, jnp.float32), b, **opts),
        lambda b: torch_loss(torch.tensor(x, dtype=b.dtype), b, **opts),
        y,
        "float32",
        what=name,
    )


def test_masked_nan_inputs_contribute_nothing_and_get_zero_gradient():
    x, y = _inputs(seed=2)
    mask = np.random.default_rng(3).random(x.shape) < 0.5
    x_nan = np.where(mask, x, np.nan)
    for name, (jax_loss, _, opts) in LOSSES.items():
        value, grad = jax.value_and_grad(
            lambda a: jax_loss(a, jnp.asarray(y, jnp.float32), where=jnp.asarray(mask), **opts)
        )(jnp.asarray(x_nan, jnp.float32))
        clean = jax_loss(
            jnp.asarray(x[mask], jnp.float32), jnp.asarray(y[mask], jnp.float32), **opts
        )
        assert_close(np.asarray(value), np.asarray(clean), (1e-6, 1e-7), name)
        assert np.all(np.isfinite(np.asarray(grad))), name
        assert np.all(np.asarray(grad)[~mask] == 0), name


def test_unmasked_nan_stays_nan():
    x, y = _inputs(seed=2)
    x[0, 0, 0] = np.nan
    mask = np.ones(x.shape, bool)
    mask[1] = False
    for name, (jax_loss, _, opts) in LOSSES.items():
        for where in (None, jnp.asarray(mask)):
            value = jax_loss(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), where=where, **opts)
            assert np.isnan(float(value)), name
