"""Logical axis names of every model parameter and the table that maps them to mesh axes.

Each parameter records its logical axes in its ``out_sharding`` metadata (set once, in
:mod:`train.models.layers`):

============== =========================================================================
``vocab``      rows of a token-embedding table, columns of an untied LM head
``embed``      the model width ``d_model`` (hidden size)
``heads``      query heads x head_dim (output of ``query``, input of ``out``)
``kv_heads``   key/value heads x head_dim (grouped-query attention may have fewer)
``mlp``        the feed-forward width ``d_ff``
``norm``       scales and biases of norms
``positions``  rows of a learned position table, token-type rows
``labels``     classifier outputs
============== =========================================================================

A rules table maps each logical name to a mesh axis (or several, or ``None`` =
replicated); the training system's table is ``train.sharding.DEFAULT_RULES`` (it reads the
same ``out_sharding`` metadata). For use without it, :data:`FSDP_TP_RULES` shards weights over ``fsdp`` along ``embed`` and over
``tensor`` along heads, MLP width and vocabulary (a vocabulary-sharded head).
:func:`partition_specs` turns a model into a ``PartitionSpec`` tree, dropping a mesh axis
from a dimension it does not divide.

Example:
  >>> import jax
  >>> from train.models import from_config
  >>> from transformers import GPT2Config
  >>> model = from_config(GPT2Config(vocab_size=96, n_embd=32, n_layer=1, n_head=4, n_positions=16,
  ...                                bos_token_id=1, eos_token_id=2))
  >>> logical_axes(model)["layers"][0]["attention"]["query"]["kernel"]
  ('embed', 'heads')
  >>> partition_specs(model, FSDP_TP_RULES)["embed"]["embedding"]
  P('tensor', 'fsdp')
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from train.sharding import DEFAULT_RULES

VOCAB = "vocab"
EMBED = "embed"
HEADS = "heads"
KV_HEADS = "kv_heads"
MLP_AXIS = "mlp"
NORM = "norm"
POSITIONS = "positions"
LABELS = "labels"
LOGICAL_AXES: tuple[str, ...] = (VOCAB, EMBED, HEADS, KV_HEADS, MLP_AXIS, NORM, POSITIONS, LABELS)

MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]

#: FSDP over ``fsdp`` on the model width, tensor parallelism over ``tensor`` on heads / MLP /
#: vocab: the project's one rules table, :data:`train.sharding.DEFAULT_RULES`.
FSDP_TP_RULES: Rules = DEFAULT_RULES
#: Pure FSDP: every matrix sharded over ``fsdp`` along its model-width axis.
FSDP_RULES: Rules = tuple((name, "fsdp" if name == EMBED else None) for name in LOGICAL_AXES)
#: Everything replicated (data parallelism only).
REPLICATED_RULES: Rules = tuple((name, None) for name in LOGICAL_AXES)


def logical_axes(model: nnx.Module) -> Any:
    """A pure-dict tree (paths of ``nnx.state(model, nnx.Param)``) of each parameter's logical axis names."""
    params = nnx.state(model, nnx.Param)
    return _nested({path: tuple(v.get_metadata().get("out_sharding") or ()) for path, v in nnx.to_flat_state(params)})


def _mesh_axes(name: str | None, rules: Mapping[str, MeshAxes]) -> tuple[str, ...]:
    if name is None:
        return ()
    if name not in rules:
        raise KeyError(f"logical axis {name!r} has no rule; rules cover {sorted(rules)}")
    axes = rules[name]
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def spec_for(shape: Sequence[int], names: Sequence[str | None], rules: Rules,
             mesh_shape: Mapping[str, int] | None = None) -> PartitionSpec:
    """``PartitionSpec`` of one array: each dimension's logical name mapped through ``rules``.

    A mesh axis is used at most once per array (first dimension wins) and, when
    ``mesh_shape`` is given, only where it divides the dimension.
    """
    table = dict(rules)
    used: set[str] = set()
    out: list[MeshAxes] = []
    for dim, name in zip(shape, names):
        chosen: list[str] = []
        size = 1
        for axis in _mesh_axes(name, table):
            n = 1 if mesh_shape is None else mesh_shape.get(axis, 1)
            if axis in used or (mesh_shape is not None and dim % (size * n)):
                continue
            chosen.append(axis)
            size *= n
        used.update(chosen)
        out.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*out)


def partition_specs(model: nnx.Module, rules: Rules, mesh: Mesh | None = None) -> Any:
    """A pure-dict tree (same paths as ``nnx.state(model, nnx.Param)``) of ``PartitionSpec``."""
    mesh_shape = dict(mesh.shape) if mesh is not None else None
    params = nnx.state(model, nnx.Param)

    def one(v: nnx.Variable) -> PartitionSpec:
        names = tuple(v.get_metadata().get("out_sharding") or (None,) * v[...].ndim)
        return spec_for(v[...].shape, names, rules, mesh_shape)

    return _nested({path: one(v) for path, v in nnx.to_flat_state(params)})


def _nested(flat: Mapping[tuple, Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def named_shardings(model: nnx.Module, mesh: Mesh, rules: Rules) -> Any:
    """``NamedSharding`` for every parameter of ``model`` on ``mesh`` (pure-dict tree)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), partition_specs(model, rules, mesh),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))
