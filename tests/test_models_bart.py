"""BART against Hugging Face's PyTorch model: logits, loss, gradients, checkpoints, greedy decoding."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import jaxloss  # noqa: E402
from tests.torch_parity import compare  # noqa: E402
from train.models import (  # noqa: E402
    BartForConditionalGeneration,
    BartModel,
    generate_seq2seq,
    load_pretrained,
    read_tensors,
    save_pretrained,
    state_dict,
)
from train.models.bart import shift_tokens_right  # noqa: E402

V, B, S, T = 99, 3, 9, 7
PAD = 1


def _config(**kw):
    kw = {"scale_embedding": False, **kw}
    return transformers.BartConfig(
        vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=64,
        pad_token_id=PAD, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=None,
        forced_eos_token_id=None, attn_implementation="eager", **kw)


def _save(tmp_path_factory, **kw):
    """A random PyTorch BART (non-zero ``final_logits_bias``) saved to a folder, and our model loaded from it."""
    torch.manual_seed(0)
    pt = transformers.BartForConditionalGeneration(_config(**kw)).eval()
    with torch.no_grad():
        pt.final_logits_bias.copy_(0.5 * torch.randn_like(pt.final_logits_bias))
    folder = tmp_path_factory.mktemp("bart")
    pt.save_pretrained(folder)
    return pt, load_pretrained(folder), folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return _save(tmp_path_factory)


@pytest.fixture(scope="module")
def saved_scaled(tmp_path_factory):
    """``scale_embedding=True`` (token embeddings times sqrt(d_model))."""
    return _save(tmp_path_factory, scale_embedding=True)


def _batch(seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, V, (B, S)).astype(np.int64)
    mask = np.ones((B, S), np.int64)
    mask[1, 6:] = 0
    mask[2, 4:] = 0
    ids[mask == 0] = PAD
    labels = rng.randint(3, V, (B, T)).astype(np.int64)
    labels[:, -1] = 2
    labels[0, 5:] = -100
    labels[2, 3:] = -100
    return {"input_ids": ids, "attention_mask": mask}, labels


def _check(report):
    assert report.max_logit_error <= 1e-4
    assert report.loss_rel_error <= 1e-5, (report.loss, report.torch_loss)
    assert abs(report.model_loss - report.torch_loss) <= 1e-5 * abs(report.torch_loss)
    # final_logits_bias is a buffer in PyTorch (no gradient); here a parameter with zero gradient.
    assert not report.missing_grads and report.extra_grads == ["final_logits_bias"]
    worst = max(report.grad_rel_errors, key=report.grad_rel_errors.get)
    assert report.max_grad_rel_error <= 1e-4, (worst, report.grad_rel_errors[worst])
    assert "model.shared.weight" in report.grad_rel_errors


@pytest.mark.slow
def test_parity_labels_only(saved):
    """Decoder inputs from ``shift_tokens_right(labels)`` on both sides; padded encoder input."""
    pt, model, _ = saved
    batch, labels = _batch()
    flat = jnp.asarray(labels).reshape(-1)
    report = compare(pt, model, batch, labels,
                     lambda o: jaxloss.cross_entropy(o.logits.reshape(-1, V), flat), model_labels=True)
    _check(report)


@pytest.mark.slow
def test_parity_decoder_inputs_and_padding(saved_scaled):
    """Explicit ``decoder_input_ids`` with a right-padded ``decoder_attention_mask``, scaled embeddings."""
    pt, model, _ = saved_scaled
    batch, labels = _batch(1)
    dec_mask = (labels != -100).astype(np.int64)
    dec_ids = np.where(dec_mask == 1, np.random.RandomState(3).randint(3, V, labels.shape), PAD).astype(np.int64)
    batch = {**batch, "decoder_input_ids": dec_ids, "decoder_attention_mask": dec_mask}
    flat = jnp.asarray(labels).reshape(-1)
    report = compare(pt, model, batch, labels,
                     lambda o: jaxloss.cross_entropy(o.logits.reshape(-1, V), flat), model_labels=True)
    _check(report)


def test_final_logits_bias_has_zero_gradient_and_fused_head(saved):
    _, model, _ = saved
    batch, labels = _batch()

    h = jnp.asarray(np.random.RandomState(0).randn(2, 3, 32).astype(np.float32))
    # Every logit goes through output_embedding(): the bias is added there, with a zero gradient.
    grads = nnx.grad(lambda m: jnp.sum(m.output_embedding().logits(h) ** 2))(model)
    g = state_dict(model, grads)
    assert np.all(g["final_logits_bias"] == 0) and np.any(g["model.shared.weight"] != 0)
    out = nnx.jit(lambda m, b, y: m(**b, labels=y))(model, batch, labels)
    emb = model.output_embedding()
    assert emb.layout == "vd" and emb.weight.shape == (V, 32) and emb.bias.shape == (V,)
    np.testing.assert_allclose(np.asarray(emb.logits(out.prelogits)), np.asarray(out.logits), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.prelogits), np.asarray(out.last_hidden_state))
    fused = jaxloss.linear_cross_entropy(out.prelogits.reshape(-1, 32), emb.weight, jnp.asarray(labels).reshape(-1),
                                         bias=emb.bias, weight_layout=emb.layout)
    np.testing.assert_allclose(float(fused), float(out.loss), rtol=1e-5)


def test_trunk_and_shift_match_transformers(saved):
    pt, _, folder = saved
    trunk = load_pretrained(folder, "BartModel")
    assert isinstance(trunk, BartModel)
    batch, _ = _batch()
    with torch.no_grad():
        expected = pt.model(**{k: torch.as_tensor(v) for k, v in batch.items()}).last_hidden_state.numpy()
    ours = np.asarray(trunk(**batch).last_hidden_state)  # decoder inputs: input_ids shifted right
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)
    _, labels = _batch(2)
    from transformers.models.bart.modeling_bart import shift_tokens_right as pt_shift

    np.testing.assert_array_equal(np.asarray(shift_tokens_right(labels, PAD, 2)),
                                  pt_shift(torch.as_tensor(labels), PAD, 2).numpy())


def test_save_pretrained_round_trip(saved, tmp_path):
    pt, model, _ = saved
    assert isinstance(model, BartForConditionalGeneration)
    save_pretrained(model, tmp_path)
    back = transformers.BartForConditionalGeneration.from_pretrained(tmp_path).eval()
    want = pt.state_dict()
    got = back.state_dict()
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    assert back.lm_head.weight.data_ptr() == back.model.shared.weight.data_ptr()


def test_loads_checkpoints_that_store_tied_copies(saved, tmp_path):
    """Older BART checkpoints also store the tied ``embed_tokens`` and ``lm_head`` copies."""
    import shutil

    from safetensors.numpy import save_file

    _, model, folder = saved
    tensors = read_tensors(folder)
    for name in ("lm_head.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"):
        tensors[name] = tensors["model.shared.weight"]
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    again = state_dict(load_pretrained(tmp_path))
    for name, value in state_dict(model).items():
        np.testing.assert_array_equal(again[name], value)


@pytest.mark.slow
def test_greedy_generation_matches_transformers(saved):
    pt, model, _ = saved
    batch, _ = _batch(4)
    new = 8
    with torch.no_grad():
        expected = pt.generate(input_ids=torch.as_tensor(batch["input_ids"]),
                               attention_mask=torch.as_tensor(batch["attention_mask"]), max_new_tokens=new,
                               do_sample=False, num_beams=1, no_repeat_ngram_size=0, min_length=0).numpy()
    ours = np.asarray(generate_seq2seq(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=new))
    assert ours.shape == (B, 1 + new)
    np.testing.assert_array_equal(ours[:, : expected.shape[1]], expected)
    assert (ours[:, expected.shape[1]:] == PAD).all()


def test_bad_inputs(saved):
    _, model, _ = saved
    batch, labels = _batch()
    with pytest.raises(ValueError, match="attention_mask"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"][:, :4], labels=labels)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(input_ids=np.full((1, 80), 5), labels=np.full((1, 3), 5))
    with pytest.raises(ValueError, match="layerdrop"):
        BartForConditionalGeneration(_config(encoder_layerdrop=0.1).to_dict(), rngs=nnx.Rngs(0))
