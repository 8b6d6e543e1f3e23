"""LoRA adapters on the models' linear layers, in the names and file format of ``peft``.

A targeted linear layer ``y = x W + b`` becomes

    y = x W + b + (alpha / r) * dropout(x) A B

with ``A`` of shape ``(in, r)`` (uniform in ``±1/sqrt(in)``, as peft's Kaiming init) and
``B`` of shape ``(r, out)`` (zeros), so a fresh adapter leaves the model unchanged. ``W`` and
``b`` stay as they are; ``A`` and ``B`` are :class:`flax.nnx.LoRAParam`, so
``nnx.state(model, nnx.LoRAParam)`` selects exactly the adapters, and they carry the logical
axes of their base kernel (``A`` its input axis, ``B`` its output axis) for sharding.

Targets are matched against the Hugging Face module names of the model (its
``tensor_maps``) as ``peft`` matches ``target_modules``: a name equal to a target, or ending
in ``"." + target``. Adapters are written and read as ``adapter_config.json`` +
``adapter_model.safetensors``, with peft's tensor names
(``base_model.model.<module>.lora_A.weight`` of shape ``(r, in)``, ``lora_B.weight`` of
shape ``(out, r)``, and ``modules_to_save`` under their plain names).

Example:
  >>> from transformers import BertConfig
  >>> from train.models import from_config
  >>> model = from_config(BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1,
  ...     num_attention_heads=2, intermediate_size=16), "BertModel")
  >>> names = add_lora(model, LoraConfig(rank=2, targets=("query", "value")), nnx.Rngs(0))
  >>> names
  ['encoder.layer.0.attention.self.query', 'encoder.layer.0.attention.self.value']
  >>> sum(v[...].size for _, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)))
  64
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import Array

from train.models.matmul import matmul
from train.models.stack import locate, looped, stack_depths

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """What to adapt and how (peft's ``LoraConfig`` fields of the same meaning)."""

    rank: int  # r: the inner dimension of A B
    targets: tuple[str, ...]  # target_modules: Hugging Face module names or their last parts
    alpha: float = 8.0  # lora_alpha: the update is scaled by alpha / rank
    dropout: float = 0.0  # lora_dropout: on the adapter's input only
    modules_to_save: tuple[str, ...] = ()  # trained in full and saved with the adapter (task heads)

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not self.targets:
            raise ValueError("LoRA needs at least one target module")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must lie in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoraAdapter(nnx.Module):
    """The low-rank update ``(alpha / r) * dropout(x) A B`` of one linear layer."""

    def __init__(self, in_features: int, out_features: int, config: LoraConfig, axes: tuple[Any, Any],
                 param_dtype: Any, rngs: nnx.Rngs, shared_a: nnx.LoRAParam | None = None,
                 deterministic: bool = False):
        if shared_a is None:
            bound = 1.0 / math.sqrt(in_features)
            a = jax.random.uniform(rngs.params(), (in_features, config.rank), param_dtype, -bound, bound)
            shared_a = nnx.LoRAParam(a, out_sharding=(axes[0], None), eager_sharding=False)
        self.lora_a = shared_a  # one A for the parts of a split PyTorch layer (GPT-2's c_attn)
        self.lora_b = nnx.LoRAParam(jnp.zeros((config.rank, out_features), param_dtype),
                                    out_sharding=(None, axes[1]), eager_sharding=False)
        self.scaling = config.scaling
        self.dropout = nnx.data(nnx.Dropout(config.dropout, deterministic=deterministic, rngs=rngs)
                                if config.dropout > 0 else None)

    def __call__(self, x: Array, dtype: Any) -> Array:
        """The float32 update for inputs ``x`` of shape ``(..., in)``."""
        h = matmul(x if self.dropout is None else self.dropout(x), self.lora_a[...], dtype)
        return matmul(h, self.lora_b[...], dtype) * self.scaling


#: The layers that get adapters when no targets are given, by model family: the attention's
#: projections, as peft's defaults.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": ("query", "value"),
    "gpt2": ("c_attn",),
    "llama": ("q_proj", "v_proj"),
    "bart": ("q_proj", "v_proj"),
    "marian": ("q_proj", "v_proj"),
}


def modules_of_paths(model: nnx.Module, paths: set[tuple[Any, ...]]) -> list[str]:
    """The Hugging Face module names whose every tensor lies at one of ``paths`` (e.g. new heads)."""
    modules: dict[str, bool] = {}
    depths = stack_depths(model)
    for m in model.tensor_maps():
        module = m.name.rsplit(".", 1)[0]
        inside = all(locate(p, depths)[0] in paths for p in m.paths)
        modules[module] = modules.get(module, True) and inside
    return sorted(name for name, inside in modules.items() if inside)


def module_names(model: nnx.Module) -> dict[str, tuple[tuple[str | int, ...], ...]]:
    """``{Hugging Face module name: model paths of its layers}`` for every linear layer mapped.

    A PyTorch layer whose one weight fills several layers here (GPT-2's fused ``c_attn``:
    query | key | value side by side) has several paths; its adapter is one ``A`` shared by
    them and ``B`` split the same way, which is peft's adapter of the fused layer.
    """
    names = {}
    for m in model.tensor_maps():
        if m.name.endswith(".weight") and all(p[-1] == "kernel" for p in m.paths):
            names[m.name[: -len(".weight")]] = tuple(tuple(p[:-1]) for p in m.paths)
    return names


def conv1d_module_names(model: nnx.Module) -> set[str]:
    """The module names whose PyTorch weight is already ``(in, out)`` (GPT-2's ``Conv1D``)."""
    return {m.name[: -len(".weight")] for m in model.tensor_maps()
            if m.kind in ("copy", "split") and m.name.endswith(".weight") and all(p[-1] == "kernel" for p in m.paths)}


def matches(name: str, target: str) -> bool:
    """peft's rule for a ``target_modules`` list entry.

    >>> matches("bert.encoder.layer.0.attention.self.query", "query"), matches("x.query_proj", "query")
    (True, False)
    """
    return name == target or name.endswith("." + target)


def _module_at(model: nnx.Module, path: Sequence[str | int]) -> Any:
    node: Any = model
    for part in path:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    return node


def _axes(variable: nnx.Variable) -> tuple[Any, Any]:
    axes = variable.get_metadata().get("out_sharding") or (None, None)
    return tuple(axes)  # type: ignore[return-value]


def add_lora(model: nnx.Module, config: LoraConfig, rngs: nnx.Rngs) -> list[str]:
    """Puts a fresh adapter on every linear layer ``config.targets`` names; returns their names.

    Raises ``ValueError`` naming the targets that match no layer (with the layers there are).
    In a model whose layers are stored stacked (``scan_layers=True``) the adapters are stacked too.
    """
    with looped(model):
        return _add_lora(model, config, rngs)


def _add_lora(model: nnx.Module, config: LoraConfig, rngs: nnx.Rngs) -> list[str]:
    names = module_names(model)
    unmatched = [t for t in config.targets if not any(matches(n, t) for n in names)]
    if unmatched:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ValueError(f"LoRA targets {unmatched} match no linear layer of {type(model).__name__}; "
                         f"its layers end in: {', '.join(leaves)}")
    chosen = sorted({n for n in names for t in config.targets if matches(n, t)})
    # the adapters' dropout starts in the model's mode (train() / eval() switch it later)
    deterministic = next((bool(m.deterministic) for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Dropout)), False)
    for name in chosen:
        shared_a = None
        for path in names[name]:
            layer = _module_at(model, path)
            kernel = layer.kernel
            layer.lora = LoraAdapter(layer.in_features, layer.out_features, config, _axes(kernel), kernel[...].dtype,
                                     rngs, shared_a, deterministic)
            shared_a = layer.lora.lora_a
    return chosen


def trainable_paths_filter(paths: set[tuple[Any, ...]]) -> nnx.filterlib.Filter:
    """The adapters, and the parameters at ``paths`` (trained in full, e.g. new heads)."""
    return nnx.Any(nnx.LoRAParam, nnx.All(nnx.Param, lambda path, _value: tuple(path) in paths))


def trainable_filter(model: nnx.Module, config: LoraConfig) -> nnx.filterlib.Filter:
    """The ``nnx`` filter of what a LoRA run trains: the adapters and ``modules_to_save``."""
    names, depths = module_names(model), stack_depths(model)
    saved_paths = []
    for target in config.modules_to_save:
        found = [locate(p, depths)[0] for n, paths in names.items() if matches(n, target) for p in paths]
        if not found:
            raise ValueError(f"modules_to_save entry {target!r} matches no layer of {type(model).__name__}")
        saved_paths.extend(found)

    def under_saved(path: tuple, _value: Any) -> bool:
        return any(tuple(path[: len(p)]) == p for p in saved_paths)

    return nnx.Any(nnx.LoRAParam, nnx.All(nnx.Param, under_saved))


# ---------------------------------------------------------------------- peft files


def adapter_tensors(model: nnx.Module, config: LoraConfig) -> dict[str, np.ndarray]:
    """The adapter (and ``modules_to_save``) as peft's PyTorch-named tensors."""
    with looped(model):
        return _adapter_tensors(model, config)


def _adapter_tensors(model: nnx.Module, config: LoraConfig) -> dict[str, np.ndarray]:
    names = module_names(model)
    out = {}
    for name, paths in names.items():
        layers = [_module_at(model, p) for p in paths]
        if layers[0].lora is not None:
            a = layers[0].lora.lora_a[...]
            b = jnp.concatenate([layer.lora.lora_b[...] for layer in layers], axis=-1)
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(np.asarray(a, np.float32).T)
            out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(np.asarray(b, np.float32).T)
    saved = {m.name for m in model.tensor_maps()
             if any(matches(m.name.rsplit(".", 1)[0], t) for t in config.modules_to_save)}
    if saved:
        from train.models.hf import state_dict

        out.update({PEFT_PREFIX + name: value for name, value in state_dict(model, names=saved).items()})
    return out


def save_adapter(model: nnx.Module, config: LoraConfig, path: str | os.PathLike, *,
                 base_model_name_or_path: str | None = None, task_type: str | None = None) -> None:
    """Writes ``adapter_config.json`` and ``adapter_model.safetensors`` as peft does."""
    from safetensors.numpy import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    conv1d = conv1d_module_names(model)
    # peft's name for a Conv1D target; A and B keep their nn.Linear layouts either way
    fan_in_fan_out = any(matches(n, t) for n in conv1d for t in config.targets)
    peft_config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": list(config.targets), "modules_to_save": list(config.modules_to_save) or None,
        "bias": "none", "fan_in_fan_out": fan_in_fan_out, "inference_mode": True, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
    }
    (folder / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
    save_file(adapter_tensors(model, config), str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def read_adapter_config(path: str | os.PathLike) -> LoraConfig:
    """The :class:`LoraConfig` of a peft adapter folder (a LoRA without per-module ranks)."""
    file = Path(path) / ADAPTER_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file (a peft adapter folder holds {ADAPTER_CONFIG})")
    raw = json.loads(file.read_text())
    if raw.get("peft_type") != "LORA":
        raise ValueError(f"{file}: peft_type is {raw.get('peft_type')!r}; only LORA adapters are read")
    for key in ("rank_pattern", "alpha_pattern"):
        if raw.get(key):
            raise ValueError(f"{file}: {key} (per-module ranks or alphas) is not supported")
    for key in ("use_dora", "use_rslora"):
        if raw.get(key):
            raise ValueError(f"{file}: {key}=true is not supported")
    targets = raw["target_modules"]
    if isinstance(targets, str):
        raise ValueError(f"{file}: target_modules as a regular expression ({targets!r}) is not supported; "
                         f"give a list of names")
    return LoraConfig(rank=int(raw["r"]), targets=tuple(targets), alpha=float(raw["lora_alpha"]),
                      dropout=float(raw.get("lora_dropout") or 0.0),
                      modules_to_save=tuple(dict.fromkeys(raw.get("modules_to_save") or ())))


def load_adapter(model: nnx.Module, path: str | os.PathLike, rngs: nnx.Rngs | None = None) -> LoraConfig:
    """Adds the adapter saved in a peft folder to ``model`` (in place); returns its config.

    Every tensor in the file must find its place, and every adapter its two tensors;
    otherwise ``ValueError`` names them.
    """
    from safetensors.numpy import load_file

    config = read_adapter_config(path)
    file = Path(path) / ADAPTER_WEIGHTS
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file")
    tensors = {re.sub(r"\.default\.", ".", k): v for k, v in load_file(str(file)).items()}
    with looped(model):
        _load_adapter_tensors(model, config, tensors, file, rngs or nnx.Rngs(0))
    return config


def _load_adapter_tensors(model: nnx.Module, config: LoraConfig, tensors: dict[str, np.ndarray], file: Path,
                          rngs: nnx.Rngs) -> None:
    from train.models.hf import load_weights

    adapted = add_lora(model, config, rngs)
    names = module_names(model)
    used = set()
    for name in adapted:
        layers = [_module_at(model, p) for p in names[name]]
        a_name, b_name = f"{PEFT_PREFIX}{name}.lora_A.weight", f"{PEFT_PREFIX}{name}.lora_B.weight"
        for tensor_name in (a_name, b_name):
            if tensor_name not in tensors:
                raise ValueError(f"{file}: lacks {tensor_name}")
        a, b = tensors[a_name].T, tensors[b_name].T
        widths = [layer.out_features for layer in layers]
        expected_a, expected_b = layers[0].lora.lora_a[...].shape, (config.rank, sum(widths))
        if a.shape != expected_a or b.shape != expected_b:
            raise ValueError(f"{file}: {name} has lora_A {tensors[a_name].shape} and lora_B {tensors[b_name].shape}, "
                             f"expected {expected_a[::-1]} and {expected_b[::-1]}")
        layers[0].lora.lora_a.set_value(jnp.asarray(a, layers[0].lora.lora_a[...].dtype))
        for layer, part in zip(layers, np.split(b, np.cumsum(widths)[:-1], axis=-1)):
            layer.lora.lora_b.set_value(jnp.asarray(part, layer.lora.lora_b[...].dtype))
        used.update((a_name, b_name))
    saved = {k[len(PEFT_PREFIX):]: v for k, v in tensors.items() if k not in used and k.startswith(PEFT_PREFIX)}
    leftover = sorted(k for k in tensors if k not in used and not k.startswith(PEFT_PREFIX))
    if leftover:
        raise ValueError(f"{file}: tensors outside {PEFT_PREFIX!r}: {leftover[:5]}")
    if saved:
        load_weights(model, saved, strict=False, source=str(file), warn_missing=False)


def merge_lora(model: nnx.Module) -> int:
    """Folds every adapter into its kernel, ``W += (alpha / r) A B``, and removes it; returns the count."""
    with looped(model):
        return _merge_lora(model)


def _merge_lora(model: nnx.Module) -> int:
    count = 0
    for _, layer in list(nnx.iter_modules(model)):
        adapter = getattr(layer, "lora", None)
        if isinstance(adapter, LoraAdapter):
            a = adapter.lora_a[...].astype(jnp.float32)
            b = adapter.lora_b[...].astype(jnp.float32)
            kernel = layer.kernel
            kernel.set_value((kernel[...].astype(jnp.float32) + adapter.scaling * (a @ b)).astype(kernel[...].dtype))
            layer.lora = None
            count += 1
    return count
