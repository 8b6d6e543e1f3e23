"""GPT-2 (``model_type`` ``gpt2``): the trunk ``GPT2Model`` and ``GPT2LMHeadModel`` built on it.

Learned positions, pre-LayerNorm blocks, tanh-GELU MLP, fused ``c_attn`` (split into query,
key and value here), LM head tied to ``wte`` unless ``tie_word_embeddings`` is false.
"""

from __future__ import annotations

from typing import Any, Mapping

from flax import nnx

from train.models import mapping as M
from train.models.decoder import CausalLM, DecoderSpec, eos_tuple as _eos
from train.models.outputs import Runtime


def gpt2_spec(cfg: Mapping[str, Any]) -> DecoderSpec:
    """The :class:`DecoderSpec` of a Hugging Face GPT-2 config dict."""
    if cfg.get("reorder_and_upcast_attn"):
        raise ValueError("GPT-2 with reorder_and_upcast_attn=True is not supported")
    if cfg.get("add_cross_attention"):
        raise ValueError("GPT-2 with add_cross_attention=True is not supported")
    if cfg.get("scale_attn_weights", True) is False:
        raise ValueError("GPT-2 with scale_attn_weights=False is not supported")
    d, heads = cfg["n_embd"], cfg["n_head"]
    return DecoderSpec(
        vocab_size=cfg["vocab_size"], d_model=d, num_layers=cfg["n_layer"], num_heads=heads, num_kv_heads=heads,
        head_dim=d // heads, d_ff=cfg.get("n_inner") or 4 * d, act=cfg.get("activation_function", "gelu_new"),
        gated_mlp=False, norm="layernorm", norm_eps=cfg.get("layer_norm_epsilon", 1e-5), qkv_bias=True, out_bias=True,
        mlp_bias=True, positions="learned", max_positions=cfg.get("n_positions", 1024),
        tie_word_embeddings=cfg.get("tie_word_embeddings", True), embed_dropout=cfg.get("embd_pdrop", 0.1),
        resid_dropout=cfg.get("resid_pdrop", 0.1), attn_dropout=cfg.get("attn_pdrop", 0.1),
        init_std=cfg.get("initializer_range", 0.02),
        scale_attn_by_inverse_layer_idx=bool(cfg.get("scale_attn_by_inverse_layer_idx", False)),
        scaled_residual_init=True, pad_token_id=cfg.get("pad_token_id"), eos_token_id=_eos(cfg.get("eos_token_id")),
    )


def gpt2_tensor_maps(model: CausalLM, prefix: str) -> list[M.TensorMap]:
    """Hugging Face names of GPT-2's tensors (``prefix`` ``"transformer."`` in the LM, ``""`` in the trunk)."""
    maps = M.embedding("wte", ("embed",)) + M.embedding("wpe", ("position",))
    for i in range(len(model.layers)):
        h, p = f"h.{i}.", ("layers", i)
        att = p + ("attention",)
        maps += M.norm(h + "ln_1", p + ("attention_norm",))
        maps += [M.TensorMap(h + "attn.c_attn.weight", tuple(att + (n, "kernel") for n in ("query", "key", "value")), "split"),
                 M.TensorMap(h + "attn.c_attn.bias", tuple(att + (n, "bias") for n in ("query", "key", "value")), "split")]
        maps += M.conv1d(h + "attn.c_proj", att + ("out",))
        maps += M.norm(h + "ln_2", p + ("mlp_norm",))
        maps += M.conv1d(h + "mlp.c_fc", p + ("mlp", "up")) + M.conv1d(h + "mlp.c_proj", p + ("mlp", "down"))
    maps += M.norm("ln_f", ("final_norm",))
    maps = M.prefixed(maps, prefix, ())
    if model.lm_head is not None:
        maps += M.linear("lm_head", ("lm_head",), bias=False)
    return maps


class GPT2Model(CausalLM):
    """GPT-2 trunk checkpoints: Hugging Face's ``GPT2Model`` names (no ``transformer.`` prefix, no LM
    head tensors; the head is the tied ``wte``)."""

    tied_tensors = ("lm_head.weight",)

    def __init__(self, cfg: Mapping[str, Any], rt: Runtime = Runtime(), *, rngs: nnx.Rngs):
        super().__init__(gpt2_spec(cfg), rt, config=dict(cfg), rngs=rngs)

    def tensor_maps(self) -> list[M.TensorMap]:
        return gpt2_tensor_maps(self, "")


class GPT2LMHeadModel(GPT2Model):
    """GPT-2 causal LM: the trunk's tensors under ``transformer.``, and ``lm_head`` when untied."""

    def tensor_maps(self) -> list[M.TensorMap]:
        return gpt2_tensor_maps(self, "transformer.")
