"""Llama family (``model_type`` ``llama``): the trunk ``LlamaModel`` and ``LlamaForCausalLM`` built on it.

RMSNorm, rotary positions (default RoPE), SwiGLU MLP, grouped-query attention, LM head tied
to the embeddings only when ``tie_word_embeddings`` is true.
"""

from __future__ import annotations

from typing import Any, Mapping

from flax import nnx

from train.models import mapping as M
from train.models.decoder import CausalLM, DecoderSpec, eos_tuple as _eos
from train.models.outputs import Runtime


def _rope_theta(cfg: Mapping[str, Any]) -> float:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ValueError(f"rope_type {kind!r} is not supported (only 'default' RoPE)")
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def llama_spec(cfg: Mapping[str, Any]) -> DecoderSpec:
    """The :class:`DecoderSpec` of a Hugging Face Llama config dict."""
    if cfg.get("pretraining_tp", 1) not in (1, None):
        raise ValueError("Llama with pretraining_tp != 1 is not supported")
    d, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or d // heads
    bias = bool(cfg.get("attention_bias", False))
    return DecoderSpec(
        vocab_size=cfg["vocab_size"], d_model=d, num_layers=cfg["num_hidden_layers"], num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads, head_dim=head_dim, d_ff=cfg["intermediate_size"],
        act=cfg.get("hidden_act", "silu"), gated_mlp=True, norm="rmsnorm", norm_eps=cfg.get("rms_norm_eps", 1e-6),
        qkv_bias=bias, out_bias=bias, mlp_bias=bool(cfg.get("mlp_bias", False)), positions="rotary",
        max_positions=cfg.get("max_position_embeddings", 2048), rope_theta=_rope_theta(cfg),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), attn_dropout=cfg.get("attention_dropout", 0.0),
        init_std=cfg.get("initializer_range", 0.02), pad_token_id=cfg.get("pad_token_id"),
        embedding_padding_idx=cfg.get("pad_token_id"), eos_token_id=_eos(cfg.get("eos_token_id")),
    )


def llama_tensor_maps(model: CausalLM, prefix: str) -> list[M.TensorMap]:
    """Hugging Face names of Llama's tensors (``prefix`` ``"model."`` in the LM, ``""`` in the trunk)."""
    s = model.spec
    maps = M.embedding("embed_tokens", ("embed",))
    for i in range(len(model.layers)):
        h, p = f"layers.{i}.", ("layers", i)
        att = p + ("attention",)
        maps += M.norm(h + "input_layernorm", p + ("attention_norm",), bias=False)
        for hf, ours in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
            maps += M.linear(h + "self_attn." + hf, att + (ours,), bias=s.qkv_bias)
        maps += M.linear(h + "self_attn.o_proj", att + ("out",), bias=s.out_bias)
        maps += M.norm(h + "post_attention_layernorm", p + ("mlp_norm",), bias=False)
        for hf, ours in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            maps += M.linear(h + "mlp." + hf, p + ("mlp", ours), bias=s.mlp_bias)
    maps += M.norm("norm", ("final_norm",), bias=False)
    maps = M.prefixed(maps, prefix, ())
    if model.lm_head is not None:
        maps += M.linear("lm_head", ("lm_head",), bias=False)
    return maps


class LlamaModel(CausalLM):
    """Llama trunk checkpoints: Hugging Face's ``LlamaModel`` names (no ``model.`` prefix, no
    ``lm_head`` tensor)."""

    tied_tensors = ("lm_head.weight",)

    def __init__(self, cfg: Mapping[str, Any], rt: Runtime = Runtime(), *, rngs: nnx.Rngs):
        super().__init__(llama_spec(cfg), rt, config=dict(cfg), rngs=rngs)

    def tensor_maps(self) -> list[M.TensorMap]:
        return [m for m in llama_tensor_maps(self, "") if m.name != "lm_head.weight"]


class LlamaForCausalLM(LlamaModel):
    """Llama causal LM: the trunk's tensors under ``model.``, and ``lm_head`` when untied."""

    def tensor_maps(self) -> list[M.TensorMap]:
        return llama_tensor_maps(self, "model.")
