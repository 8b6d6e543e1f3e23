"""LoRA adapters against peft on the same transformers/torch models: logits both ways,
adapter gradients, merging, freezing."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import jaxloss  # noqa: E402
from train.models import load_pretrained  # noqa: E402
from train.models.lora import (  # noqa: E402
    LoraConfig,
    adapter_tensors,
    add_lora,
    load_adapter,
    merge_lora,
    module_names,
    save_adapter,
    trainable_filter,
)

V, B, T = 60, 3, 7


def _saved(torch_cls, config, tmp_path):
    """A seeded ``torch_cls`` of ``config`` in eval mode, saved to ``tmp_path / "base"``."""
    torch.manual_seed(0)
    pt = torch_cls(config).eval()
    pt.save_pretrained(tmp_path / "base")
    return pt


def _bert(tmp_path):
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=32, num_attention_heads=4, intermediate_size=37,
                                  num_hidden_layers=2, max_position_embeddings=32, num_labels=3,
                                  attn_implementation="eager")
    return _saved(transformers.BertForSequenceClassification, cfg, tmp_path)


def _gpt2(tmp_path):
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_head=4, n_layer=2, n_positions=32,
                                  attn_implementation="eager")
    return _saved(transformers.GPT2LMHeadModel, cfg, tmp_path)


def _llama(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=40, num_hidden_layers=2, max_position_embeddings=32,
                                   attn_implementation="eager")
    return _saved(transformers.LlamaForCausalLM, cfg, tmp_path)


def _bart(tmp_path):
    cfg = transformers.BartConfig(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                  decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37,
                                  max_position_embeddings=32, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                  decoder_start_token_id=2, forced_bos_token_id=None, forced_eos_token_id=None,
                                  attn_implementation="eager")
    return _saved(transformers.BartForConditionalGeneration, cfg, tmp_path)


def _marian(tmp_path):
    cfg = transformers.MarianConfig(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2,
                                    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37,
                                    decoder_ffn_dim=37, max_position_embeddings=32, pad_token_id=V - 1, eos_token_id=0,
                                    decoder_start_token_id=V - 1, forced_eos_token_id=None, scale_embedding=True,
                                    attn_implementation="eager")
    return _saved(transformers.MarianMTModel, cfg, tmp_path)


def _batch(seed=0, types=True, decoder=False):
    rng = np.random.RandomState(seed)
    batch = {"input_ids": rng.randint(3, V - 1, (B, T)).astype(np.int64), "attention_mask": np.ones((B, T), np.int64)}
    if types:
        batch["token_type_ids"] = np.zeros((B, T), np.int64)
    if decoder:
        batch["decoder_input_ids"] = rng.randint(3, V - 1, (B, T - 2)).astype(np.int64)
    return batch


def _torch_logits(model, batch):
    with torch.no_grad():
        return model(**{k: torch.as_tensor(v) for k, v in batch.items()}).logits.numpy()


def _logits(model, batch):
    return np.asarray(model(**{k: jnp.asarray(v) for k, v in batch.items()}).logits)


def _randomise_adapters(model, seed=1):
    keys = iter(jax.random.split(jax.random.key(seed), 1000))
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        var.set_value(0.1 * jax.random.normal(next(keys), var[...].shape, var[...].dtype))


CASES = {
    "bert": (_bert, ("query", "value"), ("classifier",), True),
    "gpt2": (_gpt2, ("c_attn", "c_proj"), (), False),
    "llama": (_llama, ("q_proj", "v_proj", "down_proj"), (), False),
    "bart": (_bart, ("q_proj", "v_proj", "fc1"), (), False),
    "marian": (_marian, ("q_proj", "v_proj"), (), False),
}


def _case_batch(case):
    return _batch(types=CASES[case][3], decoder=case in ("bart", "marian"))


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_adapter_saved_here_loads_in_peft_with_equal_logits(case, tmp_path):
    build, targets, saved, types = CASES[case]
    pt = build(tmp_path)
    model = load_pretrained(tmp_path / "base")
    config = LoraConfig(rank=4, alpha=8.0, targets=targets, modules_to_save=saved)
    add_lora(model, config, nnx.Rngs(0))
    batch = _case_batch(case)
    untouched = _logits(model, batch)
    np.testing.assert_allclose(untouched, _torch_logits(pt, batch), atol=1e-4)  # B = 0: the model is unchanged
    _randomise_adapters(model)
    if saved:
        model.head.classifier.kernel.set_value(model.head.classifier.kernel[...] + 0.5)
    save_adapter(model, config, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    ours = _logits(model, batch)
    assert np.abs(ours - untouched).max() > 1e-2  # the adapter changes the logits

    peft_model = peft.PeftModel.from_pretrained(pt, tmp_path / "adapter").eval()
    np.testing.assert_allclose(ours, _torch_logits(peft_model, batch), atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_adapter_saved_by_peft_loads_here_with_equal_logits(case, tmp_path):
    build, targets, saved, types = CASES[case]
    pt = build(tmp_path)
    torch.manual_seed(3)
    peft_model = peft.get_peft_model(pt, peft.LoraConfig(r=4, lora_alpha=16, target_modules=list(targets),
                                                         modules_to_save=list(saved) or None,
                                                         fan_in_fan_out=case == "gpt2"))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    model = load_pretrained(tmp_path / "base")
    config = load_adapter(model, tmp_path / "adapter")
    assert (config.rank, config.alpha, sorted(config.targets)) == (4, 16.0, sorted(targets))
    batch = _case_batch(case)
    np.testing.assert_allclose(_logits(model, batch), _torch_logits(peft_model, batch), atol=1e-4)


GRADIENT_CASES = {
    "bert": (_bert, ("query", "value"), ("classifier",), 8),
    "gpt2": (_gpt2, ("c_attn", "mlp.c_proj"), (), 8),  # c_attn: one A shared by query, key and value
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(GRADIENT_CASES))
def test_adapter_gradients_equal_peft_and_base_weights_get_none(case, tmp_path):
    build, targets, saved, expected_count = GRADIENT_CASES[case]
    pt = build(tmp_path)
    model = load_pretrained(tmp_path / "base")
    config = LoraConfig(rank=4, alpha=8.0, targets=targets, modules_to_save=saved)
    add_lora(model, config, nnx.Rngs(0))
    _randomise_adapters(model)
    save_adapter(model, config, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(pt, tmp_path / "adapter", is_trainable=True).eval()
    batch = _batch(types=case == "bert")
    labels = np.array([0, 2, 1]) if case == "bert" else batch["input_ids"]

    out = peft_model(**{k: torch.as_tensor(v) for k, v in batch.items()}, labels=torch.as_tensor(labels))
    out.loss.backward()
    torch_grads = {n: p.grad.numpy() for n, p in peft_model.named_parameters() if p.requires_grad}

    trainable = trainable_filter(model, config)
    graphdef, params, rest = nnx.split(model, trainable, ...)

    def loss_of(params):
        m = nnx.merge(graphdef, params, rest)
        logits = m(**{k: jnp.asarray(v) for k, v in batch.items()}).logits
        if case == "bert":
            return jaxloss.cross_entropy(logits, jnp.asarray(labels))
        return jaxloss.causal_lm_loss(logits, jnp.asarray(labels))

    grads = jax.grad(loss_of)(params)
    flat = {tuple(str(p) for p in path): np.asarray(v[...]) for path, v in nnx.to_flat_state(grads)}
    total = sum(v.size for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert sum(g.size for g in flat.values()) < 0.3 * total  # only adapters and the head

    paths = module_names(model)

    def ours(name):  # peft: base_model.model.<module>.lora_A.default.weight
        module, which = name[len("base_model.model."):].split(".lora_")
        keys = [tuple(str(p) for p in path) + ("lora", "lora_a" if which.startswith("A") else "lora_b")
                for path in paths[module]]
        if which.startswith("A"):  # shared: held once, under whichever of its layers comes first
            return next(flat[k] for k in keys if k in flat).T
        return np.concatenate([flat[k] for k in keys], axis=-1).T

    checked = 0
    for name, g in torch_grads.items():
        if "lora_" in name:
            np.testing.assert_allclose(ours(name), g, rtol=1e-4, atol=1e-4 * np.abs(g).max(), err_msg=name)
            checked += 1
    assert checked == expected_count


@pytest.mark.slow
def test_merged_model_gives_the_adapted_logits_and_saves_as_a_plain_model(tmp_path):
    from train.models import save_pretrained

    _llama(tmp_path)
    model = load_pretrained(tmp_path / "base")
    add_lora(model, LoraConfig(rank=2, alpha=4.0, targets=("q_proj", "v_proj", "gate_proj")), nnx.Rngs(0))
    _randomise_adapters(model)
    batch = _batch(types=False)
    adapted = _logits(model, batch)
    assert merge_lora(model) == 6
    assert not nnx.state(model, nnx.LoRAParam)
    np.testing.assert_allclose(_logits(model, batch), adapted, atol=1e-4)
    save_pretrained(model, tmp_path / "merged")
    merged_pt = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(_torch_logits(merged_pt, batch), adapted, atol=1e-4)


def test_an_optimizer_over_the_trainable_filter_moves_only_adapters_and_saved_modules(tmp_path):
    import optax

    _bert(tmp_path)
    model = load_pretrained(tmp_path / "base")
    config = LoraConfig(rank=2, targets=("query",), modules_to_save=("classifier",))
    add_lora(model, config, nnx.Rngs(0))
    before = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    optimizer = nnx.Optimizer(model, optax.sgd(0.5), wrt=trainable_filter(model, config))
    batch, labels = _batch(), jnp.array([0, 2, 1])

    def loss_of(m):
        return jaxloss.cross_entropy(m(**{k: jnp.asarray(v) for k, v in batch.items()}).logits, labels)

    grads = nnx.grad(loss_of, argnums=nnx.DiffState(0, trainable_filter(model, config)))(model)
    optimizer.update(model, grads)
    moved = {p for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)) if not np.array_equal(np.asarray(v[...]), before[p])}
    assert moved and all(p[-2] == "lora" or p[:2] == ("head", "classifier") for p in moved), moved
    assert any(p[:2] == ("head", "classifier") for p in moved) and any(p[-2] == "lora" for p in moved)
    opt_leaves = jax.tree.leaves(nnx.state(optimizer, nnx.OptState))
    assert sum(x.size for x in opt_leaves) < 0.2 * sum(v.size for v in before.values())


def test_bad_targets_and_adapter_files_are_named(tmp_path):
    _gpt2(tmp_path)
    model = load_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match=r"\['q_proj'\] match no linear layer of GPT2LMHeadModel; its layers end in: .*c_proj"):
        add_lora(model, LoraConfig(rank=2, targets=("c_proj", "q_proj")), nnx.Rngs(0))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoraConfig(rank=0, targets=("c_proj",))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(model, tmp_path)
    (tmp_path / "dora").mkdir()
    (tmp_path / "dora" / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["c_proj"], "use_dora": true}')
    with pytest.raises(ValueError, match="use_dora=true is not supported"):
        load_adapter(model, tmp_path / "dora")


@pytest.mark.slow
def test_a_lora_run_trains_under_2_percent_and_writes_a_peft_adapter_and_a_merged_model(tmp_path):
    import json
    from pathlib import Path

    from train.cli import main as cli_main
    from train.models.sources import CheckpointSourceError, resolve_checkpoint
    from train.predict import load_run

    try:
        base = resolve_checkpoint("minilm")
    except CheckpointSourceError as err:
        pytest.skip(f"the packaged checkpoint is not available here: {err}")
    data = Path(__file__).resolve().parent.parent / "data" / "wnut17"
    out = tmp_path / "run"
    args = ["ner", "--model", "minilm", "--train-file", str(data / "train.conll"), "--eval-file", str(data / "dev.conll"),
            "--max-length", "32", "--batch-size", "8", "--max-steps", "3", "--eval-every", "1000", "--max-eval-examples", "16",
            "--lora-rank", "8", "--merge-lora", "--output-dir", str(out), "--no-progress", "--compile-cache", "off"]
    assert cli_main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["trainable_parameters"] < 0.02 * summary["parameters"]
    # AdamW's two float32 moments of what trains, and little else
    assert 8 * summary["trainable_parameters"] <= summary["optimizer_state_bytes"] < 8 * summary["trainable_parameters"] + 4096
    assert summary["train_step_memory_bytes"] > 4 * summary["parameters"]  # the frozen weights are still read
    assert "learning_rate: 0.002" in (out / "config.yaml").read_text()  # the LoRA default
    adapter = json.loads((out / "model" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(base) and adapter["target_modules"] == ["query", "value"]
    assert adapter["modules_to_save"] == ["classifier"]

    _, task, tokenizer, model = load_run(out)
    encoded = tokenizer(["Emma flew to Paris on Monday", "the new phone from Apple"], padding=True, return_tensors="np")
    batch = {k: encoded[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    ours = _logits(model, batch)
    pretrained = load_pretrained(base, "BertForTokenClassification", strict=False, num_labels=ours.shape[-1])
    assert np.array_equal(np.asarray(model.bert.layers[0].attention.query.kernel[...]),
                          np.asarray(pretrained.bert.layers[0].attention.query.kernel[...]))  # frozen
    assert np.abs(np.asarray(model.bert.layers[0].attention.query.lora.lora_b[...])).max() > 0  # trained

    torch_base = transformers.BertForTokenClassification.from_pretrained(base, num_labels=ours.shape[-1]).eval()
    with_adapter = peft.PeftModel.from_pretrained(torch_base, out / "model").eval()
    np.testing.assert_allclose(_torch_logits(with_adapter, batch), ours, atol=1e-4)
    merged = transformers.BertForTokenClassification.from_pretrained(out / "model-merged").eval()
    np.testing.assert_allclose(_torch_logits(merged, batch), ours, atol=1e-4)


def test_lora_options_are_checked_before_anything_runs():
    from train.config import TrainConfig

    with pytest.raises(ValueError, match="--lora-rank needs --model"):
        TrainConfig(task="ner", lora_rank=4)
    with pytest.raises(ValueError, match="--merge-lora needs --lora-rank"):
        TrainConfig(task="ner", model="x", merge_lora=True)
    with pytest.raises(ValueError, match=r"lora_dropout=1.0 must lie in \[0, 1\)"):
        TrainConfig(task="ner", model="x", lora_rank=2, lora_dropout=1.0)
    assert TrainConfig(task="ner", model="x", lora_rank=2).learning_rate == 2e-3
    assert TrainConfig(task="ner", model="x").learning_rate == 5e-5


@pytest.mark.slow
def test_scanned_layers_with_adapters_give_the_looped_values_and_gradients(tmp_path):
    """Adapters on stacked layers (stacked too): a looped model's adapter loads into a stacked
    model, which gives the looped loss and gradients, saves the same peft tensors and merges
    into the same weights."""
    from train.models import state_dict
    from train.models.stack import LayerStack

    _gpt2(tmp_path)
    batch = {k: jnp.asarray(v) for k, v in _batch(types=False).items()}
    config = LoraConfig(rank=2, targets=("c_attn", "c_fc"))
    looped = load_pretrained(tmp_path / "base")
    add_lora(looped, config, nnx.Rngs(0))
    _randomise_adapters(looped)
    save_adapter(looped, config, tmp_path / "adapter")
    scanned = load_pretrained(tmp_path / "base", scan_layers=True)
    load_adapter(scanned, tmp_path / "adapter")
    assert isinstance(scanned.layers, LayerStack)
    assert scanned.layers.layer.mlp.up.lora.lora_a.shape == (len(scanned.layers),) + looped.layers[0].mlp.up.lora.lora_a.shape
    results = []
    for model in (looped, scanned):
        graphdef, params, rest = nnx.split(model, nnx.LoRAParam, ...)

        def loss_of(params):
            model = nnx.merge(graphdef, params, rest, copy=True)
            return jaxloss.causal_lm_loss(model(**batch).logits, batch["input_ids"])

        value, grads = jax.jit(jax.value_and_grad(loss_of))(params)
        saved = adapter_tensors(model, config)
        nnx.update(model, grads)  # the gradients in the adapters' places, named as peft names them
        results.append((float(value), saved, adapter_tensors(model, config)))
    (looped_value, looped_saved, looped_grads), (scanned_value, scanned_saved, scanned_grads) = results
    np.testing.assert_allclose(scanned_value, looped_value, rtol=1e-6)
    assert looped_saved.keys() == scanned_saved.keys() == looped_grads.keys() == scanned_grads.keys()
    for name in looped_saved:
        np.testing.assert_array_equal(scanned_saved[name], looped_saved[name], err_msg=name)
        np.testing.assert_allclose(scanned_grads[name], looped_grads[name], rtol=1e-5, atol=1e-7, err_msg=name)
    assert merge_lora(looped) == merge_lora(scanned) > 0
    merged, scanned_merged = state_dict(looped), state_dict(scanned)
    for name in merged:
        np.testing.assert_allclose(scanned_merged[name], merged[name], rtol=1e-6, atol=1e-7, err_msg=name)
