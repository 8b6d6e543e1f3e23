"""A causal-LM head on the shared BERT trunk only looks back."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx
from transformers import BertConfig

from train import sharding
from train.models import BertMultiTask


def test_causal_head_ignores_later_tokens():
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32).to_dict()
    with sharding.unsharded():
        model = BertMultiTask(cfg, {"lm": ("causal_lm", 0), "ner": ("token_classification", 3)}, rngs=nnx.Rngs(0))
    model.eval()
    ids = jnp.array([[5, 6, 7, 8, 9, 10]])
    changed = ids.at[0, 4].set(30)
    lm = np.asarray(model(input_ids=ids, heads=("lm",))["lm"].logits)
    lm_changed = np.asarray(model(input_ids=changed, heads=("lm",))["lm"].logits)
    np.testing.assert_allclose(lm[0, :4], lm_changed[0, :4], rtol=1e-5, atol=1e-6)  # the past is unchanged
    assert not np.allclose(lm[0, 4:], lm_changed[0, 4:])
    ner = np.asarray(model(input_ids=ids, heads=("ner",))["ner"].logits)
    ner_changed = np.asarray(model(input_ids=changed, heads=("ner",))["ner"].logits)
    assert not np.allclose(ner[0, :4], ner_changed[0, :4])  # the encoder heads see both directions
    assert lm.shape == (1, 6, 40)
