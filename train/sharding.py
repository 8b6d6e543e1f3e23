"""The device mesh and every sharding rule, in one table.

A mesh has up to three axes:

============ ===============================================================
``data``     data parallelism: the batch is split, parameters are replicated
``fsdp``     fully sharded data parallelism: the batch is split *and* parameters /
             optimizer state are sharded; XLA gathers each weight where it is used
``tensor``   tensor parallelism: wide dimensions (vocabulary, MLP, heads) are split
============ ===============================================================

Model code never names mesh axes. It names the *logical* axes of each parameter with
Flax's metadata, e.g. ``nnx.with_partitioning(init, ("embed", "mlp"))`` (stored as the
Variable's ``out_sharding`` metadata, which ``nnx.Optimizer`` copies onto the optimizer
moments). :data:`DEFAULT_RULES` maps logical names to mesh axes, and
:func:`state_shardings` turns an ``nnx.State`` (concrete or from ``nnx.eval_shape``) into
``NamedSharding`` s, dropping a mesh axis, with a recorded reason, wherever a dimension is
not divisible by it or the axis is already used by another dimension of the same array.

Mesh axes are ``AxisType.Auto`` (``jax.make_mesh`` defaults to ``Explicit``): the jitted
step takes sharded inputs and XLA's propagation places everything in between.

Flax shards annotated Variables *eagerly* at creation, which needs a mesh and rules; use
:func:`create_sharded` (or the :func:`unsharded` context on one device) to build a model.

Example:
  >>> mesh = make_mesh("data=1,fsdp=-1", devices=jax.devices()[:1])
  >>> dict(mesh.shape)
  {'data': 1, 'fsdp': 1, 'tensor': 1}
  >>> shape_only = jax.sharding.AbstractMesh((1, 2, 2), MESH_AXES)  # data=1, fsdp=2, tensor=2
  >>> logical_to_spec(("vocab", "embed"), (10, 8), shape_only)
  (P('tensor', 'fsdp'), [])
  >>> logical_to_spec(("vocab", "embed"), (9, 8), shape_only, where="embedding")[1]
  ["embedding: mesh axis 'tensor' (size 2) dropped for dimension 0 ('vocab') of shape (9, 8): 9 is not divisible by 2"]
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, TypeVar, Union

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger(__name__)

T = TypeVar("T")
MeshAxes = Union[str, tuple[str, ...], None]
LogicalRules = tuple[tuple[str, MeshAxes], ...]

#: The mesh axes, in mesh order (outermost first).
MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

#: Logical axis name -> mesh axis (or axes, or ``None`` for replicated). The one rules table.
DEFAULT_RULES: LogicalRules = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("layers", None),
    ("length", None),
    ("positions", None),
    ("types", None),
    ("classes", None),
    ("labels", None),
    ("norm", None),
)


# --------------------------------------------------------------------------- the mesh


def parse_mesh_spec(spec: str | Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Parses ``"data=2,fsdp=4"`` into ``{"data": 2, "fsdp": 4, "tensor": 1}``.

    Missing axes have size 1; one axis may be ``-1`` and takes the remaining devices. The
    product must equal ``num_devices``.

    >>> parse_mesh_spec("fsdp=-1,tensor=2", 8)
    {'data': 1, 'fsdp': 4, 'tensor': 2}
    """
    if isinstance(spec, str):
        sizes: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep or name not in MESH_AXES:
                raise ValueError(
                    f"mesh spec {spec!r}: expected 'axis=size' items with axis in {MESH_AXES}, got {part!r}"
                )
            if name in sizes:
                raise ValueError(f"mesh spec {spec!r}: axis {name!r} given twice")
            try:
                sizes[name] = int(value)
            except ValueError:
                raise ValueError(f"mesh spec {spec!r}: size of {name!r} is not an integer: {value!r}") from None
    else:
        sizes = {str(k): int(v) for k, v in spec.items()}
        unknown = set(sizes) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"mesh spec {spec!r}: unknown axes {sorted(unknown)}; expected {MESH_AXES}")
    fill = [name for name, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise ValueError(f"mesh spec {spec!r}: only one axis may be -1, got {fill}")
    bad = [name for name, size in sizes.items() if size < 1 and size != -1]
    if bad:
        raise ValueError(f"mesh spec {spec!r}: sizes must be positive or -1, got {bad}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if num_devices % fixed:
            raise ValueError(
                f"mesh spec {spec!r}: {num_devices} devices are not divisible by the fixed axes' product {fixed}"
            )
        sizes[fill[0]] = num_devices // fixed
    full = {name: sizes.get(name, 1) for name in MESH_AXES}
    if math.prod(full.values()) != num_devices:
        raise ValueError(
            f"mesh spec {spec!r} gives {math.prod(full.values())} devices ({full}) but {num_devices} are available"
        )
    return full


def make_mesh(spec: str | Mapping[str, int] = "data=-1", devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh with ``Auto`` axes over ``devices`` (default: all devices).

    >>> make_mesh("data=1,fsdp=1", devices=jax.devices()[:1]).axis_names
    ('data', 'fsdp', 'tensor')
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[name] for name in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


# --------------------------------------------------------------------------- rules


def _rules_dict(rules: LogicalRules | Mapping[str, MeshAxes]) -> dict[str, tuple[str, ...]]:
    items = rules.items() if isinstance(rules, Mapping) else rules
    out: dict[str, tuple[str, ...]] = {}
    for name, axes in items:
        if axes is None:
            out[name] = ()
        elif isinstance(axes, str):
            out[name] = (axes,)
        else:
            out[name] = tuple(axes)
    return out


def logical_to_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh | jax.sharding.AbstractMesh,
    rules: LogicalRules | Mapping[str, MeshAxes] = DEFAULT_RULES,
    *,
    where: str = "array",
) -> tuple[PartitionSpec, list[str]]:
    """The ``PartitionSpec`` of an array whose dimensions have ``logical_axes``, and notes.

    Each logical name is looked up in ``rules``; a mesh axis is dropped (and a note says
    why) when the dimension is not divisible by it or when an earlier dimension of the same
    array already uses it. Mesh axes of size 1 and axes missing from ``mesh`` are dropped
    silently (they change nothing). ``None`` in ``logical_axes`` means replicated.

    Raises:
      ValueError: lengths of ``logical_axes`` and ``shape`` differ, or a name has no rule.

    >>> mesh = make_mesh("fsdp=1", devices=jax.devices()[:1])
    >>> logical_to_spec(("embed", None), (6, 3), mesh)
    (P(None, None), [])
    """
    if len(logical_axes) != len(shape):
        raise ValueError(
            f"{where}: sharding names {tuple(logical_axes)} have {len(logical_axes)} entries "
            f"but the shape {tuple(shape)} has {len(shape)} dimensions"
        )
    table = _rules_dict(rules)
    mesh_sizes = dict(mesh.shape)
    used: set[str] = set()
    entries: list[MeshAxes] = []
    notes: list[str] = []
    for dim, (name, size) in enumerate(zip(logical_axes, shape)):
        if name is None:
            entries.append(None)
            continue
        if name not in table:
            raise ValueError(
                f"{where}: logical axis {name!r} (dimension {dim} of shape {tuple(shape)}) has no rule; "
                f"add it to the rules table (known: {sorted(table)})"
            )
        kept: list[str] = []
        for axis in table[name]:
            axis_size = mesh_sizes.get(axis, 1)
            if axis_size == 1:
                continue
            if axis in used:
                notes.append(
                    f"{where}: mesh axis {axis!r} not used for dimension {dim} ({name!r}) "
                    f"because an earlier dimension already shards over it"
                )
                continue
            if size % (math.prod(mesh_sizes[a] for a in kept) * axis_size):
                notes.append(
                    f"{where}: mesh axis {axis!r} (size {axis_size}) dropped for dimension {dim} ({name!r}) "
                    f"of shape {tuple(shape)}: {size} is not divisible by "
                    f"{math.prod(mesh_sizes[a] for a in kept) * axis_size}"
                )
                continue
            kept.append(axis)
            used.add(axis)
        entries.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*entries), notes


# --------------------------------------------------------------------------- state


@dataclass(frozen=True)
class ShardingDecision:
    """How one array of a state is laid out, and why mesh axes were dropped (``notes``)."""

    path: str
    shape: tuple[int, ...]
    logical: tuple[str | None, ...] | None
    spec: PartitionSpec
    notes: tuple[str, ...]


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _value_shape(x: Any) -> tuple[int, ...] | None:
    value = x.get_value() if _is_variable(x) else x
    shape = getattr(value, "shape", None)
    return None if shape is None else tuple(shape)


def _logical_names(x: Any) -> tuple[str | None, ...] | None:
    if not _is_variable(x):
        return None
    names = x.get_metadata().get("out_sharding")
    if not names:
        return None
    if isinstance(names, (NamedSharding,)):
        names = tuple(names.spec)
    return tuple(names)


def plan_shardings(
    state: T,
    mesh: Mesh,
    rules: LogicalRules | Mapping[str, MeshAxes] = DEFAULT_RULES,
) -> tuple[T, list[ShardingDecision]]:
    """``NamedSharding`` s for every array of ``state``, with one decision record per array.

    ``state`` is any pytree; ``nnx.Variable`` leaves (an ``nnx.State`` from ``nnx.state`` or
    ``nnx.split`` of a real or ``nnx.eval_shape`` model or optimizer) are sharded by their
    ``out_sharding`` metadata through ``rules``; other leaves and un-annotated Variables are
    replicated. The returned tree has the structure of ``state`` (a Variable's value
    replaced by its sharding), so it can be ``out_shardings`` of ``jax.jit`` or zipped with
    ``state`` by ``jax.tree.map``.
    """
    decisions: list[ShardingDecision] = []

    def one(path: Any, x: Any) -> Any:
        where = jax.tree_util.keystr(path)
        shape = _value_shape(x)
        logical = _logical_names(x)
        if logical is not None and shape is not None:
            spec, notes = logical_to_spec(logical, shape, mesh, rules, where=where)
        else:
            spec, notes = PartitionSpec(), []
        decisions.append(ShardingDecision(where, shape or (), logical, spec, tuple(notes)))
        sharding = NamedSharding(mesh, spec)
        return x.replace(sharding) if _is_variable(x) else sharding

    shardings = jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_variable)
    return shardings, decisions


def state_shardings(
    state: T,
    mesh: Mesh,
    rules: LogicalRules | Mapping[str, MeshAxes] = DEFAULT_RULES,
) -> T:
    """Like :func:`plan_shardings` but returns only the shardings, logging every drop note."""
    shardings, decisions = plan_shardings(state, mesh, rules)
    for decision in decisions:
        for note in decision.notes:
            logger.info("sharding: %s", note)
    return shardings


def abstract_state(state: T, shardings: Any) -> T:
    """``state`` with each array replaced by a ``jax.ShapeDtypeStruct`` carrying its sharding.

    The target for restoring a checkpoint onto another mesh:
    ``abstract_state(nnx.state(abstract_model), state_shardings(..., new_mesh))``.
    """
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def unsharded() -> contextlib.AbstractContextManager:
    """Context in which annotated Variables are created unsharded (no mesh or rules needed)."""
    return nnx.use_eager_sharding(False)


def create_sharded(
    init_fn: Callable[[], T],
    mesh: Mesh,
    rules: LogicalRules | Mapping[str, MeshAxes] = DEFAULT_RULES,
) -> T:
    """Runs ``init_fn`` (building modules / optimizers) so each array is born sharded on ``mesh``.

    The shapes come from ``nnx.eval_shape``; then ``init_fn`` runs under ``jax.jit`` with
    the planned ``out_shardings``, so no device ever holds a whole unsharded parameter.

    >>> mesh = make_mesh("fsdp=1", devices=jax.devices()[:1])
    >>> layer = create_sharded(lambda: nnx.Linear(2, 3, rngs=nnx.Rngs(0)), mesh)
    >>> layer.kernel.get_value().sharding.spec
    P()
    """
    with unsharded():
        abstract = nnx.eval_shape(init_fn)
        graphdef, abstract_state_ = nnx.split(abstract)
        shardings = state_shardings(abstract_state_, mesh, rules)

        def init_state() -> Any:
            return nnx.split(init_fn())[1]

        state = jax.jit(init_state, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def shard_state(
    state: T,
    mesh: Mesh,
    rules: LogicalRules | Mapping[str, MeshAxes] = DEFAULT_RULES,
) -> T:
    """Places an existing state (arrays or ``nnx.State``) on ``mesh`` by the rules."""
    shardings = state_shardings(state, mesh, rules)
    return jax.device_put(state, shardings)


# --------------------------------------------------------------------------- batches


def batch_sharding(
    mesh: Mesh,
    ndim: int = 1,
    rules: LogicalRules | Mapping[str, MeshAxes] = DEFAULT_RULES,
) -> NamedSharding:
    """The sharding of a batch array: dimension 0 over the ``"batch"`` rule's axes, rest replicated."""
    axes = tuple(a for a in _rules_dict(rules).get("batch", ()) if mesh.shape.get(a, 1) > 1)
    first: MeshAxes = None if not axes else axes[0] if len(axes) == 1 else axes
    return NamedSharding(mesh, PartitionSpec(first, *([None] * (ndim - 1))))


def batch_divisor(mesh: Mesh, rules: LogicalRules | Mapping[str, MeshAxes] = DEFAULT_RULES) -> int:
    """The number of batch shards: a global batch size must be a multiple of it."""
    return math.prod(mesh.shape.get(a, 1) for a in _rules_dict(rules).get("batch", ()))


def shard_batch(
    batch: T,
    mesh: Mesh,
    rules: LogicalRules | Mapping[str, MeshAxes] = DEFAULT_RULES,
) -> T:
    """Places a global batch (a pytree of numpy arrays, the same on every process) on ``mesh``.

    Dimension 0 is split over the batch axes (:func:`batch_sharding`): each of this process's
    devices gets the rows the sharding assigns it (``jax.make_array_from_callback``),
    whatever the mesh's layout of processes.

    Raises:
      ValueError: a leaf is a scalar, or its rows do not divide over the batch shards.
    """
    divisor = batch_divisor(mesh, rules)

    def one(path: Any, x: Any) -> jax.Array:
        x = np.asarray(x)
        if x.ndim == 0:
            raise ValueError(f"batch leaf {jax.tree_util.keystr(path)} is a scalar; batch arrays need a batch dimension")
        if x.shape[0] % divisor:
            raise ValueError(
                f"batch leaf {jax.tree_util.keystr(path)} of shape {x.shape}: {x.shape[0]} rows do not divide "
                f"over the {divisor} batch shards of mesh {dict(mesh.shape)}"
            )
        return jax.make_array_from_callback(x.shape, batch_sharding(mesh, x.ndim, rules), lambda index: x[index])

    return jax.tree_util.tree_map_with_path(one, batch)


def logical_constraint(
    x: jax.Array,
    logical_axes: Sequence[str | None],
    rules: LogicalRules | Mapping[str, MeshAxes] = DEFAULT_RULES,
) -> jax.Array:
    """``with_sharding_constraint`` by logical names on the mesh set by ``jax.set_mesh``; else ``x``.

    For activations inside a model, e.g. ``logical_constraint(h, ("batch", "length", "embed"))``.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec, _ = logical_to_spec(logical_axes, x.shape, mesh, rules, where="activation")
    return jax.lax.with_sharding_constraint(x, spec)


def format_plan(decisions: Sequence[ShardingDecision]) -> str:
    """A printable table of :func:`plan_shardings` decisions, one array a line, notes indented."""
    lines = []
    for d in decisions:
        lines.append(f"{d.path}  shape={d.shape}  logical={d.logical}  spec={d.spec}")
        lines.extend(f"    {note}" for note in d.notes)
    return "\n".join(lines)
