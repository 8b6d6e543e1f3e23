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
``layers``     the leading axis of layers stored stacked (:mod:`train.models.stack`)
============== =========================================================================

A rules table maps each logical name to a mesh axis (or several, or ``None`` =
replicated); the training system's table is ``train.sharding.DEFAULT_RULES``. For use without
it, :data:`FSDP_TP_RULES` shards weights over ``fsdp`` along ``embed`` and over ``tensor``
along heads, MLP width and vocabulary (a vocabulary-sharded head). :func:`partition_specs`
turns a model into a ``PartitionSpec`` tree on a mesh through
:func:`train.sharding.logical_to_spec`, the one mapping from logical to mesh axes: a mesh
axis is dropped from a dimension it does not divide, and axes of size 1 change nothing.

Example:
  >>> import jax
  >>> from train.models import from_config
  >>> from transformers import GPT2Config
  >>> model = from_config(GPT2Config(vocab_size=96, n_embd=32, n_layer=1, n_head=4, n_positions=16,
  ...                                bos_token_id=1, eos_token_id=2))
  >>> logical_axes(model)["layers"][0]["attention"]["query"]["kernel"]
  ('embed', 'heads')
  >>> mesh = jax.make_mesh((2, 2), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  >>> partition_specs(model, FSDP_TP_RULES, mesh)["embed"]["embedding"]
  P('tensor', 'fsdp')
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from train.sharding import DEFAULT_RULES, MeshAxes, state_shardings

VOCAB = "vocab"
EMBED = "embed"
HEADS = "heads"
KV_HEADS = "kv_heads"
MLP_AXIS = "mlp"
NORM = "norm"
POSITIONS = "positions"
LABELS = "labels"
LAYERS = "layers"
LOGICAL_AXES: tuple[str, ...] = (VOCAB, EMBED, HEADS, KV_HEADS, MLP_AXIS, NORM, POSITIONS, LABELS, LAYERS)

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


def partition_specs(model: nnx.Module, rules: Rules, mesh: Mesh) -> Any:
    """A pure-dict tree (same paths as ``nnx.state(model, nnx.Param)``) of ``PartitionSpec``."""
    return jax.tree.map(lambda s: s.spec, named_shardings(model, mesh, rules),
                        is_leaf=lambda x: isinstance(x, NamedSharding))


def _nested(flat: Mapping[tuple, Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def named_shardings(model: nnx.Module, mesh: Mesh, rules: Rules) -> Any:
    """``NamedSharding`` for every parameter of ``model`` on ``mesh`` (pure-dict tree), by
    :func:`train.sharding.state_shardings`."""
    return nnx.to_pure_dict(state_shardings(nnx.state(model, nnx.Param), mesh, rules))
