"""Flax NNX Transformer models that load Hugging Face PyTorch checkpoints and equal them.

Public API:
  - :func:`load_pretrained` / :func:`save_pretrained`: Hugging Face checkpoint folders.
  - :func:`from_config`: a randomly initialised model from a ``transformers`` config.
  - :func:`state_dict`: parameters (or gradients) under PyTorch names and layouts.
  - :func:`generate`: jitted greedy decoding or beam search with a key/value cache for the decoders.
  - :func:`generate_seq2seq`: the same for the encoder-decoders (BART, Marian); the loop and the
    supported generation options: :mod:`train.models.generation`.
  - :func:`load_multitask` / :class:`BertMultiTask`: one BERT trunk, several named heads.
  - :mod:`train.models.partitioning`: logical axis names and the rules table to a mesh.
  - :mod:`train.models.layers`: attention, MLP, norms, embeddings, blocks, for new models.

A model is called as its PyTorch counterpart, ``model(input_ids=..., attention_mask=...,
token_type_ids=..., position_ids=..., labels=...)``, and returns a :class:`ModelOutput` with
``.logits``, ``.last_hidden_state``, ``.prelogits`` and ``.loss`` (when ``labels`` are given);
language models expose ``model.output_embedding()`` for fused losses.
"""

from train.models.bart import BartForConditionalGeneration, BartModel, generate_seq2seq
from train.models.bert import (
    BertForMaskedLM,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    BertMultiTask,
)
from train.models.decoder import CausalLM, DecoderSpec, generate
from train.models.gpt2 import GPT2LMHeadModel, GPT2Model
from train.models.hf import (
    ARCHITECTURES,
    CheckpointError,
    LoadReport,
    from_config,
    load_multitask,
    load_pretrained,
    load_weights,
    read_tensors,
    save_pretrained,
    state_dict,
)
from train.models.llama import LlamaForCausalLM, LlamaModel
from train.models.marian import MarianModel, MarianMTModel
from train.models.outputs import HFConfig, ModelOutput, OutputEmbedding, Runtime

__all__ = [
    "ARCHITECTURES",
    "BartForConditionalGeneration",
    "BartModel",
    "BertForMaskedLM",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertModel",
    "BertMultiTask",
    "CausalLM",
    "CheckpointError",
    "DecoderSpec",
    "GPT2LMHeadModel",
    "GPT2Model",
    "HFConfig",
    "LlamaForCausalLM",
    "LlamaModel",
    "LoadReport",
    "MarianMTModel",
    "MarianModel",
    "ModelOutput",
    "OutputEmbedding",
    "Runtime",
    "from_config",
    "generate",
    "generate_seq2seq",
    "load_multitask",
    "load_pretrained",
    "load_weights",
    "read_tensors",
    "save_pretrained",
    "state_dict",
]
