"""Checkpoint loading and saving, clear errors, config options (bf16, remat, dropout) and sharding names."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

import jaxloss  # noqa: E402
from train.models import CheckpointError, from_config, load_pretrained, save_pretrained, state_dict  # noqa: E402
from train.models.partitioning import FSDP_TP_RULES, logical_axes, named_shardings, partition_specs  # noqa: E402

V = 99


def _bert(**kw):
    return transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                   intermediate_size=37, max_position_embeddings=32, **kw)


def _gpt2(**kw):
    kw = {"n_embd": 32, **kw}
    return transformers.GPT2Config(vocab_size=V, n_layer=1, n_head=4, n_positions=16, bos_token_id=1,
                                   eos_token_id=2, **kw)


@pytest.fixture(scope="module")
def mlm_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlm")
    torch.manual_seed(0)
    transformers.BertForMaskedLM(_bert()).save_pretrained(folder)
    return folder


def _ids(b=2, t=6, seed=0):
    return np.random.RandomState(seed).randint(1, V, (b, t))


def _forward(model, **batch):
    return nnx.jit(lambda m, b: m(**b))(model, {k: jnp.asarray(v) for k, v in batch.items()})


# ---------------------------------------------------------------------- errors


def test_unknown_architecture_is_named(tmp_path):
    cfg = _bert().to_dict()
    cfg["architectures"] = ["RobertaForSequenceClassification"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown architecture 'RobertaForSequenceClassification'"):
        load_pretrained(tmp_path)
    cfg.pop("architectures")
    cfg["model_type"] = "t5"
    with pytest.raises(ValueError, match="model_type 't5' is not supported"):
        from_config(cfg)


def _copy(src, dst, edit):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})


def test_missing_extra_and_misshapen_tensors_are_named(mlm_folder, tmp_path):
    _copy(mlm_folder, tmp_path / "missing", lambda t: t.pop("bert.encoder.layer.0.output.dense.weight"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): bert\.encoder\.layer\.0\.output\.dense\.weight"):
        load_pretrained(tmp_path / "missing")
    _copy(mlm_folder, tmp_path / "extra", lambda t: t.update({"bert.surprise.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected 1 tensor\(s\): bert\.surprise\.weight"):
        load_pretrained(tmp_path / "extra")
    assert load_pretrained(tmp_path / "extra", strict=False) is not None

    def reshape(t):
        t["bert.encoder.layer.0.intermediate.dense.weight"] = np.zeros((36, 32), np.float32)

    _copy(mlm_folder, tmp_path / "shape", reshape)
    with pytest.raises(CheckpointError, match=r"'bert\.encoder\.layer\.0\.intermediate\.dense\.weight' has shape "
                                              r"\(36, 32\), the model expects \(37, 32\)"):
        load_pretrained(tmp_path / "shape")


def test_corrupt_and_absent_files(mlm_folder, tmp_path):
    (tmp_path / "config.json").write_text((mlm_folder / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{ broken")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_pretrained(tmp_path)


# ---------------------------------------------------------------------- formats and heads


def test_pytorch_bin_and_safetensors_load_the_same(mlm_folder, tmp_path):
    pt = transformers.AutoModelForMaskedLM.from_pretrained(mlm_folder)
    (tmp_path / "config.json").write_text((mlm_folder / "config.json").read_text())
    torch.save(pt.state_dict(), tmp_path / "pytorch_model.bin")
    a, b = state_dict(load_pretrained(mlm_folder)), state_dict(load_pretrained(tmp_path))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_sharded_safetensors_index(mlm_folder, tmp_path):
    tensors = load_file(str(mlm_folder / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / shard), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text((mlm_folder / "config.json").read_text())
    a, b = state_dict(load_pretrained(mlm_folder)), state_dict(load_pretrained(tmp_path))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_new_head_on_pretrained_trunk(mlm_folder):
    """As ``AutoModelForTokenClassification.from_pretrained(mlm_checkpoint, num_labels=7)``."""
    model = load_pretrained(mlm_folder, "BertForTokenClassification", num_labels=7)
    assert type(model).__name__ == "BertForTokenClassification"
    trunk = load_file(str(mlm_folder / "model.safetensors"))
    ours = state_dict(model)
    np.testing.assert_array_equal(ours["bert.embeddings.word_embeddings.weight"],
                                  trunk["bert.embeddings.word_embeddings.weight"])
    assert ours["classifier.weight"].shape == (7, 32)
    with pytest.raises(CheckpointError, match="missing"):
        load_pretrained(mlm_folder, "BertForTokenClassification", num_labels=7, strict=True)


def test_from_config_and_save_round_trip_in_transformers(tmp_path):
    model = from_config(_gpt2(), seed=3)
    save_pretrained(model, tmp_path)
    pt = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = _ids()
    with torch.no_grad():
        expected = pt(input_ids=torch.as_tensor(ids)).logits.numpy()
    model.eval()
    np.testing.assert_allclose(np.asarray(_forward(model, input_ids=ids).logits), expected, atol=1e-4)
    again = load_pretrained(tmp_path)
    for k, v in state_dict(model).items():
        np.testing.assert_array_equal(state_dict(again)[k], v)


# ---------------------------------------------------------------------- run-time options


def test_dropout_on_in_training_off_in_eval():
    model = from_config(_bert(num_labels=2), "BertForSequenceClassification", seed=0)
    ids = _ids()
    a = _forward(model, input_ids=ids).last_hidden_state
    b = _forward(model, input_ids=ids).last_hidden_state
    assert not np.allclose(np.asarray(a), np.asarray(b))  # fresh dropout masks each call
    model.eval()
    c = _forward(model, input_ids=ids).last_hidden_state
    d = _forward(model, input_ids=ids).last_hidden_state
    np.testing.assert_array_equal(np.asarray(c), np.asarray(d))


def test_remat_gives_the_same_gradients(tmp_path):
    save_pretrained(from_config(_gpt2(), seed=1), tmp_path)
    ids = jnp.asarray(_ids(t=8))

    def grads(remat):
        model = load_pretrained(tmp_path, remat=remat)
        return nnx.jit(nnx.grad(lambda m: jaxloss.causal_lm_loss(m(input_ids=ids).logits, ids)))(model)

    a, b = grads(False), grads(True)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7), a, b)


def test_bfloat16_compute_keeps_float32_parameters(mlm_folder):
    f32 = load_pretrained(mlm_folder)
    bf16 = load_pretrained(mlm_folder, dtype="bfloat16")
    params = nnx.state(bf16, nnx.Param)
    assert {v[...].dtype for _, v in nnx.to_flat_state(params)} == {jnp.dtype(jnp.float32)}
    ids = _ids()
    a, b = _forward(f32, input_ids=ids), _forward(bf16, input_ids=ids)
    assert b.logits.dtype == jnp.float32
    assert b.last_hidden_state.dtype == jnp.bfloat16
    assert float(jnp.max(jnp.abs(a.logits - b.logits))) < 0.1 * float(jnp.max(jnp.abs(a.logits)))


# ---------------------------------------------------------------------- sharding


def test_every_parameter_has_logical_axes_and_maps_to_the_mesh():
    model = from_config(_gpt2(tie_word_embeddings=False, n_embd=64))
    axes = logical_axes(model)
    assert axes["embed"]["embedding"] == ("vocab", "embed")
    assert axes["layers"][0]["attention"]["query"]["kernel"] == ("embed", "heads")
    assert axes["layers"][0]["mlp"]["down"]["kernel"] == ("mlp", "embed")
    assert axes["lm_head"]["kernel"] == ("embed", "vocab")
    for path, names in jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))[0]:
        assert names and all(n is not None for n in names), path
    mesh = jax.make_mesh((2, 2), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    specs = partition_specs(model, FSDP_TP_RULES, mesh)
    P = jax.sharding.PartitionSpec
    assert specs["layers"][0]["attention"]["query"]["kernel"] == P("fsdp", "tensor")
    assert specs["embed"]["embedding"] == P(None, "fsdp")  # vocab 99 is not divisible by 2: replicated
    shardings = named_shardings(model, mesh, FSDP_TP_RULES)
    state = nnx.state(model, nnx.Param)
    placed = jax.device_put(nnx.to_pure_dict(state), shardings)
    assert placed["layers"][0]["mlp"]["up"]["kernel"].sharding.spec == P("fsdp", "tensor")
