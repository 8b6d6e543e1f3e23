"""How a Hugging Face tensor name maps onto parameters of a model here (and back).

A :class:`TensorMap` names one tensor of a PyTorch state dict, the parameter path(s) it
fills in ``nnx.state(model, nnx.Param)`` and the layout change between them:

- ``"copy"``: same layout (embeddings, norms, biases, GPT-2's ``Conv1D`` weights);
- ``"linear"``: ``nn.Linear.weight`` ``(out, in)`` <-> kernel ``(in, out)`` (a transpose);
- ``"split"``: one PyTorch tensor holding several parameters side by side along its last
  axis (GPT-2's fused ``c_attn`` = query | key | value).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

Path = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True)
class TensorMap:
    name: str
    paths: tuple[Path, ...]
    kind: str = "copy"

    def to_model(self, tensor: np.ndarray) -> list[np.ndarray]:
        """The PyTorch-layout ``tensor`` as this model's parameter(s)."""
        if self.kind == "copy":
            return [tensor]
        if self.kind == "linear":
            return [np.ascontiguousarray(tensor.T)]
        if self.kind == "split":
            return [np.ascontiguousarray(a) for a in np.split(tensor, len(self.paths), axis=-1)]
        raise ValueError(f"unknown tensor layout {self.kind!r}")

    def from_model(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """This model's parameter(s) as the PyTorch-layout tensor."""
        if self.kind == "copy":
            return np.asarray(arrays[0])
        if self.kind == "linear":
            return np.ascontiguousarray(np.asarray(arrays[0]).T)
        if self.kind == "split":
            return np.concatenate([np.asarray(a) for a in arrays], axis=-1)
        raise ValueError(f"unknown tensor layout {self.kind!r}")

    def torch_shape(self, shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
        """The PyTorch shape implied by the model's parameter ``shapes``."""
        if self.kind == "copy":
            return tuple(shapes[0])
        if self.kind == "linear":
            return tuple(reversed(shapes[0]))
        first = tuple(shapes[0])
        return first[:-1] + (sum(s[-1] for s in shapes),)


def linear(name: str, path: Path, *, bias: bool = True, kind: str = "linear") -> list[TensorMap]:
    """``name.weight`` -> ``path/kernel`` (transposed) and ``name.bias`` -> ``path/bias``."""
    maps = [TensorMap(f"{name}.weight", (path + ("kernel",),), kind)]
    if bias:
        maps.append(TensorMap(f"{name}.bias", (path + ("bias",),)))
    return maps


def conv1d(name: str, path: Path, *, bias: bool = True) -> list[TensorMap]:
    """GPT-2's ``Conv1D`` (weight already ``(in, out)``)."""
    return linear(name, path, bias=bias, kind="copy")


def norm(name: str, path: Path, *, bias: bool = True) -> list[TensorMap]:
    """``name.weight`` -> ``path/scale`` and ``name.bias`` -> ``path/bias``."""
    maps = [TensorMap(f"{name}.weight", (path + ("scale",),))]
    if bias:
        maps.append(TensorMap(f"{name}.bias", (path + ("bias",),)))
    return maps


def embedding(name: str, path: Path) -> list[TensorMap]:
    """``name.weight`` -> ``path/embedding``."""
    return [TensorMap(f"{name}.weight", (path + ("embedding",),))]


def prefixed(maps: Sequence[TensorMap], name_prefix: str, path_prefix: Path) -> list[TensorMap]:
    """``maps`` with ``name_prefix`` before every tensor name and ``path_prefix`` before every path."""
    return [dataclasses.replace(m, name=name_prefix + m.name, paths=tuple(path_prefix + p for p in m.paths)) for m in maps]
