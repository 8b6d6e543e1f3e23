"""A stack of layers of one structure, stored one per layer (looped) or stacked (scanned).

A transformer's layers are ``x_{i+1} = layer_i(x_i)`` for ``i < depth``. Stored one per
layer (an ``nnx.List``), the step's program holds every layer: tracing, compiling and the
optimizer's update grow with the depth. A :class:`LayerStack` stores them as *one* module
whose every variable has a leading axis of size ``depth`` (parameter ``P`` of layer ``i`` is
``P[i]``) and runs them as one ``jax.lax.scan``: the layer is traced and compiled once, and
the optimizer updates a fixed number of arrays, whatever the depth (what MaxText and levanter
do).

The stacking axis has the logical name ``"layers"`` (replicated by the rules table). Hugging
Face names stay those of separate layers: tensor maps name the looped path
``(..., "layers", i, ...)``, and :func:`locate` finds it in a stacked model as row ``i`` of
``(..., "layers", "layer", ...)``.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> layers = [nnx.Linear(2, 2, rngs=nnx.Rngs(i)) for i in range(3)]
  >>> x = jnp.ones((1, 2))
  >>> looped = layers[2](layers[1](layers[0](x)))
  >>> stack = LayerStack(layers)
  >>> stack.layer.kernel.shape
  (3, 2, 2)
  >>> bool(jnp.allclose(run_layers(stack, x), looped))
  True
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from train.models.layers import REMAT_POLICIES, remat_policy, rematerialised
from train.models.partitioning import LAYERS  # the stacking axis; the rules table replicates it

Array = jax.Array
Path = tuple[Any, ...]

#: The attribute of a :class:`LayerStack` that holds the stacked layer.
STACKED = "layer"


class LayerStack(nnx.Module):
    """``depth`` layers of one structure stored as one module with a leading ``depth`` axis.

    ``len(stack)`` is the depth; ``stack[i]`` (and iteration) gives layer ``i`` as a separate
    module, a copy for reading (decoding with a cache); :func:`run_layers` runs all of them
    as one scan, writing the layers' updated non-parameter state (dropout streams' counters)
    back. Built from separate layers, it holds their values: parameters, and dropout streams
    that draw the masks the loop would.

    Raises:
      ValueError: no layers, or layers of different structure (naming the first that differs).
    """

    def __init__(self, layers: Sequence[nnx.Module]):
        if not layers:
            raise ValueError("a layer stack needs at least one layer")
        graphdef = nnx.graphdef(layers[0])
        for i, layer in enumerate(layers[1:], 1):
            if nnx.graphdef(layer) != graphdef:
                raise ValueError(f"stacked layers must have one structure; layer {i} differs from layer 0")
        stacked = jax.tree.map(lambda *values: jnp.stack(values), *[nnx.state(layer) for layer in layers])
        self.layer = nnx.merge(graphdef, stacked)
        self.depth = len(layers)
        for _, node in nnx.iter_graph(self.layer):
            if isinstance(node, nnx.Variable) and node.get_metadata().get("out_sharding"):
                node.set_metadata(out_sharding=(LAYERS,) + tuple(node.get_metadata()["out_sharding"]))

    def __len__(self) -> int:
        return self.depth

    def __getitem__(self, i: int) -> nnx.Module:
        if not -self.depth <= i < self.depth:
            raise IndexError(f"layer {i} of a stack of {self.depth}")
        graphdef, state = nnx.split(self.layer)
        layer = nnx.merge(graphdef, jax.tree.map(lambda value: value[i], state))
        for _, node in nnx.iter_graph(layer):
            axes = isinstance(node, nnx.Variable) and node.get_metadata().get("out_sharding")
            if axes and axes[0] == LAYERS:
                node.set_metadata(out_sharding=tuple(axes[1:]))
        return layer

    def __iter__(self) -> Iterator[nnx.Module]:
        return (self[i] for i in range(self.depth))


def layer_stack(layers: Sequence[nnx.Module], stacked: bool) -> nnx.List | LayerStack:
    """``layers`` stored stacked (a :class:`LayerStack`) or one per layer (an ``nnx.List``)."""
    return LayerStack(layers) if stacked else nnx.List(layers)


def run_layers(layers: Sequence[nnx.Module] | LayerStack, x: Array, *args: Any, remat: bool | str = False,
               call: Callable[..., Array] | None = None) -> Array:
    """``x = call(layer, x, *args)`` for each layer in order (by default ``layer(x, *args)``),
    each rematerialised as ``remat`` says (:func:`train.models.layers.rematerialised`).

    Separate layers run as a Python loop; a :class:`LayerStack` as one ``jax.lax.scan`` over
    its stacked state, with the loop's values, gradients and dropout masks.
    """
    call = call or (lambda layer, h, *a: layer(h, *a))
    if not isinstance(layers, LayerStack):
        step = rematerialised(call, remat)
        for layer in layers:
            x = step(layer, x, *args)
        return x
    graphdef, state = nnx.split(layers.layer)

    def body(h: Array, layer_state: Any) -> tuple[Array, Any]:
        layer = nnx.merge(graphdef, layer_state)
        h = call(layer, h, *args)
        return h, nnx.state(layer, nnx.Not(nnx.Param))

    name = remat_policy(remat)
    if name != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[name], prevent_cse=False)
    x, updated = jax.lax.scan(body, x, state)
    nnx.update(layers.layer, updated)
    return x


@contextlib.contextmanager
def looped(model: nnx.Module) -> Iterator[nnx.Module]:
    """``model`` with every :class:`LayerStack` replaced by its separate layers (an ``nnx.List``)
    inside the block, and stacked again on leaving it, with what the layers then hold (values
    changed, adapters added): for work that addresses one layer at a time (LoRA adapters).
    A model without stacks is left as it is."""
    depths = stack_depths(model)
    for path in depths:
        _replace(model, path, lambda stack: nnx.List(list(stack)))
    try:
        yield model
    finally:
        for path in depths:
            _replace(model, path, lambda layers: LayerStack(list(layers)))


def _replace(model: nnx.Module, path: Path, new: Callable[[Any], Any]) -> None:
    parent: Any = model
    for part in path[:-1]:
        parent = parent[part] if isinstance(part, int) else getattr(parent, part)
    setattr(parent, path[-1], new(getattr(parent, path[-1])))


# ---------------------------------------------------------------------- looped paths


def stack_depths(model: nnx.Module) -> dict[Path, int]:
    """``{path of each LayerStack in model: its depth}`` (empty for a looped model)."""
    return {tuple(path): node.depth for path, node in nnx.iter_graph(model) if isinstance(node, LayerStack)}


def locate(path: Path, depths: Mapping[Path, int]) -> tuple[Path, int | None]:
    """Where the looped parameter ``path`` lives: ``(path, None)`` outside a stack, else the
    stacked variable's path and the row ``i``.

    >>> locate(("bert", "layers", 3, "mlp", "up", "kernel"), {("bert", "layers"): 12})
    (('bert', 'layers', 'layer', 'mlp', 'up', 'kernel'), 3)
    >>> locate(("pooler", "kernel"), {("bert", "layers"): 12})
    (('pooler', 'kernel'), None)
    """
    for prefix, depth in depths.items():
        n = len(prefix)
        if tuple(path[:n]) == prefix and len(path) > n and isinstance(path[n], (int, np.integer)):
            if not 0 <= path[n] < depth:
                raise KeyError(f"layer {path[n]} of a stack of {depth} at {prefix}")
            return prefix + (STACKED,) + tuple(path[n + 1:]), int(path[n])
    return tuple(path), None


def unstacked(flat: Mapping[Path, Any], depths: Mapping[Path, int]) -> dict[Path, Any]:
    """A flat ``{path: array}`` of a stacked model with every stacked entry split into the
    looped paths ``(..., "layers", i, ...)`` of its rows (host arrays)."""
    out: dict[Path, Any] = {}
    for path, value in flat.items():
        prefix = next((p for p in depths if tuple(path[:len(p) + 1]) == p + (STACKED,)), None)
        if prefix is None:
            out[tuple(path)] = value
            continue
        rows = np.asarray(value)
        for i in range(depths[prefix]):
            out[prefix + (i,) + tuple(path[len(prefix) + 1:])] = rows[i]
    return out
