"""Numerics: 16-bit accuracy against a float64 reference, -inf logits, NaN under masks,
nothing counted, and class ids out of range."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tests.torch_reference import cotangent_like, round_to

import jaxloss

# --- bf16 / f16 accuracy: at least as good as torch on the same 16-bit input ------------------


def _bf16_cases(rng):
    """name -> (jax fn, torch fn, input): both take the differentiated input and return a loss."""
    n, v = 48, 512
    logits = rng.normal(size=(n, v)) * 4.0
    ids = rng.integers(0, v, size=n)
    ids[:5] = -100
    weight = rng.uniform(0.5, 2.0, size=v)
    probs = rng.dirichlet(np.ones(v) * 0.1, size=n)
    y = rng.normal(size=(n, 16)) * 3.0
    x16 = rng.normal(size=(n, 16)) * 3.0
    cases = {}
    for reduction in ("none", "mean", "sum"):
        cases[f"cross_entropy_{reduction}"] = (
            lambda x, r=reduction: jaxloss.cross_entropy(x, jnp.asarray(ids), reduction=r, label_smoothing=0.1,
                                                         weight=jnp.asarray(weight, jnp.float32)),
            lambda x, r=reduction: F.cross_entropy(x, torch.tensor(ids), reduction=r, label_smoothing=0.1,
                                                   weight=torch.tensor(weight, dtype=x.dtype)),
            logits,
        )
    cases["cross_entropy_probs"] = (
        lambda x, p=None: jaxloss.cross_entropy(x, jnp.asarray(probs, x.dtype), reduction="none"),
        lambda x: F.cross_entropy(x, torch.tensor(round_to(probs, "bfloat16"), dtype=x.dtype), reduction="none"),
        logits,
    )
    cases["nll_loss"] = (
        lambda x: jaxloss.nll_loss(x, jnp.asarray(ids), reduction="none"),
        lambda x: F.nll_loss(x, torch.tensor(ids), reduction="none"),
        np.asarray(torch.log_softmax(torch.tensor(logits), -1)),
    )
    cases["bce"] = (
        lambda x: jaxloss.binary_cross_entropy_with_logits(x, jnp.asarray(y > 0, x.dtype), reduction="mean"),
        lambda x: F.binary_cross_entropy_with_logits(x, torch.tensor(y > 0, dtype=x.dtype)),
        x16,
    )
    for name, ours, theirs in (
        ("mse", jaxloss.mse_loss, F.mse_loss),
        ("smooth_l1", jaxloss.smooth_l1_loss, F.smooth_l1_loss),
        ("huber", jaxloss.huber_loss, F.huber_loss),
    ):
        cases[name] = (
            lambda x, f=ours: f(x, jnp.asarray(y, x.dtype), reduction="sum"),
            lambda x, f=theirs: f(x, torch.tensor(round_to(y, "bfloat16"), dtype=x.dtype), reduction="sum"),
            x16,
        )
    cases["kl_div"] = (
        lambda x: jaxloss.kl_div(x, jnp.asarray(probs, x.dtype), reduction="batchmean"),
        lambda x: F.kl_div(x, torch.tensor(round_to(probs, "bfloat16"), dtype=x.dtype), reduction="batchmean"),
        np.asarray(torch.log_softmax(torch.tensor(logits), -1)),
    )
    return cases


BF16_CASES = list(_bf16_cases(np.random.default_rng(0)))


@pytest.mark.parametrize("name", BF16_CASES)
def test_bfloat16_at_least_as_accurate_as_torch_against_float64(name):
    """On the same bfloat16 input, our float32 result is closer to the float64 truth than torch's bfloat16 one."""
    jax_fn, torch_fn, x = _bf16_cases(np.random.default_rng(0))[name]
    x = round_to(x, "bfloat16")

    def torch_run(dtype):
        xt = torch.tensor(x, dtype=dtype, requires_grad=True)
        out = torch_fn(xt)
        g = torch.tensor(cotangent_like(tuple(out.shape)), dtype=torch.float64)
        (out.double() * g).sum().backward()
        return out.detach().double().numpy(), xt.grad.double().numpy()

    ref_value, ref_grad = torch_run(torch.float64)
    torch_value, torch_grad = torch_run(torch.bfloat16)

    def scalar(a):
        out = jax_fn(a)
        return jnp.sum(out * jnp.asarray(cotangent_like(out.shape), out.dtype)), out

    (_, value), grad = jax.jit(jax.value_and_grad(scalar, has_aux=True))(jnp.asarray(x, jnp.bfloat16))
    assert value.dtype == jnp.float32 and grad.dtype == jnp.bfloat16
    our_value_err = np.max(np.abs(np.asarray(value, np.float64) - ref_value))
    our_grad_err = np.max(np.abs(np.asarray(grad.astype(jnp.float32), np.float64) - ref_grad))
    torch_value_err = np.max(np.abs(torch_value - ref_value))
    torch_grad_err = np.max(np.abs(torch_grad - ref_grad))
    scale = np.max(np.abs(ref_value)) + 1e-30
    # The value is float32 arithmetic on exact inputs: a few float32 ulps of its scale.
    assert our_value_err <= 1e-5 * scale + 1e-7, (our_value_err, scale)
    assert our_value_err <= torch_value_err, (our_value_err, torch_value_err)
    # The gradient is rounded to bfloat16 once; torch's is at least that far off.
    assert our_grad_err <= torch_grad_err * (1 + 1e-6) + 1e-12, (our_grad_err, torch_grad_err)
    grad_scale = np.max(np.abs(ref_grad))
    assert our_grad_err <= 2.0**-8 * grad_scale, (our_grad_err, grad_scale)


def test_float16_large_logits_do_not_overflow():
    """float16 tops out at 65504: the float32 computation of logsumexp must not overflow."""
    logits = jnp.asarray([[60000.0, 0.0, -60000.0], [100.0, 200.0, 300.0]], jnp.float16)
    targets = jnp.array([1, 0])
    value, grad = jax.jit(jax.value_and_grad(lambda x: jaxloss.cross_entropy(x, targets, reduction="sum")))(logits)
    np.testing.assert_allclose(float(value), 60000.0 + 200.0, rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(grad, np.float32)))


# --- -inf logits -------------------------------------------------------------------------


def _masked_vocab(rng, n=6, v=8):
    logits = rng.normal(size=(n, v))
    targets = rng.integers(0, v // 2, size=n)
    logits[:, v // 2 :] = -np.inf  # a masked half of the vocabulary, never a target
    logits[0, 1:] = -np.inf  # a row where only one class is allowed
    targets[0] = 0
    return logits, targets


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("option", ["plain", "weight", "where", "z_loss"])
def test_minus_inf_non_target_logits_give_finite_values_and_gradients(dtype, option):
    logits, targets = _masked_vocab(np.random.default_rng(1))
    kwargs = {}
    if option == "weight":
        kwargs["weight"] = jnp.linspace(0.5, 2.0, 8, dtype=jnp.float32)
    if option == "where":
        kwargs["where"] = jnp.array([True, False, True, True, True, True])
    if option == "z_loss":
        kwargs["z_loss"] = 1e-2
    x = jnp.asarray(logits, getattr(jnp, dtype))

    def f(a):
        return jaxloss.cross_entropy(a, jnp.asarray(targets), reduction="none", **kwargs)

    value = jax.jit(f)(x)
    assert np.all(np.isfinite(np.asarray(value)))
    grad = jax.jit(jax.grad(lambda a: jnp.sum(f(a))))(x)
    assert np.all(np.isfinite(np.asarray(grad, np.float32)))
    assert np.all(np.asarray(grad, np.float32)[:, 4:] == 0.0)  # softmax is exactly 0 there
    tangent = jnp.asarray(np.random.default_rng(2).normal(size=logits.shape), x.dtype)
    _, forward = jax.jit(lambda a, t: jax.jvp(f, (a,), (t,)))(x, tangent)
    assert np.all(np.isfinite(np.asarray(forward)))
    # Forward and reverse mode agree (the reverse-mode gradient is rounded to the input dtype).
    g32, t32 = grad.astype(jnp.float32), tangent.astype(jnp.float32)
    scale = float(jnp.sum(jnp.abs(g32) * jnp.abs(t32)))
    atol = (2.0**-8 if dtype == "bfloat16" else 1e-6) * scale
    np.testing.assert_allclose(float(jnp.sum(forward)), float(jnp.vdot(g32, t32)), rtol=0, atol=atol)
    if option in ("plain", "weight"):
        torch_kwargs = {"weight": torch.tensor(np.asarray(kwargs["weight"]), dtype=torch.float64)} if "weight" in kwargs else {}
        xt = torch.tensor(round_to(logits, dtype), requires_grad=True)
        expected = F.cross_entropy(xt, torch.tensor(targets), reduction="none", **torch_kwargs)
        expected.sum().backward()
        np.testing.assert_allclose(np.asarray(value), expected.detach().numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(grad, np.float32), xt.grad.numpy(), rtol=1e-2, atol=1e-3)


def test_minus_inf_in_nll_and_sequence_losses():
    logits, targets = _masked_vocab(np.random.default_rng(3))
    x = jnp.asarray(logits, jnp.float32)
    # causal_lm_loss scores the token at t + 1 with the logits at t.
    ids = jnp.asarray(np.concatenate([[0], targets[:-1]]))[None]
    for f in (
        lambda a: jaxloss.nll_loss(jax.nn.log_softmax(a), jnp.asarray(targets)),
        lambda a: jaxloss.sequence_nll_loss(a.reshape(2, 3, 8), jnp.asarray(targets).reshape(2, 3)),
        lambda a: jaxloss.perplexity(a.reshape(2, 3, 8), jnp.asarray(targets).reshape(2, 3)),
        lambda a: jaxloss.causal_lm_loss(a[None], ids),
    ):
        value, grad = jax.jit(jax.value_and_grad(f))(x)
        assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))


def test_minus_inf_target_logit_gives_inf_as_in_torch():
    logits = np.array([[0.0, -np.inf, 1.0], [0.5, 0.2, 0.1]])
    targets = np.array([1, 0])
    ours = jaxloss.cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(targets), reduction="none")
    theirs = F.cross_entropy(torch.tensor(logits), torch.tensor(targets), reduction="none")
    assert np.isposinf(float(ours[0])) and np.isposinf(float(theirs[0]))
    np.testing.assert_allclose(float(ours[1]), float(theirs[1]), rtol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("weighted", [False, True])
def test_minus_inf_with_label_smoothing_is_inf_as_in_torch(dtype, weighted):
    logits = np.array([[0.0, -np.inf, 1.0], [0.5, 0.25, -1.0]])
    targets = np.array([0, 2])
    weight = np.array([0.5, 1.0, 2.0]) if weighted else None
    ours = jax.jit(jax.value_and_grad(lambda x: jnp.sum(jaxloss.cross_entropy(
        x, jnp.asarray(targets), label_smoothing=0.1, reduction="none",
        weight=None if weight is None else jnp.asarray(weight, jnp.float32)))))
    value, grad = ours(jnp.asarray(logits, getattr(jnp, dtype)))
    per_row = jaxloss.cross_entropy(jnp.asarray(logits, getattr(jnp, dtype)), jnp.asarray(targets), label_smoothing=0.1,
                                    reduction="none", weight=None if weight is None else jnp.asarray(weight, jnp.float32))
    theirs = F.cross_entropy(torch.tensor(logits), torch.tensor(targets), label_smoothing=0.1, reduction="none",
                             weight=None if weight is None else torch.tensor(weight))
    assert np.isposinf(float(per_row[0])) and np.isposinf(float(theirs[0])) and np.isposinf(float(value))
    np.testing.assert_allclose(float(per_row[1]), float(theirs[1]), rtol=1e-6)
    # the finite row's gradient stays finite (the kernel's gradient does not pass through the
    # smoothing term's -inf)
    assert np.all(np.isfinite(np.asarray(grad, np.float32)[1]))


def test_zero_probability_at_minus_inf_logit_contributes_nothing():
    logits = jnp.array([[0.0, -jnp.inf, 1.0]])
    probs = jnp.array([[0.3, 0.0, 0.7]])
    value, grad = jax.value_and_grad(lambda a: jaxloss.cross_entropy(a, probs))(logits)
    finite = jnp.array([[0.0, 1.0]])
    expected = jaxloss.cross_entropy(finite, jnp.array([[0.3, 0.7]]))
    np.testing.assert_allclose(float(value), float(expected), rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(grad))) and float(grad[0, 1]) == 0.0


# --- NaN under masks ---------------------------------------------------------------------------


def _nan_rows(rng, n=6, c=5):
    logits = rng.normal(size=(n, c))
    targets = rng.integers(0, c, size=n)
    keep = np.array([True, False, True, True, False, True])
    logits[~keep] = np.nan
    return logits, targets, keep


def _masked_nan_cases(logits, targets, keep):
    x_keep = jnp.asarray(logits[keep], jnp.float32)
    t_keep = jnp.asarray(targets[keep])
    probs = jnp.asarray(np.full(logits.shape, 1.0 / logits.shape[1]), jnp.float32)
    where = jnp.asarray(keep)
    ignored = jnp.asarray(np.where(keep, targets, -100))
    t = jnp.asarray(targets)
    elementwise_where = jnp.broadcast_to(where[:, None], logits.shape)
    y = jnp.zeros(logits.shape, jnp.float32)
    return {
        "cross_entropy_where": (lambda x: jaxloss.cross_entropy(x, t, where=where, label_smoothing=0.1),
                                jaxloss.cross_entropy(x_keep, t_keep, label_smoothing=0.1)),
        "cross_entropy_ignore_index": (lambda x: jaxloss.cross_entropy(x, ignored, weight=jnp.ones(5, jnp.float32)),
                                       jaxloss.cross_entropy(x_keep, t_keep)),
        "cross_entropy_probs_where": (lambda x: jaxloss.cross_entropy(x, probs, where=where),
                                      jaxloss.cross_entropy(x_keep, probs[: int(keep.sum())])),
        "nll_loss_where": (lambda x: jaxloss.nll_loss(x, t, where=where), jaxloss.nll_loss(x_keep, t_keep)),
        "bce_where": (lambda x: jaxloss.binary_cross_entropy_with_logits(x, y, where=elementwise_where),
                      jaxloss.binary_cross_entropy_with_logits(x_keep, y[: int(keep.sum())])),
        "mse_where": (lambda x: jaxloss.mse_loss(x, y, where=elementwise_where),
                      jaxloss.mse_loss(x_keep, y[: int(keep.sum())])),
        "kl_div_where": (lambda x: jaxloss.kl_div(x, probs, where=elementwise_where, reduction="sum"),
                         jaxloss.kl_div(x_keep, probs[: int(keep.sum())], reduction="sum")),
        "sequence_nll_where": (
            lambda x: jaxloss.sequence_nll_loss(x.reshape(2, 3, 5), t.reshape(2, 3), where=where.reshape(2, 3), normalize="token"),
            jaxloss.cross_entropy(x_keep, t_keep),
        ),
    }


@pytest.mark.parametrize("name", list(_masked_nan_cases(*_nan_rows(np.random.default_rng(0)))))
def test_masked_nan_contributes_nothing_and_gets_zero_gradient(name):
    logits, targets, keep = _nan_rows(np.random.default_rng(4))
    fn, expected = _masked_nan_cases(logits, targets, keep)[name]
    x = jnp.asarray(logits, jnp.float32)
    value, grad = jax.jit(jax.value_and_grad(fn))(x)
    np.testing.assert_allclose(float(value), float(expected), rtol=1e-6)
    grad = np.asarray(grad)
    assert np.all(np.isfinite(grad)), name
    assert np.all(grad[~keep] == 0.0), name
    assert np.any(grad[keep] != 0.0), name
    # Forward mode too: a tangent on the masked rows changes nothing.
    tangent = jnp.asarray(np.where(keep[:, None], 0.0, 1.0) * np.ones(logits.shape), jnp.float32)
    _, forward = jax.jit(lambda a, t: jax.jvp(fn, (a,), (t,)))(x, tangent)
    assert float(forward) == 0.0, name


@pytest.mark.parametrize("name", list(_masked_nan_cases(*_nan_rows(np.random.default_rng(0)))))
def test_unmasked_nan_is_never_hidden(name):
    """A NaN on a counted element shows in the result: masking must not turn it into a number."""
    logits, targets, keep = _nan_rows(np.random.default_rng(5))
    logits[0, targets[0]] = np.nan  # row 0 is kept; the target's own logit (nll_loss reads only that)
    fn, _ = _masked_nan_cases(logits, targets, keep)[name]
    assert np.isnan(float(jax.jit(fn)(jnp.asarray(logits, jnp.float32)))), name


# --- nothing counted ----------------------------------------------------------------------------


def _all_skipped_cases():
    x = jnp.asarray(np.random.default_rng(6).normal(size=(3, 4)), jnp.float32)
    none = jnp.zeros((3,), jnp.bool_)
    none_el = jnp.zeros((3, 4), jnp.bool_)
    ids = jnp.array([1, 2, 3])
    ignored = jnp.full((3,), -100)
    y = jnp.zeros((3, 4), jnp.float32)
    return x, {
        "cross_entropy_ignored": lambda a, r: jaxloss.cross_entropy(a, ignored, reduction=r),
        "cross_entropy_weighted_ignored": lambda a, r: jaxloss.cross_entropy(a, ignored, weight=jnp.ones(4, jnp.float32), reduction=r),
        "cross_entropy_where": lambda a, r: jaxloss.cross_entropy(a, ids, where=none, reduction=r),
        "cross_entropy_probs_where": lambda a, r: jaxloss.cross_entropy(a, jnp.full((3, 4), 0.25, jnp.float32), where=none, reduction=r),
        "nll_loss": lambda a, r: jaxloss.nll_loss(a, ignored, reduction=r),
        "bce": lambda a, r: jaxloss.binary_cross_entropy_with_logits(a, y, where=none_el, reduction=r),
        "mse": lambda a, r: jaxloss.mse_loss(a, y, where=none_el, reduction=r),
        "kl_div": lambda a, r: jaxloss.kl_div(a, y, where=none_el, reduction=r),
        "sequence_nll_loss": lambda a, r: jaxloss.sequence_nll_loss(a[None], ignored[None], reduction=r),
        "causal_lm_loss": lambda a, r: jaxloss.causal_lm_loss(a[None], ids[None], attention_mask=jnp.array([[1, 0, 0]]), reduction=r),
    }


@pytest.mark.parametrize("name", list(_all_skipped_cases()[1]))
def test_nothing_counted_mean_is_nan_and_sum_count_is_zero_with_zero_gradient(name):
    x, cases = _all_skipped_cases()
    fn = cases[name]
    assert np.isnan(float(jax.jit(fn, static_argnums=1)(x, "mean"))), name
    assert float(jax.jit(fn, static_argnums=1)(x, "sum")) == 0.0
    value, grad = jax.jit(jax.value_and_grad(lambda a: fn(a, "sum_count").mean()))(x)
    assert float(value) == 0.0
    assert np.all(np.asarray(grad) == 0.0)


def test_perplexity_of_nothing_is_nan():
    assert np.isnan(float(jaxloss.perplexity(jnp.zeros((1, 3, 4)), jnp.full((1, 3), -100))))


# --- class ids out of range ------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1, 5, 1000])
@pytest.mark.parametrize("fn_name", ["cross_entropy", "nll_loss"])
def test_out_of_range_ids_under_jit_give_nan_not_a_wrapped_class(fn_name, bad):
    rng = np.random.default_rng(7)
    logits = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    targets = jnp.array([0, bad, 2, 3])
    fn = getattr(jaxloss, fn_name)
    per = jax.jit(lambda x, t: fn(x, t, reduction="none"))(logits, targets)
    assert np.isnan(float(per[1]))
    assert np.all(np.isfinite(np.asarray(per)[[0, 2, 3]]))
    assert np.isnan(float(jax.jit(lambda x, t: fn(x, t))(logits, targets)))
    # The gradient of the counted, valid elements is untouched and the bad row gets no finite lie.
    grad = jax.jit(jax.grad(lambda x: jnp.sum(fn(x, targets, reduction="none")[jnp.array([0, 2, 3])])))(logits)
    assert np.all(np.isfinite(np.asarray(grad)))


@pytest.mark.parametrize("fn_name", ["cross_entropy", "nll_loss"])
def test_validate_names_the_first_bad_index_on_concrete_inputs(fn_name):
    fn = getattr(jaxloss, fn_name)
    logits = jnp.zeros((2, 3, 4), jnp.float32)
    targets = jnp.array([[0, 1, 2], [-1, 7, -100]])
    with pytest.raises(ValueError, match=r"targets\[1, 0\] = -1 .*\[0, 4\).*2 such"):
        fn(logits, targets, validate=True)
    fn(logits, jnp.array([[0, 1, 2], [3, -100, -100]]), validate=True)  # fine: ignored ids are not checked
    masked = jnp.array([[True, True, True], [False, False, True]])
    fn(logits, targets, where=masked, validate=True)  # masked-out bad ids are not checked either


def test_validate_under_plain_jit_raises_when_the_call_runs():
    for fn in (jaxloss.cross_entropy, jaxloss.nll_loss):
        jitted = jax.jit(lambda x, t, f=fn: f(x, t, validate=True))
        with pytest.raises(jax.errors.JaxRuntimeError, match=r"outside \[0, 3\) at flat index 2: -1"):
            jax.block_until_ready(jitted(jnp.zeros((4, 3), jnp.float32), jnp.array([0, 1, -1, 5])))
        logits, targets = jnp.arange(12.0).reshape(4, 3), jnp.array([0, 1, 2, -100])
        np.testing.assert_allclose(float(jitted(logits, targets)), float(fn(logits, targets)), rtol=1e-6)
