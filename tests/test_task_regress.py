"""The regression task's two pair encodings: settings, the score range and the loss."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from train.data import TextExample
from train.tasks.regress import RegressTask


def _task(**kw) -> RegressTask:
    return RegressTask(name="sts", train_file=None, eval_file=None, text_pair_column="b", **kw)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="pair_encoding='both'"):
        _task(pair_encoding="both")
    with pytest.raises(ValueError, match="needs text pairs.*--text-pair-column"):
        RegressTask(name="sts", train_file=None, eval_file=None, pair_encoding="siamese")
    task = _task(pair_encoding="siamese")
    with pytest.raises(ValueError, match="scores that differ"):
        task.fit_labels([TextExample("a", "b", 2.0, "f.tsv", 1)] * 3)


def test_siamese_scores_map_the_cosine_onto_the_training_range_and_survive_a_reload():
    task = _task(pair_encoding="siamese")
    assert task.head() == ("pair_similarity", 1)
    task.fit_labels([TextExample("a", "b", y, "f.tsv", i) for i, y in enumerate([1.0, 4.5, 2.0])])
    cosine = np.array([[1.0], [0.0], [0.5]], np.float32)
    np.testing.assert_allclose(task.scores(cosine), [4.5, 1.0, 2.75])
    again = _task(pair_encoding="siamese")
    again.load_state(task.state())
    np.testing.assert_allclose(again.scores(cosine), task.scores(cosine))
    with pytest.raises(ValueError, match="score range is not set"):
        _task(pair_encoding="siamese").scores(cosine)


def test_siamese_loss_is_the_mse_of_the_mapped_scores_and_inputs_stack_the_pairs():
    task = _task(pair_encoding="siamese", score_range=(0.0, 5.0))

    class Output:
        logits = jnp.array([[0.2], [0.9], [0.4]], jnp.float32)

    batch = {"labels": jnp.array([1.0, 4.0, 0.0], jnp.float32), "example_mask": jnp.array([True, True, False]),
             "input_ids": jnp.ones((3, 4), jnp.int32), "attention_mask": jnp.ones((3, 4), jnp.int32),
             "pair_input_ids": 2 * jnp.ones((3, 4), jnp.int32), "pair_attention_mask": jnp.ones((3, 4), jnp.int32)}
    total, count = task.loss(Output(), batch)
    assert float(count) == 2.0
    np.testing.assert_allclose(float(total), (1.0 - 1.0) ** 2 + (4.5 - 4.0) ** 2, rtol=1e-6)
    inputs = task.model_inputs(None, batch)
    assert inputs["input_ids"].shape == (6, 4) and int(inputs["input_ids"][3, 0]) == 2
    assert set(inputs) == {"input_ids", "attention_mask"}
    cross = _task()
    assert cross.head() == ("regression", 1) and "pair_input_ids" not in cross.model_inputs(None, batch)
