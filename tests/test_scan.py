"""Scanned layers and scanned gradient accumulation: the values of the loops they replace, and
programs whose size does not grow with depth or with the number of micro-batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxloss
from train import sharding
from train.models import from_config, state_dict
from train.models.stack import LayerStack
from train.step import make_train_step, micro_batches
from train.tasks import NerTask

V, B, T = 99, 2, 16


def _config(family: str, layers: int) -> tuple[dict, str]:
    from transformers import BartConfig, BertConfig, GPT2Config

    small = dict(vocab_size=V, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "bert":
        return BertConfig(**small, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                          intermediate_size=64).to_dict(), "BertForMaskedLM"
    if family == "gpt2":
        return GPT2Config(**small, n_embd=32, n_layer=layers, n_head=2).to_dict(), "GPT2LMHeadModel"
    return BartConfig(**small, d_model=32, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=2,
                      decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                      max_position_embeddings=64).to_dict(), "BartForConditionalGeneration"


def _inputs(family: str) -> dict[str, jax.Array]:
    ids = jnp.asarray(np.random.default_rng(1).integers(3, V, (B, T)), jnp.int32)
    return {"input_ids": ids, "decoder_input_ids": ids} if family == "bart" else {"input_ids": ids}


def _loss_fn(family: str, layers: int, scan: bool, remat: str = "none", with_model: bool = False):
    """A training-mode loss of the parameters (dropout on) and the parameters (and the model)."""
    cfg, arch = _config(family, layers)
    model = from_config(cfg, arch, remat=remat, scan_layers=scan, seed=0)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    inputs = _inputs(family)

    def loss(p):
        out = nnx.merge(graphdef, p, rest, copy=True)(**inputs)
        return jnp.mean(jax.nn.log_softmax(out.logits.astype(jnp.float32))[..., 5])

    return (loss, params, model) if with_model else (loss, params)


@pytest.mark.parametrize("family", ["bert", "gpt2", "bart"])
@pytest.mark.parametrize("remat", ["none", "dots"])
def test_scanned_layers_give_the_loop_s_loss_and_gradients(family, remat):
    loop_loss, params, loop_model = _loss_fn(family, 3, scan=False, with_model=True)
    scan_loss, scan_params, scan_model = _loss_fn(family, 3, scan=True, remat=remat, with_model=True)
    assert "scan[" not in str(jax.make_jaxpr(loop_loss)(params))
    assert "scan[" in str(jax.make_jaxpr(scan_loss)(scan_params))
    value, grads = jax.jit(jax.value_and_grad(loop_loss))(params)
    scan_value, scan_grads = jax.jit(jax.value_and_grad(scan_loss))(scan_params)
    # the layers' parameters are stored stacked: fewer, larger arrays ...
    assert len(jax.tree.leaves(scan_grads)) < len(jax.tree.leaves(grads))
    # ... that are the same values under the same Hugging Face names, dropout masks included
    assert float(scan_value) == pytest.approx(float(value), rel=1e-6)
    named, scan_named = state_dict(loop_model, grads), state_dict(scan_model, scan_grads)
    assert sorted(named) == sorted(scan_named)
    for name in named:
        np.testing.assert_allclose(scan_named[name], named[name], rtol=1e-5, atol=2e-7, err_msg=name)


def _equations(jaxpr: jax.extend.core.ClosedJaxpr | jax.core.ClosedJaxpr) -> int:
    """Equations in a jaxpr and every jaxpr nested in it (a scan's body counted once)."""
    count = 0
    for eqn in jaxpr.jaxpr.eqns:
        count += 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if hasattr(sub, "jaxpr") and hasattr(sub, "consts"):
                    count += _equations(sub)
                elif hasattr(sub, "eqns"):
                    count += _equations(jax.extend.core.ClosedJaxpr(sub, ()))
    return count


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_the_scanned_gradient_program_does_not_grow_with_depth(family):
    """With the layers stored stacked, the forward and backward pass of 2 and of 6 layers are
    the same program but for the arrays' leading axis; the loop traces every layer again."""
    sizes = {}
    for scan in (False, True):
        for layers in (2, 6):
            loss, params = _loss_fn(family, layers, scan)
            sizes[scan, layers] = _equations(jax.make_jaxpr(jax.grad(loss))(params))
    assert sizes[False, 6] - sizes[False, 2] > 200, sizes  # about 4 layers' forward and backward
    assert sizes[True, 6] == sizes[True, 2], sizes


def test_the_scanned_training_step_does_not_grow_with_depth():
    """The whole step (forward, loss, backward, AdamW) of a stacked model: one program size
    for 2 and 6 layers, and a fixed number of parameter arrays for the optimizer."""
    sizes, leaves = {}, {}
    for layers in (2, 6):
        jaxpr, params = _step_jaxpr(1, layers=layers, scan=True)
        sizes[layers], leaves[layers] = _equations(jaxpr), len(jax.tree.leaves(params))
    assert sizes[6] == sizes[2], sizes
    assert leaves[6] == leaves[2], leaves


def test_stacked_parameters_have_a_leading_layers_axis_and_the_loop_s_values():
    from train.models.partitioning import logical_axes

    cfg, arch = _config("bert", 3)
    looped = from_config(cfg, arch, seed=0)
    stacked = from_config(cfg, arch, scan_layers=True, seed=0)
    assert isinstance(stacked.bert.layers, LayerStack) and len(stacked.bert.layers) == 3
    kernel = stacked.bert.layers.layer.attention.query.kernel
    assert kernel.shape == (3,) + looped.bert.layers[0].attention.query.kernel.shape
    assert logical_axes(stacked)["bert"]["layers"]["layer"]["attention"]["query"]["kernel"] == ("layers", "embed", "heads")
    np.testing.assert_array_equal(np.asarray(kernel[1]), np.asarray(looped.bert.layers[1].attention.query.kernel[...]))
    expected, got = state_dict(looped), state_dict(stacked)
    assert sorted(expected) == sorted(got)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_a_stacked_model_loads_and_saves_hugging_face_checkpoints(tmp_path):
    """A looped model's checkpoint loads into a stacked one (every row in its place) and the
    stacked model saves it back unchanged; transformers reads what it saves."""
    import torch
    from transformers import BertForMaskedLM

    from train.models import load_pretrained, save_pretrained

    cfg, arch = _config("bert", 3)
    looped = from_config(cfg, arch, seed=1)
    save_pretrained(looped, tmp_path / "looped")
    stacked = load_pretrained(tmp_path / "looped", scan_layers=True)
    assert isinstance(stacked.bert.layers, LayerStack)
    save_pretrained(stacked, tmp_path / "stacked")
    again = load_pretrained(tmp_path / "stacked")
    expected, got = state_dict(looped), state_dict(again)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    ids = _inputs("bert")["input_ids"]
    reference = BertForMaskedLM.from_pretrained(tmp_path / "stacked").eval()
    with torch.no_grad():
        torch_logits = reference(torch.tensor(np.array(ids), dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(stacked(input_ids=ids).logits), torch_logits, rtol=1e-4, atol=1e-4)


def test_scanned_layers_advance_each_layer_s_dropout_stream_like_the_loop():
    """Called eagerly twice in training mode, the scanned model draws the loop's masks: new
    ones on the second call (the streams' counters are written back after the scan)."""
    outputs = {}
    for scan in (False, True):
        cfg, arch = _config("bert", 3)
        model = from_config(cfg, arch, scan_layers=scan, seed=0)
        outputs[scan] = [np.asarray(model(**_inputs("bert")).logits) for _ in range(2)]
    np.testing.assert_allclose(outputs[True][0], outputs[False][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outputs[True][1], outputs[False][1], rtol=1e-5, atol=1e-6)
    assert np.abs(outputs[True][1] - outputs[True][0]).max() > 1e-3


def test_layers_of_different_structure_are_refused():
    layers = [nnx.Linear(2, 2, rngs=nnx.Rngs(0)), nnx.Linear(2, 2, use_bias=False, rngs=nnx.Rngs(1))]
    with pytest.raises(ValueError, match="layer 1 differs from layer 0"):
        LayerStack(layers)
    with pytest.raises(ValueError, match="at least one layer"):
        LayerStack([])


@pytest.mark.parametrize("family", ["gpt2", "bart"])
def test_decoding_with_a_cache_is_unchanged_by_scan_layers(family):
    from train.models.bart import generate_seq2seq
    from train.models.decoder import generate

    decode = generate_seq2seq if family == "bart" else generate
    results = []
    for scan in (False, True):
        cfg, arch = _config(family, 2)
        model = from_config(cfg, arch, scan_layers=scan, seed=0)
        model.eval()
        results.append(np.asarray(decode(model, _inputs("gpt2")["input_ids"][:, :4], max_new_tokens=5)))
    np.testing.assert_array_equal(results[0], results[1])


# --------------------------------------------------------------------------- accumulation


def test_micro_batches_interleave_rows_so_each_device_keeps_its_share():
    x = jnp.arange(12).reshape(12, 1)
    parts = micro_batches({"x": x}, 3)["x"]
    assert parts.shape == (3, 4, 1)
    assert np.asarray(parts[:, :, 0]).tolist() == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]
    # two data devices hold rows 0-5 and 6-11: each micro-batch takes two rows from each
    for part in np.asarray(parts[:, :, 0]):
        assert sorted(part // 6) == [0, 0, 1, 1]


def _step_jaxpr(grad_accum: int, layers: int = 1, scan: bool = False):
    """The jaxpr of a training step of a BERT tagger on 16 rows (and, with ``layers`` or
    ``scan``, its parameters)."""
    from transformers import BertConfig

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=32, num_labels=3).to_dict()
    with sharding.unsharded():
        model = from_config(cfg, "BertForTokenClassification", scan_layers=scan)
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    task = NerTask(name="ner", train_file=None, eval_file=None)
    task.labels = ["O", "B-X", "I-X"]
    optimizer = optax.adamw(1e-3)
    step = make_train_step(graphdef, [task], jaxloss.CompositeLoss((jaxloss.Term("ner"),)), optimizer, grad_accum)
    rows = 16
    batch = {"input_ids": jnp.ones((rows, 8), jnp.int32), "attention_mask": jnp.ones((rows, 8), jnp.int32),
             "labels": jnp.zeros((rows, 8), jnp.int32), "example_mask": jnp.ones((rows,), bool)}
    jaxpr = jax.make_jaxpr(step)(params, {}, optimizer.init((params, {})), rest, jnp.asarray(0),
                                 jnp.asarray(1.0, jnp.float32), {"ner": batch}, jax.random.key(0))
    return (jaxpr, params) if layers != 1 or scan else jaxpr


def _step_program_size(grad_accum: int) -> int:
    return _equations(_step_jaxpr(grad_accum))


def test_the_accumulating_step_does_not_grow_with_micro_batches():
    two, eight = _step_program_size(2), _step_program_size(8)
    assert eight == two
    assert _step_program_size(1) < two  # one micro-batch needs no loop


@pytest.mark.parametrize("family", ["bert", "bart"])
def test_flops_count_every_scanned_layer(family):
    """The utilisation's FLOP count of a scanned program equals the loop's (XLA's
    cost_analysis counts a loop body once: a third of these layers)."""
    from train.utilisation import jaxpr_flops

    counts = []
    for scan in (False, True):
        loss, params = _loss_fn(family, 3, scan)
        counts.append(jaxpr_flops(jax.make_jaxpr(jax.grad(loss))(params)))
    assert counts[0] > 0 and counts[1] == counts[0]


def test_flops_count_every_micro_batch():
    from train.utilisation import jaxpr_flops

    assert jaxpr_flops(_step_jaxpr(4)) == pytest.approx(jaxpr_flops(_step_jaxpr(1)), rel=1e-6)
