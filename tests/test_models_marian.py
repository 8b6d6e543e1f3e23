"""Marian against Hugging Face's PyTorch ``MarianMTModel``: logits, loss, gradients, checkpoints, decoding."""

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
    MarianModel,
    MarianMTModel,
    generate_seq2seq,
    load_pretrained,
    read_tensors,
    save_pretrained,
    state_dict,
)
from train.models.bart import sinusoidal_positions  # noqa: E402

V, B, S, T, D = 99, 3, 9, 7, 32
PAD, EOS = V - 1, 0  # Marian: pad is the last id and the decoder start, eos is 0
POSITIONS = ["model.decoder.embed_positions.weight", "model.encoder.embed_positions.weight"]


def _config(**kw):
    kw = {"scale_embedding": True, **kw}
    return transformers.MarianConfig(
        vocab_size=V, d_model=D, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=64,
        pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD, forced_eos_token_id=None,
        attn_implementation="eager", **kw)


def _save(tmp_path_factory, eos_bias=None, **kw):
    """A random PyTorch Marian (non-zero ``final_logits_bias``) saved to a folder, and ours loaded from it."""
    torch.manual_seed(0)
    pt = transformers.MarianMTModel(_config(**kw)).eval()
    with torch.no_grad():
        pt.final_logits_bias.copy_(0.5 * torch.randn_like(pt.final_logits_bias))
        if eos_bias is not None:
            pt.final_logits_bias[0, EOS] = eos_bias
    folder = tmp_path_factory.mktemp("marian")
    pt.save_pretrained(folder)
    return pt, load_pretrained(folder), folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return _save(tmp_path_factory)


@pytest.fixture(scope="module")
def peaked(tmp_path_factory):
    """Peaked output distributions and a likely ``eos``: hypotheses end at different lengths."""
    return _save(tmp_path_factory, eos_bias=3.0, init_std=0.2)


def _batch(seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(1, V - 1, (B, S)).astype(np.int64)
    mask = np.ones((B, S), np.int64)
    mask[1, 6:] = 0
    mask[2, 4:] = 0
    ids[mask == 0] = PAD
    labels = rng.randint(1, V - 1, (B, T)).astype(np.int64)
    labels[:, -1] = EOS
    labels[0, 5:] = -100
    labels[2, 3:] = -100
    return {"input_ids": ids, "attention_mask": mask}, labels


def _check(report):
    assert report.max_logit_error <= 1e-4
    assert report.loss_rel_error <= 1e-5, (report.loss, report.torch_loss)
    assert abs(report.model_loss - report.torch_loss) <= 1e-5 * abs(report.torch_loss)
    # the sinusoidal tables are frozen PyTorch parameters (no gradient) and no parameters here;
    # final_logits_bias is a PyTorch buffer, here a parameter with zero gradient
    assert report.missing_grads == POSITIONS and report.extra_grads == ["final_logits_bias"]
    worst = max(report.grad_rel_errors, key=report.grad_rel_errors.get)
    assert report.max_grad_rel_error <= 1e-4, (worst, report.grad_rel_errors[worst])
    assert "model.shared.weight" in report.grad_rel_errors


def test_positions_equal_transformers_table(saved):
    pt, model, _ = saved
    assert isinstance(model, MarianMTModel)
    np.testing.assert_array_equal(sinusoidal_positions(64, D), pt.model.encoder.embed_positions.weight.numpy())
    odd = transformers.models.marian.modeling_marian.MarianSinusoidalPositionalEmbedding(10, 7)
    np.testing.assert_array_equal(sinusoidal_positions(10, 7), odd.create_weight().numpy())


@pytest.mark.slow
def test_parity_labels_only(saved):
    """Decoder inputs ``shift_tokens_right(labels)`` (from the pad id) on both sides; padded encoder input."""
    pt, model, _ = saved
    batch, labels = _batch()
    flat = jnp.asarray(labels).reshape(-1)
    _check(compare(pt, model, batch, labels, lambda o: jaxloss.cross_entropy(o.logits.reshape(-1, V), flat),
                   model_labels=True))


@pytest.mark.slow
def test_parity_decoder_inputs_and_padding(saved):
    pt, model, _ = saved
    batch, labels = _batch(1)
    dec_mask = (labels != -100).astype(np.int64)
    dec_ids = np.where(dec_mask == 1, np.random.RandomState(3).randint(1, V - 1, labels.shape), PAD).astype(np.int64)
    batch = {**batch, "decoder_input_ids": dec_ids, "decoder_attention_mask": dec_mask}
    flat = jnp.asarray(labels).reshape(-1)
    _check(compare(pt, model, batch, labels, lambda o: jaxloss.cross_entropy(o.logits.reshape(-1, V), flat),
                   model_labels=True))


def test_trunk_matches_transformers(saved):
    pt, _, folder = saved
    trunk = load_pretrained(folder, "MarianModel")
    assert isinstance(trunk, MarianModel)
    batch, labels = _batch()
    dec = np.where(labels == -100, PAD, labels)
    with torch.no_grad():
        expected = pt.model(**{k: torch.as_tensor(v) for k, v in batch.items()},
                            decoder_input_ids=torch.as_tensor(dec)).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(trunk(**batch, decoder_input_ids=dec).last_hidden_state), expected,
                               atol=1e-5, rtol=0)


def test_save_pretrained_round_trip(saved, tmp_path):
    pt, model, _ = saved
    save_pretrained(model, tmp_path)
    assert not any("embed_positions" in k for k in read_tensors(tmp_path))  # recomputed, as Hugging Face saves
    back = transformers.MarianMTModel.from_pretrained(tmp_path).eval()
    want, got = pt.state_dict(), back.state_dict()
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    batch, labels = _batch()
    tb = {k: torch.as_tensor(v) for k, v in batch.items()}
    with torch.no_grad():  # (equal up to the attention kernel Hugging Face picks when loading)
        np.testing.assert_allclose(back(**tb, labels=torch.as_tensor(labels)).logits.numpy(),
                                   pt(**tb, labels=torch.as_tensor(labels)).logits.numpy(), atol=1e-6, rtol=0)


def test_loads_checkpoints_that_store_positions_and_tied_copies(saved, tmp_path):
    import shutil

    from safetensors.numpy import save_file

    pt, model, folder = saved
    tensors = read_tensors(folder)
    for name in ("lm_head.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"):
        tensors[name] = tensors["model.shared.weight"]
    for name in POSITIONS:
        tensors[name] = np.zeros((64, D), np.float32)  # ignored: the table is recomputed
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    again = load_pretrained(tmp_path)
    for name, value in state_dict(model).items():
        np.testing.assert_array_equal(state_dict(again)[name], value)
    batch, _ = _batch()
    np.testing.assert_array_equal(np.asarray(again(**batch).logits), np.asarray(model(**batch).logits))


@pytest.mark.slow
def test_generation_matches_transformers(peaked):
    pt, model, _ = peaked
    batch, _ = _batch(4)
    new = 8
    greedy = None
    differs = False
    for k, early in ((1, False), (2, True), (4, False)):
        with torch.no_grad():
            out = pt.generate(input_ids=torch.as_tensor(batch["input_ids"]),
                              attention_mask=torch.as_tensor(batch["attention_mask"]), max_new_tokens=new,
                              do_sample=False, num_beams=k, early_stopping=early, output_scores=True,
                              return_dict_in_generate=True)
        expected = out.sequences.numpy()
        tokens, scores = generate_seq2seq(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=new,
                                          num_beams=k, early_stopping=early, return_scores=True)
        tokens = np.asarray(tokens)
        assert tokens.shape == (B, 1 + new) and (tokens[:, 0] == PAD).all()  # decoder start: the pad id
        np.testing.assert_array_equal(tokens[:, : expected.shape[1]], expected)
        # after eos: pad (greedy), Hugging Face's beam fill (pad, as it is not 0)
        assert (tokens[:, expected.shape[1]:] == PAD).all()
        if k == 1:
            greedy = expected
        else:
            np.testing.assert_allclose(np.asarray(scores), out.sequences_scores.numpy(), rtol=1e-5, atol=1e-6)
            differs |= not np.array_equal(tokens[:, : greedy.shape[1]], greedy)
    assert differs  # beam search found something greedy decoding did not


def test_unsupported_configs():
    with pytest.raises(ValueError, match="share_encoder_decoder_embeddings"):
        MarianMTModel(_config(share_encoder_decoder_embeddings=False).to_dict(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        MarianMTModel(_config(tie_word_embeddings=False).to_dict(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="decoder_vocab_size"):
        MarianMTModel({**_config().to_dict(), "decoder_vocab_size": 50}, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="layerdrop"):
        MarianMTModel(_config(decoder_layerdrop=0.1).to_dict(), rngs=nnx.Rngs(0))
