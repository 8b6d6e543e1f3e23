"""The training step: exact accumulation, composite weighting, skipped non-finite steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from transformers import BertConfig

import jaxloss
from train import sharding
from train.models import BertMultiTask, from_config
from train.step import make_train_step
from train.tasks import NerTask, RegressTask

ONE = jnp.asarray(1.0, jnp.float32)  # learning-rate multiplier that keeps the optimizer's own step

VOCAB, LENGTH, TAGS = 50, 12, ["O", "B-X", "I-X"]


def _bert_config() -> dict:
    return BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).to_dict()


def _ner_batch(rows: int, seed: int) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, VOCAB, (rows, LENGTH)).astype(np.int32)
    lengths = rng.integers(2, LENGTH + 1, rows)  # very different label counts per row
    mask = (np.arange(LENGTH)[None, :] < lengths[:, None]).astype(np.int32)
    labels = np.where(mask > 0, rng.integers(0, len(TAGS), (rows, LENGTH)), -100).astype(np.int32)
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "labels": jnp.asarray(labels),
            "example_mask": jnp.ones((rows,), bool)}


def _split(model):
    model.train()
    return nnx.split(model, nnx.Param, ...)


def _ner_task() -> NerTask:
    task = NerTask(name="ner", train_file=None, eval_file=None)
    task.labels = list(TAGS)
    return task


def _run_step(grad_accum: int, batch: dict, optimizer=None):
    with sharding.unsharded():
        model = from_config(_bert_config(), "BertForTokenClassification", num_labels=len(TAGS))
    graphdef, params, rest = _split(model)
    task = _ner_task()
    composite = jaxloss.CompositeLoss((jaxloss.Term("ner"),))
    optimizer = optimizer or optax.sgd(0.5)
    step = make_train_step(graphdef, [task], composite, optimizer, grad_accum)
    opt_state = optimizer.init((params, {}))
    new_params, _, _, metrics = jax.jit(step)(params, {}, opt_state, rest, jnp.asarray(0), ONE, {"ner": batch}, jax.random.key(0))
    return params, new_params, metrics


def test_two_micro_batches_equal_one_batch_to_float_rounding():
    batch = _ner_batch(8, seed=0)
    _, one, metrics_one = _run_step(1, batch)
    _, two, metrics_two = _run_step(2, batch)
    np.testing.assert_allclose(float(metrics_two["train/loss"]), float(metrics_one["train/loss"]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    counted = np.asarray(batch["labels"]) != -100
    assert float(metrics_one["train/ner_count"]) == counted.sum()
    # Independent reference: the halves' means weighted by their token counts give the
    # whole batch's mean; the plain mean of the two means (what naive accumulation
    # computes) does not, since the halves hold different numbers of tokens.
    halves = [{k: v[i::2] for k, v in batch.items()} for i in range(2)]  # micro-batch i: rows i, i + 2, ...
    means, counts = zip(*[(float(m["train/loss"]), float(m["train/ner_count"])) for m in (_run_step(1, h)[2] for h in halves)])
    weighted = float(np.dot(means, counts) / np.sum(counts))
    np.testing.assert_allclose(float(metrics_two["train/loss"]), weighted, rtol=1e-6)
    assert counts[0] != counts[1]
    assert abs(np.mean(means) - weighted) > 1e-5


def test_non_finite_loss_skips_the_step():
    with sharding.unsharded():
        model = BertMultiTask(_bert_config(), {"sts": ("regression", 1)}, rngs=nnx.Rngs(0))
    graphdef, params, rest = _split(model)
    task = RegressTask(name="sts", train_file=None, eval_file=None)
    composite = jaxloss.CompositeLoss((jaxloss.Term("sts", kind="regression"),))
    optimizer = optax.adam(1e-2)
    step = jax.jit(make_train_step(graphdef, [task], composite, optimizer, 1))
    opt_state = optimizer.init((params, {}))
    batch = {"input_ids": jnp.ones((4, 6), jnp.int32), "attention_mask": jnp.ones((4, 6), jnp.int32),
             "labels": jnp.array([1.0, jnp.nan, 2.0, 3.0]), "example_mask": jnp.ones((4,), bool)}
    new_params, _, new_opt, metrics = step(params, {}, opt_state, rest, jnp.asarray(0), ONE, {"sts": batch}, jax.random.key(0))
    assert not bool(metrics["train/finite"])
    for a, b in zip(jax.tree.leaves((params, opt_state)), jax.tree.leaves((new_params, new_opt))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    good = {**batch, "labels": jnp.array([1.0, 0.5, 2.0, 3.0])}
    moved, _, _, metrics = step(params, {}, opt_state, rest, jnp.asarray(0), ONE, {"sts": good}, jax.random.key(0))
    assert bool(metrics["train/finite"])
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(moved)))


@pytest.mark.parametrize("balancing", ["static", "uncertainty"])
def test_composite_total_matches_closed_form(balancing):
    with sharding.unsharded():
        model = BertMultiTask(_bert_config(), {"ner": ("token_classification", len(TAGS)), "sts": ("regression", 1)},
                              rngs=nnx.Rngs(0))
    graphdef, params, rest = _split(model)
    ner, sts = _ner_task(), RegressTask(name="sts", train_file=None, eval_file=None)
    composite = jaxloss.CompositeLoss((jaxloss.Term("ner", weight=2.0), jaxloss.Term("sts", weight=0.5, kind="regression")),
                                      balancing=balancing)
    log_vars = {"ner": jnp.asarray(0.3), "sts": jnp.asarray(-0.2)} if balancing == "uncertainty" else {}
    optimizer = optax.sgd(0.0)
    step = jax.jit(make_train_step(graphdef, [ner, sts], composite, optimizer, 2))
    sts_batch = {"input_ids": jnp.ones((8, 6), jnp.int32), "attention_mask": jnp.ones((8, 6), jnp.int32),
                 "labels": jnp.linspace(0.0, 5.0, 8), "example_mask": jnp.ones((8,), bool)}
    _, _, _, metrics = step(params, log_vars, optimizer.init((params, log_vars)), rest, jnp.asarray(0), ONE,
                            {"ner": _ner_batch(8, 1), "sts": sts_batch}, jax.random.key(0))
    l_ner, l_sts = float(metrics["train/ner"]), float(metrics["train/sts"])
    if balancing == "static":
        expected = 2.0 * l_ner + 0.5 * l_sts
    else:
        expected = 2.0 * np.exp(-0.3) * l_ner + 0.15 + 0.5 * 0.5 * np.exp(0.2) * l_sts - 0.1
    np.testing.assert_allclose(float(metrics["train/loss"]), expected, rtol=1e-5)


def test_learning_rate_multiplier_equals_adamw_with_that_rate():
    """make_optimizer's unit-rate AdamW scaled by lr in the step == optax.adamw(lr), masked decay included."""
    from train.optim import decay_mask, make_optimizer

    batch = _ner_batch(8, seed=3)
    with sharding.unsharded():
        model = from_config(_bert_config(), "BertForTokenClassification", num_labels=len(TAGS))
    graphdef, params, rest = _split(model)
    composite = jaxloss.CompositeLoss((jaxloss.Term("ner"),))
    lr = 3e-3
    ours = make_optimizer(weight_decay=0.1, clip_norm=0.0)
    step = jax.jit(make_train_step(graphdef, [_ner_task()], composite, ours, 1))
    got, _, _, _ = step(params, {}, ours.init((params, {})), rest, jnp.asarray(0), jnp.asarray(lr, jnp.float32),
                        {"ner": batch}, jax.random.key(0))
    reference = optax.adamw(lr, weight_decay=0.1, mask=decay_mask)
    ref_step = jax.jit(make_train_step(graphdef, [_ner_task()], composite, reference, 1))
    want, _, _, _ = ref_step(params, {}, reference.init((params, {})), rest, jnp.asarray(0), ONE, {"ner": batch},
                             jax.random.key(0))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_learning_rate_at_equals_optax_schedules(kind):
    from train.optim import learning_rate_at

    horizon, warmup, peak = 50, 7, 2e-3
    decay = {"linear": optax.linear_schedule(peak, 0.0, horizon - warmup),
             "cosine": optax.cosine_decay_schedule(peak, horizon - warmup),
             "constant": optax.constant_schedule(peak)}[kind]
    reference = optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])
    for step in range(horizon + 3):
        np.testing.assert_allclose(learning_rate_at(step, horizon, peak, warmup, kind), float(reference(step)),
                                   rtol=1e-5, atol=1e-9)
