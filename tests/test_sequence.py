"""Sequence losses against torch: per-sequence log-likelihood, ``L_ll``, perplexity, and
``causal_lm_loss`` against a tiny Hugging Face GPT-2's own loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tests.torch_reference import JAX_DTYPES, assert_close, check_against_torch

import jaxloss

V = 11
DTYPES = ["float32", "bfloat16", "float64"]


def _batch(seed=0, shape=(3, 2, 6)):
    """Logits ``shape + (V,)``, targets with ignored tokens, and a mask; one sequence fully skipped."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=shape + (V,)) * 2.0
    targets = rng.integers(0, V, size=shape)
    targets[rng.random(shape) < 0.2] = -100
    mask = rng.random(shape) < 0.8
    targets[0, 0, :] = -100  # a sequence with nothing counted
    return logits, targets, mask


def _torch_token_nll(x, targets):
    return F.cross_entropy(x.movedim(-1, 1).contiguous(), torch.tensor(targets), reduction="none")


@pytest.mark.parametrize("masked", [False, True], ids=["all", "where"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sequence_log_likelihood_matches_torch(dtype, masked):
    logits, targets, mask = _batch()
    torch_targets = np.where(mask, targets, -100) if masked else targets
    with jax.enable_x64(dtype == "float64"):
        where = jnp.asarray(mask) if masked else None
        check_against_torch(
            lambda x: jaxloss.sequence_log_likelihood(x, jnp.asarray(targets), where=where),
            lambda x: -_torch_token_nll(x, torch_targets).sum(-1),
            logits,
            dtype,
            what=f"sequence_log_likelihood {dtype}",
        )


@pytest.mark.parametrize("masked", [False, True], ids=["all", "where"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "sum_count"])
@pytest.mark.parametrize("normalize", ["sequence", "token"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sequence_nll_loss_matches_torch(dtype, normalize, reduction, masked):
    logits, targets, mask = _batch(seed=1)
    torch_targets = np.where(mask, targets, -100) if masked else targets
    counted = torch_targets != -100
    n_tokens = counted.sum()
    n_sequences = counted.any(-1).sum()
    with jax.enable_x64(dtype == "float64"):
        where = jnp.asarray(mask) if masked else None

        def jax_fn(x):
            return jaxloss.sequence_nll_loss(
                x, jnp.asarray(targets), where=where, normalize=normalize, reduction=reduction
            )

        def torch_fn(x):
            per_sequence = _torch_token_nll(x, torch_targets).sum(-1)
            if reduction == "none":
                return per_sequence
            if reduction == "mean":
                return per_sequence.sum() / float(n_tokens if normalize == "token" else n_sequences)
            return per_sequence.sum()

        check_against_torch(jax_fn, torch_fn, logits, dtype, what=f"sequence_nll {dtype} {normalize} {reduction}")
        if reduction == "sum_count":
            pair = jax_fn(jnp.asarray(logits, JAX_DTYPES[dtype]))
            assert float(pair.count) == float(n_tokens if normalize == "token" else n_sequences)


def test_sequence_nll_loss_token_mean_equals_torch_cross_entropy_mean():
    logits, targets, _ = _batch(seed=2)
    check_against_torch(
        lambda x: jaxloss.sequence_nll_loss(x, jnp.asarray(targets), normalize="token"),
        lambda x: F.cross_entropy(x.reshape(-1, V), torch.tensor(targets).reshape(-1)),
        logits,
        "float32",
    )


def test_sequence_nll_loss_options_pass_through():
    logits, targets, _ = _batch(seed=3)
    check_against_torch(
        lambda x: jaxloss.sequence_nll_loss(x, jnp.asarray(targets), normalize="token", label_smoothing=0.1),
        lambda x: F.cross_entropy(x.reshape(-1, V), torch.tensor(targets).reshape(-1), label_smoothing=0.1),
        logits,
        "float32",
    )
    base = jaxloss.sequence_nll_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(targets), reduction="sum")
    with_z = jaxloss.sequence_nll_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(targets), reduction="sum", z_loss=0.5)
    lse = torch.logsumexp(torch.tensor(logits), -1).numpy()
    expected_extra = 0.5 * np.sum(np.where(targets != -100, lse**2, 0.0))
    assert_close(np.asarray(with_z - base), expected_extra, (1e-5, 1e-4), "z_loss")


@pytest.mark.parametrize("dtype", DTYPES)
def test_perplexity_is_exp_of_torch_token_mean(dtype):
    logits, targets, mask = _batch(seed=4)
    torch_targets = np.where(mask, targets, -100)
    with jax.enable_x64(dtype == "float64"):
        check_against_torch(
            lambda x: jaxloss.perplexity(x, jnp.asarray(targets), where=jnp.asarray(mask)),
            lambda x: torch.exp(F.cross_entropy(x.reshape(-1, V), torch.tensor(torch_targets).reshape(-1))),
            logits,
            dtype,
        )


def test_perplexity_of_uniform_logits_is_the_vocabulary_size():
    assert_close(np.asarray(jaxloss.perplexity(jnp.zeros((2, 5, V)), jnp.ones((2, 5), jnp.int32))), V, (1e-6, 0), "")


# --- causal_lm_loss against Hugging Face -------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=37, n_positions=16, n_embd=16, n_layer=1, n_head=2, n_inner=32)
    model = GPT2LMHeadModel(config).eval()
    return model


def _gpt2_batch(padding_side: str):
    rng = np.random.default_rng(5)
    ids = rng.integers(1, 37, size=(3, 9))
    lengths = np.array([9, 6, 3])
    positions = np.arange(9)[None, :]
    if padding_side == "right":
        mask = positions < lengths[:, None]
    else:
        mask = positions >= 9 - lengths[:, None]
    ids = np.where(mask, ids, 0)  # pad id 0
    return ids, mask.astype(np.int64)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_causal_lm_loss_equals_hugging_face_gpt2_loss(tiny_gpt2, padding_side):
    ids, mask = _gpt2_batch(padding_side)
    labels = np.where(mask == 1, ids, -100)
    out = tiny_gpt2(
        input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels)
    )
    logits = out.logits.detach().double().numpy()

    value = jaxloss.causal_lm_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert_close(np.asarray(value), out.loss.item(), (2e-6, 1e-6), "GPT-2 loss")

    # The gradient with respect to the logits equals that of Hugging Face's loss function.
    check_against_torch(
        lambda x: jaxloss.causal_lm_loss(x, jnp.asarray(ids), attention_mask=jnp.asarray(mask)),
        lambda x: tiny_gpt2.loss_function(x, torch.tensor(labels), vocab_size=37),
        logits,
        "float32",
        what="GPT-2 loss function",
    )
    # Padding set to ignore_index in the ids instead of a mask gives the same loss.
    by_labels = jaxloss.causal_lm_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(labels))
    assert_close(np.asarray(by_labels), out.loss.item(), (2e-6, 1e-6), "labels with -100")


def test_causal_lm_sum_count_over_micro_batches_equals_hugging_face_num_items_in_batch(tiny_gpt2):
    """Gradient accumulation: HF divides each micro-batch's sum by the whole batch's token count."""
    ids, mask = _gpt2_batch("right")
    labels = np.where(mask == 1, ids, -100)
    logits = tiny_gpt2(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.detach()
    num_items = int((labels[:, 1:] != -100).sum())
    hf = sum(
        tiny_gpt2.loss_function(logits[i : i + 1], torch.tensor(labels[i : i + 1]), vocab_size=37,
                                num_items_in_batch=torch.tensor(num_items)).item()
        for i in range(3)
    )
    pairs = [
        jaxloss.causal_lm_loss(
            jnp.asarray(logits[i : i + 1].numpy()), jnp.asarray(ids[i : i + 1]),
            attention_mask=jnp.asarray(mask[i : i + 1]), reduction="sum_count",
        )
        for i in range(3)
    ]
    combined = jaxloss.combine(*pairs)
    assert float(combined.count) == num_items
    assert_close(np.asarray(combined.mean()), hf, (2e-6, 1e-6), "accumulated")


def test_causal_lm_loss_shifts_by_one():
    """Logits at position t score the token at t + 1 (float64 closed form)."""
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(2, 4, V))
    ids = rng.integers(0, V, size=(2, 4))
    with jax.enable_x64(True):
        value = jaxloss.causal_lm_loss(jnp.asarray(logits), jnp.asarray(ids), reduction="none")
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -np.take_along_axis(log_probs[:, :-1], ids[:, 1:, None], axis=-1)[..., 0]
    assert value.shape == (2, 3)
    assert_close(np.asarray(value), expected, (1e-12, 1e-13), "shift")
