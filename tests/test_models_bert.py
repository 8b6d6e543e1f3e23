"""BERT encoders and heads against Hugging Face's PyTorch models: logits, loss and every gradient."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import jaxloss  # noqa: E402
from tests.torch_parity import compare  # noqa: E402
from train.models import BertMultiTask, load_multitask, load_pretrained, save_pretrained  # noqa: E402

V, B, T = 99, 3, 9


def _config(**kw):
    kw = {"num_hidden_layers": 1, **kw}
    return transformers.BertConfig(vocab_size=V, hidden_size=32, num_attention_heads=4,
                                   intermediate_size=37, max_position_embeddings=64, attn_implementation="eager", **kw)


def _batch(seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(1, V, (B, T)).astype(np.int64)
    mask = np.ones((B, T), np.int64)
    mask[1, 6:] = 0
    mask[2, 4:] = 0
    ids[mask == 0] = 0
    types = np.zeros((B, T), np.int64)
    types[:, 3:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}, mask


def _saved(torch_cls, tmp_path, **cfg):
    torch.manual_seed(0)
    pt = torch_cls(_config(**cfg)).eval()
    pt.save_pretrained(tmp_path)
    return pt, load_pretrained(tmp_path)


def _check(report, *, logit_tol=1e-4):
    assert report.max_logit_error <= logit_tol
    assert report.loss_rel_error <= 1e-5, (report.loss, report.torch_loss)
    if report.model_loss is not None:  # the head's own loss from labels=
        assert abs(report.model_loss - report.torch_loss) <= 1e-5 * abs(report.torch_loss)
    assert not report.missing_grads and not report.extra_grads, (report.missing_grads, report.extra_grads)
    worst = max(report.grad_rel_errors, key=report.grad_rel_errors.get)
    assert report.max_grad_rel_error <= 1e-4, (worst, report.grad_rel_errors[worst])


@pytest.mark.slow
def test_sequence_classification(tmp_path):
    pt, model = _saved(transformers.BertForSequenceClassification, tmp_path, num_labels=3, num_hidden_layers=2)
    assert type(model).__name__ == "BertForSequenceClassification"
    batch, _ = _batch()
    labels = np.array([0, 2, 1])
    report = compare(pt, model, batch, labels, lambda o: jaxloss.cross_entropy(o.logits, jnp.asarray(labels)),
                     model_labels=True)
    _check(report)


@pytest.mark.slow
def test_regression(tmp_path):
    pt, model = _saved(transformers.BertForSequenceClassification, tmp_path, num_labels=1, problem_type="regression")
    batch, _ = _batch(1)
    labels = np.array([0.5, -1.0, 2.0], np.float32)
    report = compare(pt, model, batch, labels, lambda o: jaxloss.mse_loss(o.logits[:, 0], jnp.asarray(labels)),
                     model_labels=True)
    _check(report)


@pytest.mark.slow
def test_token_classification(tmp_path):
    pt, model = _saved(transformers.BertForTokenClassification, tmp_path, num_labels=5)
    batch, mask = _batch(2)
    labels = np.random.RandomState(3).randint(0, 5, (B, T)).astype(np.int64)
    labels[mask == 0] = -100
    labels[0, 0] = -100
    report = compare(pt, model, batch, labels, lambda o: jaxloss.cross_entropy(o.logits, jnp.asarray(labels)),
                     logits_where=mask[..., None] == 1, model_labels=True)
    _check(report)


@pytest.mark.slow
def test_masked_lm_tied_to_embeddings(tmp_path):
    pt, model = _saved(transformers.BertForMaskedLM, tmp_path)
    batch, mask = _batch(4)
    rng = np.random.RandomState(5)
    labels = np.where((rng.rand(B, T) < 0.4) & (mask == 1), batch["input_ids"], -100)
    labels[0, 1] = batch["input_ids"][0, 1]
    report = compare(pt, model, batch, labels, lambda o: jaxloss.cross_entropy(o.logits, jnp.asarray(labels)),
                     logits_where=mask[..., None] == 1, model_labels=True)
    _check(report)
    # the output embedding is the word-embedding table, and logits = prelogits @ W^T + b
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    out, emb = nnx.jit(lambda m, b: (m(**b), m.output_embedding()))(model, jb)
    assert emb.layout == "vd" and emb.weight.shape == (V, 32)
    np.testing.assert_array_equal(np.asarray(emb.weight), pt.bert.embeddings.word_embeddings.weight.detach().numpy())
    np.testing.assert_allclose(np.asarray(emb.logits(out.prelogits)), np.asarray(out.logits), atol=1e-5)
    assert nnx.eval_shape(lambda m: m(**jb, compute_logits=False), model).logits is None


@pytest.mark.slow
def test_save_pretrained_round_trip_loads_in_transformers(tmp_path):
    pt, model = _saved(transformers.BertForMaskedLM, tmp_path / "a")
    save_pretrained(model, tmp_path / "b")
    back = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "b", attn_implementation="eager").eval()
    assert type(back).__name__ == "BertForMaskedLM"
    original = pt.state_dict()
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    batch, _ = _batch()
    with torch.no_grad():
        a = pt(**{k: torch.as_tensor(v) for k, v in batch.items()}).logits
        b = back(**{k: torch.as_tensor(v) for k, v in batch.items()}).logits
    assert torch.equal(a, b)


@pytest.mark.slow
def test_multitask_trunk_and_heads(tmp_path):
    pt, _ = _saved(transformers.BertForMaskedLM, tmp_path)
    heads = {"ner": ("token_classification", 5), "sentiment": ("sequence_classification", 2),
             "similarity": ("regression", 1), "mlm": ("mlm", 0)}
    model = load_multitask(tmp_path, heads)
    assert isinstance(model, BertMultiTask)
    batch, mask = _batch()
    outs = nnx.jit(lambda m, b: m(**b))(model, {k: jnp.asarray(v) for k, v in batch.items()})
    assert {k: v.logits.shape for k, v in outs.items()} == {
        "mlm": (B, T, V), "ner": (B, T, 5), "sentiment": (B, 2), "similarity": (B, 1)}
    # the shared trunk and the MLM head are the checkpoint's
    with torch.no_grad():
        t_logits = pt(**{k: torch.as_tensor(v) for k, v in batch.items()}).logits.numpy()
    err = np.abs(np.asarray(outs["mlm"].logits) - t_logits)[mask == 1].max()
    assert err <= 1e-4
    # one composite loss over all heads differentiates through the shared trunk

    def total(m):
        o = m(**batch)
        return (jaxloss.cross_entropy(o["ner"].logits, jnp.zeros((B, T), jnp.int32))
                + jaxloss.cross_entropy(o["sentiment"].logits, jnp.array([0, 1, 0]))
                + jaxloss.mse_loss(o["similarity"].logits[:, 0], jnp.ones((B,), jnp.float32)))

    grads = nnx.jit(nnx.grad(total))(model)
    assert float(jnp.abs(grads["bert"]["embeddings"]["word"]["embedding"][...]).sum()) > 0
    assert float(jnp.abs(grads["heads"]["mlm"]["bias"][...]).sum()) == 0.0


def test_pair_similarity_head_is_the_cosine_of_masked_means():
    """Against float64 numpy: the first B rows are the first texts, the next B their pairs."""
    from train.models.heads import PairSimilarityHead

    rng = np.random.default_rng(0)
    h = rng.normal(size=(6, 5, 8)).astype(np.float32)
    mask = np.ones((6, 5), np.int32)
    mask[1, 3:] = 0
    mask[4, 1:] = 0
    got = np.asarray(PairSimilarityHead()(jnp.asarray(h), jnp.asarray(mask)))
    mean = (h.astype(np.float64) * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    u, v = mean[:3], mean[3:]
    want = (u * v).sum(-1) / np.linalg.norm(u, axis=-1) / np.linalg.norm(v, axis=-1)
    np.testing.assert_allclose(got[:, 0], want, rtol=1e-5, atol=1e-6)
    # a filler row (all padding) scores 0, and its gradient is finite (it is masked out of a loss)
    empty = mask.copy()
    empty[[2, 5]] = 0
    grad = jax.grad(lambda x: jnp.sum(PairSimilarityHead()(x, jnp.asarray(empty))[:2]))(jnp.asarray(h))
    assert np.isfinite(np.asarray(grad)).all()
    assert float(PairSimilarityHead()(jnp.asarray(h), jnp.asarray(empty))[2, 0]) == 0.0
    with pytest.raises(ValueError, match=r"even number of rows.*\(5, 5, 8\)"):
        PairSimilarityHead()(jnp.asarray(h[:5]), None)


def test_multitask_pair_similarity_head():
    """A siamese head on the shared trunk scores a text against itself 1 and is symmetric."""
    model = BertMultiTask(_config().to_dict(), {"sts": ("pair_similarity", 1)}, rngs=nnx.Rngs(0))
    model.eval()
    batch, mask = _batch()
    ids, m = jnp.asarray(batch["input_ids"]), jnp.asarray(mask)
    swapped = jnp.concatenate([ids[1:2], ids[0:1]]), jnp.concatenate([m[1:2], m[0:1]])
    same = model(input_ids=jnp.concatenate([ids, ids]), attention_mask=jnp.concatenate([m, m]))["sts"].logits
    np.testing.assert_allclose(np.asarray(same), 1.0, rtol=1e-5)
    pair = model(input_ids=ids[:2], attention_mask=m[:2])["sts"].logits
    back = model(input_ids=swapped[0], attention_mask=swapped[1])["sts"].logits
    np.testing.assert_allclose(np.asarray(pair), np.asarray(back), rtol=1e-6)
    assert float(pair[0, 0]) < 0.999
    with pytest.raises(ValueError, match="num_labels=2"):
        BertMultiTask(_config().to_dict(), {"sts": ("pair_similarity", 2)}, rngs=nnx.Rngs(0))


def test_gelu_erf_equals_the_float64_closed_form_and_torch_with_its_gradient():
    """``gelu_erf`` (BERT's ``hidden_act="gelu"``) against x Phi(x) in float64 (``math.erf``)
    and PyTorch's ``F.gelu``, values and gradients, over the range activations take."""
    import math

    import torch
    import torch.nn.functional as F

    from train.models.layers import ACTIVATIONS, gelu_erf

    assert ACTIVATIONS["gelu"] is gelu_erf
    x = np.concatenate([np.linspace(-12, 12, 4001), np.random.default_rng(0).normal(size=2000) * 3]).astype(np.float32)
    x64 = x.astype(np.float64)
    erf = np.vectorize(math.erf)(x64 / math.sqrt(2))
    value64 = 0.5 * x64 * (1 + erf)
    grad64 = 0.5 * (1 + erf) + x64 * np.exp(-0.5 * x64**2) / math.sqrt(2 * math.pi)
    value, grad = jax.vmap(jax.value_and_grad(gelu_erf))(jnp.asarray(x))
    tx = torch.tensor(x, requires_grad=True)
    torch_value = F.gelu(tx)
    torch_value.sum().backward()
    scale = np.maximum(np.abs(x64), 1.0)
    assert np.all(np.abs(np.asarray(value) - value64) <= 4e-7 * scale)
    assert np.all(np.abs(np.asarray(grad) - grad64) <= 1e-6)
    assert np.all(np.abs(np.asarray(value) - torch_value.detach().numpy()) <= 3e-7 * scale)
    np.testing.assert_allclose(np.asarray(grad), tx.grad.numpy(), rtol=0, atol=1e-6)
