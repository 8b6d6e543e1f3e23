"""Greedy decoding and beam search (train.models.generation) against Hugging Face's ``generate``.

A tiny random BART with a peaked output distribution (``init_std=0.2``) and a raised
``final_logits_bias`` at ``eos`` so that hypotheses finish at different lengths: beam search
then differs from greedy decoding, and ``early_stopping`` / ``length_penalty`` change results.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from train.models import generate_seq2seq, load_pretrained  # noqa: E402
from train.models.generation import SearchConfig, search_config  # noqa: E402

V, B, S = 99, 3, 9
PAD, EOS, START = 1, 2, 2
NEW = 10


def _config(**kw):
    return transformers.BartConfig(
        vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=64,
        pad_token_id=PAD, bos_token_id=0, eos_token_id=EOS, decoder_start_token_id=START, forced_bos_token_id=None,
        forced_eos_token_id=None, scale_embedding=False, init_std=0.2, attn_implementation="eager", **kw)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    pt = transformers.BartForConditionalGeneration(_config()).eval()
    with torch.no_grad():
        pt.final_logits_bias.copy_(0.5 * torch.randn_like(pt.final_logits_bias))
        pt.final_logits_bias[0, EOS] = 3.0
    folder = tmp_path_factory.mktemp("bart_gen")
    pt.save_pretrained(folder)
    return pt, load_pretrained(folder)


def _batch():
    rng = np.random.RandomState(4)
    ids = rng.randint(3, V, (B, S)).astype(np.int64)
    mask = np.ones((B, S), np.int64)
    mask[1, 6:] = 0
    mask[2, 4:] = 0
    ids[mask == 0] = PAD
    return ids, mask


def _hf(pt, ids, mask, **kw):
    with torch.no_grad():
        out = pt.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), do_sample=False,
                          max_new_tokens=NEW, output_scores=True, return_dict_in_generate=True, **kw)
    scores = None if out.get("sequences_scores") is None else out.sequences_scores.numpy()
    return out.sequences.numpy(), scores


def _assert_same(ours, expected, fill):
    """Hugging Face stops when every row is done: its output is a prefix, the rest is ``fill``."""
    ours = np.asarray(ours)
    assert ours.shape == (expected.shape[0], 1 + NEW)
    np.testing.assert_array_equal(ours[:, : expected.shape[1]], expected)
    assert (ours[:, expected.shape[1]:] == fill).all()


# (num_beams, early_stopping, length_penalty): early_stopping True vs False differ at (4, 1.0),
# "never" vs False at (2, 2.0) for this model (asserted below, from Hugging Face's outputs).
CASES = [(2, False, 2.0), (2, "never", 2.0), (4, True, 1.0), (4, False, -0.5)]


@pytest.mark.slow
def test_beam_search_matches_transformers(saved):
    pt, model = saved
    ids, mask = _batch()
    greedy, _ = _hf(pt, ids, mask, num_beams=1)
    _assert_same(generate_seq2seq(model, ids, mask, max_new_tokens=NEW), greedy, PAD)
    results = {}
    for k, early, lp in CASES:
        expected, expected_scores = _hf(pt, ids, mask, num_beams=k, early_stopping=early, length_penalty=lp)
        tokens, scores = generate_seq2seq(model, ids, mask, max_new_tokens=NEW, num_beams=k, early_stopping=early,
                                          length_penalty=lp, return_scores=True)
        _assert_same(tokens, expected, PAD)
        np.testing.assert_allclose(np.asarray(scores), expected_scores, rtol=1e-5, atol=1e-6)
        results[k, early, lp] = np.asarray(tokens)
    # the cases exercise what they are meant to: beams beat greedy, finished hypotheses end early,
    # and the stopping rule matters
    assert any(not np.array_equal(t[:, : greedy.shape[1]], greedy) for t in results.values())
    assert any((t[:, 1:-1] == EOS).any() for t in results.values())
    early_off, _ = _hf(pt, ids, mask, num_beams=4, early_stopping=False, length_penalty=1.0)
    assert not np.array_equal(results[4, True, 1.0][:, : early_off.shape[1]], early_off)
    assert not np.array_equal(results[2, "never", 2.0], results[2, False, 2.0])


@pytest.mark.slow
def test_logits_processors_match_transformers(saved):
    """forced_bos / forced_eos / min_length / min_new_tokens / bad_words_ids / suppress_tokens, greedy and beams."""
    pt, model = saved
    ids, mask = _batch()
    plain, _ = _hf(pt, ids, mask, num_beams=2)
    options = [
        # ban the tokens the plain search starts with: the result must change
        {"bad_words_ids": [[int(plain[0, 1])], [EOS]], "suppress_tokens": [int(plain[1, 1])], "min_new_tokens": 4,
         "forced_eos_token_id": EOS},
        {"forced_bos_token_id": 7, "min_length": 6},
    ]
    for opts, beams in zip(options, [(1, 2), (2,)]):
        for k in beams:
            expected, expected_scores = _hf(pt, ids, mask, num_beams=k, **opts)
            assert not np.array_equal(expected[:, : plain.shape[1]], plain[:, : expected.shape[1]])
            tokens, scores = generate_seq2seq(model, ids, mask, max_new_tokens=NEW, num_beams=k, return_scores=True,
                                              **opts)
            _assert_same(tokens, expected, PAD)
            if k > 1:
                np.testing.assert_allclose(np.asarray(scores), expected_scores, rtol=1e-5, atol=1e-6)


def test_options_from_the_config_and_errors(saved):
    _, model = saved
    cfg = dict(model.config)
    base = {"max_new_tokens": 4, "num_beams": 2, "length_penalty": None, "early_stopping": None, "eos": (EOS,),
            "pad": PAD, "prompt_len": 1}
    got = search_config({**cfg, "forced_eos_token_id": 2, "length_penalty": 2.0, "early_stopping": True,
                         "bad_words_ids": [[5], [EOS]]}, {}, **base)
    assert got == SearchConfig(max_new_tokens=4, num_beams=2, length_penalty=2.0, early_stopping=True, eos=(EOS,),
                               pad=PAD, forced_eos_token_id=(2,), banned=(5,))
    # a call-time override switches a config's option off
    off = search_config({**cfg, "forced_eos_token_id": 2}, {"forced_eos_token_id": None}, **base)
    assert off.forced_eos_token_id is None
    with pytest.raises(ValueError, match="no_repeat_ngram_size=3"):
        search_config({**cfg, "no_repeat_ngram_size": 3}, {}, **base)
    assert search_config({**cfg, "no_repeat_ngram_size": 3}, {"no_repeat_ngram_size": 0}, **base).num_beams == 2
    with pytest.raises(ValueError, match="repetition_penalty"):
        generate_seq2seq(model, np.array([[5, 6]]), max_new_tokens=2, repetition_penalty=1.2)
    with pytest.raises(ValueError, match="unknown generation option"):
        generate_seq2seq(model, np.array([[5, 6]]), max_new_tokens=2, top_q=0.5)
    with pytest.raises(ValueError, match="longer than one token"):
        generate_seq2seq(model, np.array([[5, 6]]), max_new_tokens=2, bad_words_ids=[[5, 6]])
    with pytest.raises(ValueError, match="num_beams"):
        generate_seq2seq(model, np.array([[5, 6]]), max_new_tokens=2, num_beams=0)
    with pytest.raises(ValueError, match="early_stopping"):
        generate_seq2seq(model, np.array([[5, 6]]), max_new_tokens=2, num_beams=2, early_stopping="sometimes")
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_seq2seq(model, np.array([[5, 6]]), max_new_tokens=0)
