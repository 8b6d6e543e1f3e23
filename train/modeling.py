"""Which tokenizer and model a run trains, and how the trained model is written out.

- Tokenizer: ``--tokenizer``, else the ``--model`` folder's, else one trained on the run's
  training texts (WordPiece for encoders, byte-level BPE for a decoder), saved in the run.
- Model: ``--model`` (a Hugging Face folder) fine-tuned, else a model built from scratch at
  ``--model-size``: a BERT encoder with the task's head, a GPT-2 decoder for ``lm``, a BART
  encoder-decoder for ``seq2seq``, or one BERT trunk with a head per task for ``multitask``.
- Output: the trained model in Hugging Face format (a multi-task model: its trunk, which
  ``transformers.AutoModel`` loads, and its heads in ``heads.safetensors``); with
  ``--lora-rank`` a peft adapter instead (``adapter_config.json``, ``adapter_model.safetensors``),
  and with ``--merge-lora`` the merged plain model beside it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import yaml
from flax import nnx
from jax.sharding import Mesh

from train import sharding
from train.config import TrainConfig
from train.data.tokenization import load_tokenizer, train_tokenizer
from train.models import BertMultiTask, from_config, load_pretrained, save_pretrained, state_dict
from train.models.hf import LoadReport, family_of, load_heads, parameter_paths, save_heads
from train.models.lora import (
    ADAPTER_CONFIG,
    DEFAULT_TARGETS,
    LoraConfig,
    load_adapter,
    merge_lora,
    modules_of_paths,
    save_adapter,
)
from train.models.outputs import Runtime
from train.models.sources import resolve_checkpoint
from train.tasks.base import Task

#: (hidden size, layers, attention heads, MLP size) of models trained from scratch.
MODEL_SIZES: dict[str, tuple[int, int, int, int]] = {
    "micro": (64, 1, 2, 128),
    "tiny": (128, 2, 2, 512),
    "mini": (256, 4, 4, 1024),
    "small": (512, 4, 8, 2048),
    "base": (768, 12, 12, 3072),
}


def run_family(tasks: Sequence[Task]) -> str:
    """The model family the run trains: its task's (:attr:`Task.family <train.tasks.base.Task.family>`:
    a decoder, an encoder-decoder or an encoder), or for several tasks an encoder trunk."""
    return tasks[0].family if len(tasks) == 1 else "encoder"


def checkpoint_folders(config: TrainConfig) -> tuple[Path | None, Path | None]:
    """The local folders of ``--model`` and ``--tokenizer`` (default: the model's), each a
    folder, a packaged checkpoint or a Hub id (:func:`train.models.sources.resolve_checkpoint`)."""
    model = resolve_checkpoint(config.model, what="--model") if config.model else None
    tokenizer = resolve_checkpoint(config.tokenizer, what="--tokenizer") if config.tokenizer else model
    return model, tokenizer


#: The model families (``config.json``'s ``model_type``) each kind of run fine-tunes.
FAMILIES_FOR_RUN = {"decoder": ("gpt2", "llama"), "seq2seq": ("bart", "marian"), "encoder": ("bert",)}
#: The kind of tokenizer trained on the run's texts for each kind of run.
TOKENIZER_FOR_RUN = {"decoder": "bpe", "seq2seq": "bpe", "encoder": "wordpiece"}


def check_checkpoint(model_dir: Path, tasks: Sequence[Task]) -> None:
    """Refuses, before any data is read, a ``--model`` folder whose ``config.json`` is not a
    model family this run can fine-tune, or names an architecture of no known family,
    naming the file, what it holds and what is supported."""
    from train.models.hf import ARCHITECTURES, family_of

    path = model_dir / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"--model {model_dir}: no config.json; a Hugging Face model folder holds config.json "
                                "and model.safetensors") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    families = FAMILIES_FOR_RUN[run_family(tasks)]
    model_type = cfg.get("model_type")
    named = (cfg.get("architectures") or [None])[0]
    kinds = "+".join(t.kind for t in tasks)
    if model_type not in families:
        raise ValueError(f"{path}: model_type {model_type!r}{f' ({named})' if named else ''} cannot be fine-tuned "
                         f"for {kinds}; it needs a {' or '.join(families)} checkpoint")
    known = [a for a in ARCHITECTURES if family_of(a) == model_type]
    if named is not None and family_of(named) != model_type:
        raise ValueError(f"{path}: architecture {named!r} is not a {model_type} model that jaxloss has; "
                         f"{model_type} architectures: {', '.join(sorted(known))}")


def build_tokenizer(config: TrainConfig, tasks: Sequence[Task], records: Mapping[str, tuple[Any, Any]], save_dir: Path,
                    source: Path | None = None) -> Any:
    """The run's tokenizer: loaded from the folder ``source``, else the run's own (resumed), else
    trained on the training texts; saved (again) into ``save_dir`` so the run folder is self-contained."""
    if source is None and (save_dir / "tokenizer.json").exists():
        source = str(save_dir)  # a resumed run keeps its tokenizer
    if source is not None:
        tokenizer = load_tokenizer(source)
    else:
        texts = [text for t in tasks for text in t.texts(records[t.name][0])]
        kind = TOKENIZER_FOR_RUN[run_family(tasks)]
        tokenizer = train_tokenizer(texts, kind=kind, vocab_size=config.vocab_size, model_max_length=max(512, config.max_length))
    tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def _encoder_config(config: TrainConfig, vocab_size: int) -> dict[str, Any]:
    from transformers import BertConfig

    hidden, layers, heads, mlp = _size(config.model_size)
    return BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=mlp, max_position_embeddings=max(512, config.max_length)).to_dict()


def _decoder_config(config: TrainConfig, vocab_size: int, tokenizer: Any) -> dict[str, Any]:
    from transformers import GPT2Config

    hidden, layers, heads, _ = _size(config.model_size)
    return GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads,
                      n_positions=max(512, config.max_length), bos_token_id=tokenizer.eos_token_id,
                      eos_token_id=tokenizer.eos_token_id).to_dict()


def _seq2seq_config(config: TrainConfig, vocab_size: int, tokenizer: Any) -> dict[str, Any]:
    """A BART encoder-decoder at ``--model-size`` (each stack that many layers); the
    tokenizer's end-of-sequence token also starts the decoder, as in BART."""
    from transformers import BartConfig

    hidden, layers, heads, mlp = _size(config.model_size)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    return BartConfig(vocab_size=vocab_size, d_model=hidden, encoder_layers=layers, decoder_layers=layers,
                      encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=mlp,
                      decoder_ffn_dim=mlp, max_position_embeddings=max(512, config.max_length + 1),
                      pad_token_id=pad, bos_token_id=eos, eos_token_id=eos, decoder_start_token_id=eos,
                      forced_bos_token_id=None, forced_eos_token_id=None).to_dict()


def _size(name: str) -> tuple[int, int, int, int]:
    if name not in MODEL_SIZES:
        raise ValueError(f"model_size={name!r} is not one of {', '.join(MODEL_SIZES)}")
    return MODEL_SIZES[name]


def is_shared_trunk_run(tasks: Sequence[Task]) -> bool:
    """Whether the run trains a :class:`BertMultiTask`: several tasks, or a head that no
    Hugging Face class has (a siamese pair-similarity head)."""
    return len(tasks) > 1 or tasks[0].head()[0] == "pair_similarity"


def load_checkpoint_model(model_dir: Path, tasks: Sequence[Task], **runtime: Any) -> tuple[nnx.Module, LoadReport]:
    """The run's model with the weights of the checkpoint folder ``model_dir`` (one trunk with a
    head per task for a shared-trunk run, else the task's architecture; what the checkpoint lacks
    initialised), and the report of which tensors it provided. ``runtime``: ``dtype``,
    ``param_dtype``, ``remat``, ``scan_layers``, ``seed`` (default: float32, no remat, looped, 0)."""
    if is_shared_trunk_run(tasks):
        from train.models import load_multitask

        return load_multitask(model_dir, {t.name: t.head() for t in tasks}, **runtime, with_report=True)
    task = tasks[0]
    return load_pretrained(model_dir, task.architecture, strict=False, with_report=True, **runtime,
                           **task.label_overrides())


def scans_layers(config: TrainConfig) -> bool:
    """Whether the run's layers are stored stacked and scanned: ``--scan-layers`` /
    ``--no-scan-layers`` where given, else on for accelerators (GPU, TPU), as MaxText and
    levanter do, and off on CPUs, where the scanned step runs 15-17% slower
    (docs/benchmarks.md)."""
    if config.scan_layers is not None:
        return config.scan_layers
    return _backend() != "cpu"


def _backend() -> str:
    return jax.default_backend()


def with_layer_layout(config: TrainConfig, out_dir: Path) -> TrainConfig:
    """``config`` with ``scan_layers`` decided, so that ``config.yaml`` records it: as given,
    else as the run being resumed in ``out_dir`` decided it (its checkpoints hold that
    layout, on whatever device it resumes), else by :func:`scans_layers`. Refuses a flag
    that contradicts the checkpoints it would resume from."""
    saved = out_dir / "config.yaml"
    previous = yaml.safe_load(saved.read_text()).get("scan_layers") if saved.exists() else None
    has_checkpoints = (out_dir / "checkpoints").is_dir() and any((out_dir / "checkpoints").iterdir())
    if config.scan_layers is None:
        decided = previous if isinstance(previous, bool) and has_checkpoints else scans_layers(config)
        return dataclasses.replace(config, scan_layers=decided)
    if isinstance(previous, bool) and has_checkpoints and previous != config.scan_layers:
        given, saved_as = ("--scan-layers", "looped") if config.scan_layers else ("--no-scan-layers", "stacked")
        raise ValueError(f"{given}: the run in {out_dir} was saved with its layers {saved_as} ({saved}: scan_layers: "
                         f"{str(previous).lower()}); resume it without the flag, or start it in another --output-dir")
    return config


def build_model(config: TrainConfig, tasks: Sequence[Task], tokenizer: Any, mesh: Mesh,
                model_dir: Path | None = None) -> tuple[nnx.Module, set[tuple[Any, ...]] | None]:
    """The model to train, and the paths of its parameters that a checkpoint did not provide
    (its new heads; None for a model trained from scratch): loaded from the checkpoint folder
    ``model_dir`` on the host, else created sharded on ``mesh`` at ``--model-size``."""
    vocab_size = len(tokenizer)
    runtime = dict(dtype=config.dtype, param_dtype=config.param_dtype, remat=config.remat,
                   scan_layers=scans_layers(config), seed=config.seed)

    def load() -> tuple[nnx.Module, set[tuple[Any, ...]]]:
        model, report = load_checkpoint_model(model_dir, tasks, **runtime)
        loaded = parameter_paths(model, report.loaded)
        return model, {tuple(path) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))} - loaded

    def make() -> nnx.Module:
        if is_shared_trunk_run(tasks):
            cfg = _encoder_config(config, vocab_size)
            heads = {t.name: t.head() for t in tasks}
            return BertMultiTask(cfg, heads, Runtime(config.dtype, config.param_dtype, config.remat, runtime["scan_layers"]),
                                 rngs=nnx.Rngs(config.seed))
        task = tasks[0]
        if task.family == "decoder":
            return from_config(_decoder_config(config, vocab_size, tokenizer), "GPT2LMHeadModel", **runtime)
        if task.family == "seq2seq":
            return from_config(_seq2seq_config(config, vocab_size, tokenizer), "BartForConditionalGeneration", **runtime)
        return from_config(_encoder_config(config, vocab_size), task.architecture, **runtime, **task.label_overrides())

    if model_dir is not None:
        # a checkpoint is read on the host; the loop then places its arrays on the mesh
        with sharding.unsharded():
            return load()
    return sharding.create_sharded(make, mesh), None


def lora_config_for(config: TrainConfig, model: nnx.Module, new_paths: set[tuple[Any, ...]]) -> LoraConfig | None:
    """The run's LoRA settings (``None`` without ``--lora-rank``): the targets asked for, or the
    model family's defaults, and the new heads as ``modules_to_save``."""
    if not config.lora_rank:
        return None
    family = family_of(type(model).__name__) or "bert"
    targets = tuple(t.strip() for t in (config.lora_targets or "").split(",") if t.strip()) or DEFAULT_TARGETS[family]
    return LoraConfig(rank=config.lora_rank, targets=targets, alpha=config.lora_alpha, dropout=config.lora_dropout,
                      modules_to_save=tuple(modules_of_paths(model, new_paths)))


def save_final_model(model: nnx.Module, tasks: Sequence[Task], tokenizer: Any, path: Path) -> None:
    """Writes the trained model and its tokenizer as a Hugging Face folder."""
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(path))
    if not isinstance(model, BertMultiTask):
        save_pretrained(model, path)
        return
    from safetensors.numpy import save_file

    tensors = state_dict(model)
    trunk = {k.removeprefix("bert."): v for k, v in tensors.items() if k.startswith("bert.")}
    cfg = model.config.to_dict()
    cfg["architectures"] = ["BertModel"]
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    save_file({k: np.ascontiguousarray(v) for k, v in trunk.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})
    save_heads(model, path, _head_descriptions(tasks))


def _head_descriptions(tasks: Sequence[Task]) -> dict[str, dict[str, Any]]:
    """What ``heads.json`` says of each task's head: its kind, its number of labels, the task's state."""
    return {t.name: {"kind": t.head()[0], "num_labels": t.head()[1], **t.state()} for t in tasks}


def save_lora_model(model: nnx.Module, lora: LoraConfig, tasks: Sequence[Task], tokenizer: Any, path: Path, *,
                    base: str, merged_path: Path | None = None) -> None:
    """Writes the run's adapter in peft's format (and a multi-task model's heads) with the
    tokenizer; with ``merged_path`` also the adapters merged into a plain model there."""
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(path))
    save_adapter(model, lora, path, base_model_name_or_path=base)
    if isinstance(model, BertMultiTask):
        save_heads(model, path, _head_descriptions(tasks))
    if merged_path is not None:
        merge_lora(model)
        save_final_model(model, tasks, tokenizer, merged_path)


def is_adapter_folder(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file()


def load_lora_model(config: TrainConfig, tasks: Sequence[Task], path: Path) -> nnx.Module:
    """A LoRA run's model: its base checkpoint (``--model`` of the run), the adapter and, for
    a multi-task run, the heads saved in ``path``."""
    model_dir, _ = checkpoint_folders(config)
    if model_dir is None:
        raise FileNotFoundError(f"{path} holds a LoRA adapter but the run's config names no --model to adapt")
    model, _ = load_checkpoint_model(model_dir, tasks)
    load_adapter(model, path)
    if is_shared_trunk_run(tasks):
        load_heads(model, path)
    return model
