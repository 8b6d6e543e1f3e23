"""GPT-2 and Llama causal LMs against Hugging Face's PyTorch models: logits, loss, gradients, greedy decoding."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

import jaxloss  # noqa: E402
from tests.torch_parity import compare  # noqa: E402
from train.models import generate, load_pretrained  # noqa: E402

V, B, T = 99, 3, 8


def _gpt2(**kw):
    kw = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, **kw}
    kw = {"n_layer": 2, **kw}
    return transformers.GPT2Config(vocab_size=V, n_embd=32, n_head=4, n_positions=32,
                                   attn_implementation="eager", **kw)


def _llama(**kw):
    kw = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "num_key_value_heads": 2, "num_hidden_layers": 2,
          **kw}
    return transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=37,
                                    num_attention_heads=4, max_position_embeddings=64,
                                    attn_implementation="eager", **kw)


def _saved(torch_cls, config, tmp_path):
    torch.manual_seed(0)
    pt = torch_cls(config).eval()
    pt.save_pretrained(tmp_path)
    return pt, load_pretrained(tmp_path)


def _right_padded(seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, V, (B, T)).astype(np.int64)
    mask = np.ones((B, T), np.int64)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    labels = np.where(mask == 1, ids, -100)
    return {"input_ids": ids, "attention_mask": mask}, labels, mask


def _check(report):
    assert report.max_logit_error <= 1e-4
    assert report.loss_rel_error <= 1e-5, (report.loss, report.torch_loss)
    assert abs(report.model_loss - report.torch_loss) <= 1e-5 * abs(report.torch_loss)
    assert not report.missing_grads and not report.extra_grads, (report.missing_grads, report.extra_grads)
    worst = max(report.grad_rel_errors, key=report.grad_rel_errors.get)
    assert report.max_grad_rel_error <= 1e-4, (worst, report.grad_rel_errors[worst])


CASES = {
    "gpt2": (transformers.GPT2LMHeadModel, _gpt2),
    "gpt2_untied": (transformers.GPT2LMHeadModel, lambda: _gpt2(tie_word_embeddings=False, n_layer=1)),
    "llama": (transformers.LlamaForCausalLM, _llama),
    "llama_tied_bias": (transformers.LlamaForCausalLM,
                        lambda: _llama(tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                                       num_key_value_heads=1, head_dim=16, num_hidden_layers=1)),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", ["gpt2", "llama"] + ["gpt2_untied", "llama_tied_bias"])
def test_causal_lm_parity(case, tmp_path):
    torch_cls, make = CASES[case]
    pt, model = _saved(torch_cls, make(), tmp_path)
    batch, labels, mask = _right_padded()
    ids, m = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
    report = compare(pt, model, batch, labels, lambda o: jaxloss.causal_lm_loss(o.logits, ids, attention_mask=m),
                     logits_where=mask[..., None] == 1, model_labels=True)
    _check(report)
    emb = model.output_embedding()
    tied = pt.config.tie_word_embeddings
    assert emb.layout == ("vd" if tied else "dv")
    assert emb.weight.shape == ((V, 32) if tied else (32, V))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["gpt2", "llama"])
def test_greedy_generation_matches_transformers(case, tmp_path):
    torch_cls, make = CASES[case]
    pt, model = _saved(torch_cls, make(), tmp_path)
    rng = np.random.RandomState(7)
    ids = rng.randint(3, V, (2, 5)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # left padding
    ids[mask == 0] = 0
    new = 6
    with torch.no_grad():
        expected = pt.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                               max_new_tokens=new, do_sample=False).numpy()
    ours = np.asarray(generate(model, ids, mask, max_new_tokens=new))
    assert ours.shape == (2, 5 + new)
    np.testing.assert_array_equal(ours[:, : expected.shape[1]], expected)
    assert (ours[:, expected.shape[1]:] == 0).all()  # finished rows continue with padding


@pytest.mark.slow
def test_beam_search_matches_transformers(tmp_path):
    """GPT-2 beam search on a left-padded batch: tokens and ``sequences_scores`` equal Hugging Face's."""
    pt, model = _saved(transformers.GPT2LMHeadModel, _gpt2(initializer_range=0.2), tmp_path)
    rng = np.random.RandomState(7)
    ids = rng.randint(3, V, (2, 5)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    ids[mask == 0] = 0
    new = 6
    greedy = np.asarray(generate(model, ids, mask, max_new_tokens=new))
    differs = False
    for k, early, lp in ((2, False, 0.5), (3, True, 1.0)):
        with torch.no_grad():
            out = pt.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), max_new_tokens=new,
                              do_sample=False, num_beams=k, early_stopping=early, length_penalty=lp,
                              output_scores=True, return_dict_in_generate=True)
        expected = out.sequences.numpy()
        tokens, scores = generate(model, ids, mask, max_new_tokens=new, num_beams=k, early_stopping=early,
                                  length_penalty=lp, return_scores=True)
        tokens = np.asarray(tokens)
        assert tokens.shape == (2, 5 + new)
        np.testing.assert_array_equal(tokens[:, : expected.shape[1]], expected)
        assert (tokens[:, expected.shape[1]:] == 2).all()  # beam fill: eos, as pad is 0
        np.testing.assert_allclose(np.asarray(scores), out.sequences_scores.numpy(), rtol=1e-5, atol=1e-6)
        differs |= not np.array_equal(tokens, greedy)
    assert differs
