"""Hugging Face checkpoints: build the model a ``config.json`` names, load and save its tensors.

- :func:`from_config`: a randomly initialised model from a ``transformers`` config object, a
  config dict or a ``config.json`` path (for training from scratch).
- :func:`load_pretrained`: the model named by a checkpoint folder's ``config.json``
  (``architectures``, else ``model_type``) with its weights from ``model.safetensors``
  (also sharded, via ``model.safetensors.index.json``) or ``pytorch_model.bin``; returned in
  eval mode (dropout off), as ``from_pretrained`` does.
- :func:`save_pretrained`: ``config.json`` + ``model.safetensors`` that
  ``transformers.AutoModelFor...from_pretrained`` loads to the same numbers.
- :func:`state_dict`: any parameter-shaped state (parameters, gradients) under PyTorch names
  and layouts.
- :func:`save_heads` / :func:`load_heads`: a multi-task model's heads (``heads.safetensors``,
  ``heads.json``), beside its trunk's Hugging Face folder.

Example:
  >>> import tempfile
  >>> from transformers import BertConfig
  >>> cfg = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
  ...                  intermediate_size=37, num_labels=5)
  >>> model = from_config(cfg, "BertForTokenClassification")
  >>> folder = tempfile.mkdtemp()
  >>> save_pretrained(model, folder)
  >>> type(load_pretrained(folder)).__name__
  'BertForTokenClassification'
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from train.models import bart, bert, gpt2, llama, marian
from train.models.mapping import TensorMap
from train.models.outputs import Runtime
from train.models.stack import locate, stack_depths, unstacked

log = logging.getLogger(__name__)

#: Architecture name (``config.json``'s ``architectures[0]``) -> model class.
ARCHITECTURES: dict[str, type[nnx.Module]] = {
    "BertModel": bert.BertModel,
    "BertForSequenceClassification": bert.BertForSequenceClassification,
    "BertForTokenClassification": bert.BertForTokenClassification,
    "BertForMaskedLM": bert.BertForMaskedLM,
    "GPT2LMHeadModel": gpt2.GPT2LMHeadModel,
    "GPT2Model": gpt2.GPT2Model,
    "LlamaForCausalLM": llama.LlamaForCausalLM,
    "LlamaModel": llama.LlamaModel,
    "BartForConditionalGeneration": bart.BartForConditionalGeneration,
    "BartModel": bart.BartModel,
    "MarianMTModel": marian.MarianMTModel,
    "MarianModel": marian.MarianModel,
}
#: ``model_type`` -> architecture used when ``config.json`` names none.
DEFAULT_ARCHITECTURE: dict[str, str] = {"bert": "BertModel", "gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
                                         "bart": "BartForConditionalGeneration", "marian": "MarianMTModel"}
_MODEL_TYPE = {"Bert": "bert", "GPT2": "gpt2", "Llama": "llama", "Bart": "bart", "Marian": "marian"}


def family_of(architecture: str) -> str | None:
    """The ``model_type`` an architecture name belongs to (``BertForMaskedLM`` -> ``bert``), or
    ``None`` for a name of no family here."""
    return next((t for prefix, t in _MODEL_TYPE.items() if architecture.startswith(prefix)), None)

# Buffers some checkpoints carry that are not parameters.
_BUFFERS = re.compile(r"(^|\.)(position_ids|attn\.bias|attn\.masked_bias|rotary_emb\.inv_freq)$")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: missing, extra or mis-shaped tensors, a bad file."""


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What :func:`load_weights` did: tensors loaded, left at their initial values, ignored."""

    loaded: tuple[str, ...]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]


# ---------------------------------------------------------------------- configs


def _config_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, (str, os.PathLike)):
        p = Path(config)
        p = p / "config.json" if p.is_dir() else p
        try:
            return json.loads(p.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {p}") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{p}: not valid JSON ({e})") from None
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"config must be a transformers config, a dict or a path, got {type(config).__name__}")


def architecture_of(cfg: Mapping[str, Any], architecture: str | None = None) -> str:
    """The architecture to build: ``architecture``, else ``config.json``'s, else the ``model_type`` default."""
    arch = architecture
    if arch is None:
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else DEFAULT_ARCHITECTURE.get(cfg.get("model_type", ""))
    if arch is None:
        raise ValueError(f"config names no architecture and model_type {cfg.get('model_type')!r} is not supported; "
                         f"supported model types: {sorted(DEFAULT_ARCHITECTURE)}")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; supported: {', '.join(sorted(ARCHITECTURES))}")
    expected = family_of(arch)
    if cfg.get("model_type") not in (None, expected):
        raise ValueError(f"architecture {arch!r} needs model_type {expected!r}, config has {cfg.get('model_type')!r}")
    return arch


def from_config(config: Any, architecture: str | None = None, *, dtype: str = "float32", param_dtype: str = "float32",
                remat: bool | str = False, scan_layers: bool = False, seed: int = 0, **overrides: Any) -> nnx.Module:
    """A randomly initialised model (in training mode) from a Hugging Face config.

    Args:
      config: a ``transformers.PretrainedConfig``, its ``to_dict()``, or a path to
        ``config.json`` (or its folder).
      architecture: e.g. ``"BertForTokenClassification"``; default: the config's.
      dtype: compute dtype (``"float32"`` or ``"bfloat16"``); ``param_dtype``: storage dtype.
      remat: rematerialise each layer in the backward pass: "none", "full" (True) or "dots".
      scan_layers: run each layer stack as one ``jax.lax.scan`` (same values, compiled once
        whatever the depth).
      seed: seed of the initialisation and of dropout.
      overrides: config fields to change, e.g. ``num_labels=9`` (resets ``id2label``).
    """
    cfg = _config_dict(config)
    if "num_labels" in overrides:
        n = int(overrides["num_labels"])
        cfg["id2label"] = {str(i): f"LABEL_{i}" for i in range(n)}
        cfg["label2id"] = {f"LABEL_{i}": i for i in range(n)}
    cfg.update(overrides)
    arch = architecture_of(cfg, architecture)
    cfg["architectures"] = [arch]
    cfg.setdefault("model_type", family_of(arch))
    return ARCHITECTURES[arch](cfg, Runtime(dtype, param_dtype, remat, scan_layers), rngs=nnx.Rngs(seed))


# ---------------------------------------------------------------------- reading tensors


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def _read_bin(path: Path) -> dict[str, np.ndarray]:
    import torch  # only for PyTorch pickles

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad pickle
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
    out = {}
    for k, v in state.items():
        v = v.detach().cpu()
        out[k] = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
    return out


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint folder (or one weights file) as numpy arrays, by PyTorch name."""
    p = Path(path)
    if p.is_dir():
        found = next((p / f for f in _WEIGHT_FILES if (p / f).exists()), None)
        if found is None:
            raise FileNotFoundError(f"{p} has none of {', '.join(_WEIGHT_FILES)}")
        p = found
    if p.name.endswith(".index.json"):
        try:
            index = json.loads(p.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{p}: not a safetensors index ({e})") from None
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(index.values())):
            tensors.update(_read_safetensors(p.parent / shard))
        return tensors
    if p.suffix == ".safetensors":
        return _read_safetensors(p)
    if p.suffix in (".bin", ".pt", ".pth"):
        return _read_bin(p)
    raise CheckpointError(f"{p}: unknown weights format (expected .safetensors or .bin)")


# ---------------------------------------------------------------------- mapping both ways


def _flat_params(model: nnx.Module) -> dict[tuple, nnx.Variable]:
    return {tuple(path): var for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _maps(model: nnx.Module) -> list[TensorMap]:
    if not hasattr(model, "tensor_maps"):
        raise TypeError(f"{type(model).__name__} has no Hugging Face tensor names (tensor_maps)")
    return model.tensor_maps()


def load_weights(model: nnx.Module, tensors: Mapping[str, np.ndarray], *, strict: bool = True,
                 source: str = "checkpoint", warn_missing: bool = True) -> LoadReport:
    """Copies PyTorch-named ``tensors`` into ``model``'s parameters (in place).

    With ``strict`` a tensor the model needs but ``tensors`` lacks, or one the model has no
    place for, raises :class:`CheckpointError` naming them; without, missing parameters keep
    their initial values and extra tensors are ignored (both listed in the report; the missing
    ones logged unless ``warn_missing`` is False, for a partial update). A shape mismatch
    always raises, naming the tensor and both shapes.
    """
    params = _flat_params(model)
    maps = _maps(model)
    wanted = {m.name for m in maps}
    tied = set(getattr(model, "tied_tensors", ())) - wanted
    missing = sorted(m.name for m in maps if m.name not in tensors)
    unexpected = sorted(k for k in tensors if k not in wanted and k not in tied and not _BUFFERS.search(k))
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected[:10])}"
                         + (" ..." if len(unexpected) > 10 else ""))
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: " + "; ".join(parts))
    depths = stack_depths(model)
    rows: dict[tuple, np.ndarray] = {}  # stacked parameters, written row by row on the host, then set once
    loaded = []
    for m in maps:
        if m.name not in tensors:
            continue
        tensor = np.asarray(tensors[m.name])
        places = [locate(p, depths) for p in m.paths]
        shapes = [params[path][...].shape[0 if row is None else 1:] for path, row in places]
        expected = m.torch_shape(shapes)
        if tuple(tensor.shape) != expected:
            raise CheckpointError(f"{source}: tensor {m.name!r} has shape {tuple(tensor.shape)}, "
                                  f"the model expects {expected}")
        if not np.issubdtype(tensor.dtype, np.floating):
            raise CheckpointError(f"{source}: tensor {m.name!r} has dtype {tensor.dtype}, expected floating point")
        for (path, row), value in zip(places, m.to_model(tensor)):
            var = params[path]
            if row is None:
                var.set_value(jnp.asarray(value, dtype=var[...].dtype))
            else:
                if path not in rows:
                    rows[path] = np.array(var[...])
                rows[path][row] = value.astype(rows[path].dtype)
        loaded.append(m.name)
    for path, stacked in rows.items():
        params[path].set_value(jnp.asarray(stacked))
    if missing and warn_missing:
        log.warning("%s: %d parameter(s) not in the checkpoint keep their initial values: %s", source, len(missing),
                    ", ".join(missing))
    return LoadReport(tuple(loaded), tuple(missing), tuple(unexpected))


def state_dict(model: nnx.Module, state: Any = None, *, names: Collection[str] | None = None) -> dict[str, np.ndarray]:
    """``{PyTorch name: array in PyTorch layout}`` of ``model``'s parameters.

    ``state`` (e.g. gradients from ``nnx.grad`` / ``nnx.state(model, nnx.Param)`` of the same
    model) is mapped instead of the parameters when given. Tied tensors appear once, under
    the name PyTorch's ``named_parameters()`` uses. With ``names`` only those tensors are
    converted and returned.
    """
    if state is None:
        flat = {p: v[...] for p, v in _flat_params(model).items()}
    else:
        flat = {tuple(p): (v[...] if isinstance(v, nnx.Variable) else v) for p, v in nnx.to_flat_state(state)}
    flat = unstacked(flat, stack_depths(model))
    out = {}
    for m in _maps(model):
        if names is not None and m.name not in names:
            continue
        try:
            arrays = [np.asarray(flat[p], dtype=np.float32) if flat[p].dtype == jnp.bfloat16 else np.asarray(flat[p])
                      for p in m.paths]
        except KeyError as e:
            raise KeyError(f"state lacks parameter {e.args[0]} for tensor {m.name!r}") from None
        out[m.name] = np.ascontiguousarray(m.from_model(arrays))
    return out


# ---------------------------------------------------------------------- folders


def load_pretrained(path: str | os.PathLike, architecture: str | None = None, *, dtype: str = "float32",
                    param_dtype: str = "float32", remat: bool | str = False, scan_layers: bool = False, seed: int = 0,
                    strict: bool | None = None,
                    with_report: bool = False, **overrides: Any) -> Any:
    """The model a Hugging Face checkpoint folder names, with its weights, in eval mode.

    Args:
      path: a folder with ``config.json`` and ``model.safetensors`` (or a sharded index, or
        ``pytorch_model.bin``).
      architecture: build this head instead (e.g. ``"BertForTokenClassification"`` on a
        ``BertForMaskedLM`` checkpoint); parameters the checkpoint lacks are initialised
        with ``seed``, tensors the model has no place for are ignored.
      strict: require an exact fit of tensors; default True unless ``architecture`` differs
        from the checkpoint's.
      with_report: also return the :class:`LoadReport` (which tensors were loaded, which
        parameters keep their initial values): ``(model, report)``.
      overrides: config fields to change (e.g. ``num_labels=9``).

    Raises:
      CheckpointError: missing / unexpected tensors (strict), a shape mismatch, a corrupt file.
      ValueError: an unknown architecture or model type.
    """
    cfg = _config_dict(path)
    arch = architecture_of(cfg, architecture)
    if strict is None:
        strict = arch == architecture_of(cfg)
    model = from_config(cfg, arch, dtype=dtype, param_dtype=param_dtype, remat=remat, scan_layers=scan_layers, seed=seed,
                        **overrides)
    tensors = _align_prefix(read_tensors(path), {m.name for m in _maps(model)}, _BASE_PREFIX[cfg.get("model_type", "")])
    report = load_weights(model, tensors, strict=strict, source=str(path))
    model.eval()
    return (model, report) if with_report else model


def parameter_paths(model: nnx.Module, names: Sequence[str]) -> set[tuple[str | int, ...]]:
    """The model's parameter paths (as in ``nnx.to_flat_state``) behind the Hugging Face tensor
    ``names`` (a stacked layer's variable stands for all of its rows)."""
    wanted, depths = set(names), stack_depths(model)
    return {locate(path, depths)[0] for m in _maps(model) if m.name in wanted for path in m.paths}


_BASE_PREFIX = {"bert": "bert.", "gpt2": "transformer.", "llama": "model.", "bart": "model.", "marian": "model."}


def _align_prefix(tensors: dict[str, np.ndarray], wanted: set[str], prefix: str) -> dict[str, np.ndarray]:
    """Adds or strips the base-model prefix (``bert.``, ...) when a trunk checkpoint meets a head model or back."""
    if not prefix or any(k in wanted for k in tensors):
        return tensors
    if any(w.startswith(prefix) for w in wanted) and not any(k.startswith(prefix) for k in tensors):
        return {prefix + k: v for k, v in tensors.items()}
    if not any(w.startswith(prefix) for w in wanted) and any(k.startswith(prefix) for k in tensors):
        return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in tensors.items()}
    return tensors


def save_pretrained(model: nnx.Module, path: str | os.PathLike) -> None:
    """Writes ``config.json`` and ``model.safetensors`` (float32 unless the parameters are 16-bit)."""
    from safetensors.numpy import save_file

    arch = type(model).__name__
    if arch not in ARCHITECTURES:
        raise ValueError(f"{arch} has no Hugging Face counterpart; savable: {', '.join(sorted(ARCHITECTURES))}")
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    tensors = state_dict(model)
    cfg = model.config.to_dict()
    cfg["architectures"] = [arch]
    cfg["dtype"] = "float32"
    (p / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(p / "model.safetensors"), metadata={"format": "pt"})


def load_multitask(path: str | os.PathLike, heads: Mapping[str, tuple[str, int]], *, dtype: str = "float32",
                   param_dtype: str = "float32", remat: bool | str = False, scan_layers: bool = False, seed: int = 0,
                   with_report: bool = False) -> Any:
    """A :class:`~train.models.bert.BertMultiTask` whose trunk (and masked-LM head, when the
    checkpoint has one) comes from a BERT checkpoint; other heads are initialised with ``seed``
    (``with_report``: ``(model, LoadReport)``)."""
    cfg = _config_dict(path)
    if cfg.get("model_type") != "bert":
        raise ValueError(f"multi-task models need a BERT checkpoint, {path} has model_type {cfg.get('model_type')!r}")
    model = bert.BertMultiTask(cfg, heads, Runtime(dtype, param_dtype, remat, scan_layers), rngs=nnx.Rngs(seed))
    tensors = _align_prefix(read_tensors(path), {m.name for m in _maps(model)}, "bert.")
    report = load_weights(model, tensors, strict=False, source=str(path))
    model.eval()
    return (model, report) if with_report else model


#: A multi-task model's heads, beside its trunk's ``model.safetensors``: their parameters by path
#: under ``model.heads`` (``/``-joined), and what each head is.
HEADS_WEIGHTS = "heads.safetensors"
HEADS_DESCRIPTION = "heads.json"


def save_heads(model: bert.BertMultiTask, path: str | os.PathLike, description: Mapping[str, Mapping[str, Any]]) -> None:
    """Writes the heads of a :class:`~train.models.bert.BertMultiTask` into the folder ``path``:
    their parameters in ``heads.safetensors`` and ``description`` (by head name: its kind, its
    number of labels, its task's state) in ``heads.json``; :func:`load_heads` reads them back."""
    from safetensors.numpy import save_file

    p = Path(path)
    heads = {"/".join(map(str, k)): np.ascontiguousarray(np.asarray(v))
             for k, v in nnx.to_flat_state(nnx.state(model.heads, nnx.Param))}
    save_file(heads, str(p / HEADS_WEIGHTS))
    (p / HEADS_DESCRIPTION).write_text(json.dumps(description, indent=2))


def load_heads(model: bert.BertMultiTask, path: str | os.PathLike) -> None:
    """Reads the heads that :func:`save_heads` wrote into the folder ``path`` (in place).

    Example:
      >>> import tempfile
      >>> from transformers import BertConfig
      >>> cfg = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
      ...                  intermediate_size=37).to_dict()
      >>> heads = {"tags": ("token_classification", 3)}
      >>> model, folder = bert.BertMultiTask(cfg, heads, rngs=nnx.Rngs(0)), tempfile.mkdtemp()
      >>> save_heads(model, folder, {"tags": {"kind": "token_classification", "num_labels": 3}})
      >>> other = bert.BertMultiTask(cfg, heads, rngs=nnx.Rngs(1))
      >>> load_heads(other, folder)
      >>> import jax
      >>> all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(nnx.state(model.heads, nnx.Param)),
      ...                                          jax.tree.leaves(nnx.state(other.heads, nnx.Param))))
      True
    """
    from safetensors.numpy import load_file

    heads = load_file(str(Path(path) / HEADS_WEIGHTS))
    flat = {tuple(int(p) if p.isdigit() else p for p in k.split("/")): jnp.asarray(v) for k, v in heads.items()}
    nnx.update(model.heads, nnx.from_flat_state(flat))
