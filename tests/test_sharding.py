"""The mesh, the logical-axis rules and the 1-device vs 4-device training equivalence."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxloss
from train import sharding as shd

VOCAB, EMBED, HIDDEN = 16, 8, 12


class TinyLM(nnx.Module):
    """Embedding -> MLP -> output projection, every parameter annotated with logical axes."""

    def __init__(self, rngs: nnx.Rngs, vocab: int = VOCAB, embed: int = EMBED, hidden: int = HIDDEN):
        part = nnx.with_partitioning
        init = nnx.initializers
        self.embed = nnx.Embed(
            vocab, embed, rngs=rngs, embedding_init=part(init.normal(1.0), ("vocab", "embed"))
        )
        self.up = nnx.Linear(
            embed,
            hidden,
            rngs=rngs,
            kernel_init=part(init.lecun_normal(), ("embed", "mlp")),
            bias_init=part(init.normal(0.1), ("mlp",)),
        )
        self.down = nnx.Linear(
            hidden,
            embed,
            rngs=rngs,
            kernel_init=part(init.lecun_normal(), ("mlp", "embed")),
            bias_init=part(init.zeros, ("embed",)),
        )
        self.out = nnx.Linear(
            embed, vocab, use_bias=False, rngs=rngs, kernel_init=part(init.lecun_normal(), ("embed", "vocab"))
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        h = self.embed(tokens)
        h = h + self.down(jax.nn.gelu(self.up(h)))
        return self.out(h)


def make_model_and_optimizer() -> tuple[TinyLM, nnx.Optimizer]:
    model = TinyLM(nnx.Rngs(0))
    return model, nnx.Optimizer(model, optax.adamw(3e-2, weight_decay=0.1), wrt=nnx.Param)


def loss_fn(model: TinyLM, tokens: jax.Array, targets: jax.Array) -> jax.Array:
    pair = jaxloss.cross_entropy(model(tokens), targets, reduction="sum_count")
    return pair.mean()


@nnx.jit
def train_step(model: TinyLM, optimizer: nnx.Optimizer, tokens: jax.Array, targets: jax.Array) -> jax.Array:
    loss, grads = nnx.value_and_grad(loss_fn)(model, tokens, targets)
    optimizer.update(model, grads)
    return loss


def make_batches(steps: int, batch: int = 8, length: int = 5) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(steps):
        tokens = rng.integers(0, VOCAB, (batch, length)).astype(np.int32)
        targets = rng.integers(0, VOCAB, (batch, length)).astype(np.int32)
        targets[rng.random((batch, length)) < 0.3] = -100  # uneven counts per row
        out.append((tokens, targets))
    return out


# --------------------------------------------------------------------------- mesh


def test_parse_mesh_spec_fills_and_defaults() -> None:
    assert shd.parse_mesh_spec("data=2,fsdp=2", 4) == {"data": 2, "fsdp": 2, "tensor": 1}
    assert shd.parse_mesh_spec("fsdp=-1", 4) == {"data": 1, "fsdp": 4, "tensor": 1}
    assert shd.parse_mesh_spec("tensor=2, data=-1", 8) == {"data": 4, "fsdp": 1, "tensor": 2}
    assert shd.parse_mesh_spec("", 1) == {"data": 1, "fsdp": 1, "tensor": 1}
    assert shd.parse_mesh_spec({"fsdp": -1}, 2) == {"data": 1, "fsdp": 2, "tensor": 1}


@pytest.mark.parametrize(
    "spec, match",
    [
        ("data=3", "3 devices"),
        ("pipe=2", "axis in"),
        ("data=2,data=2", "twice"),
        ("data=-1,fsdp=-1", "only one"),
        ("data=x", "not an integer"),
        ("data=3,fsdp=-1", "not divisible"),
        ("data", "axis=size"),
        ("data=0", "positive"),
    ],
)
def test_parse_mesh_spec_errors(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        shd.parse_mesh_spec(spec, 4)


def test_make_mesh_is_auto_and_ordered() -> None:
    mesh = shd.make_mesh("data=2,tensor=2")
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 2}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert mesh.devices.size == 4


# --------------------------------------------------------------------------- rules


def test_logical_to_spec_maps_names_through_the_table() -> None:
    mesh = shd.make_mesh("fsdp=2,tensor=2")
    assert shd.logical_to_spec(("vocab", "embed"), (16, 8), mesh) == (P("tensor", "fsdp"), [])
    assert shd.logical_to_spec(("embed", "mlp"), (8, 12), mesh) == (P("fsdp", "tensor"), [])
    assert shd.logical_to_spec(("embed", "heads", "kv"), (8, 4, 2), mesh) == (P("fsdp", "tensor", None), [])
    assert shd.logical_to_spec(("layers", None), (3, 5), mesh) == (P(None, None), [])
    assert shd.logical_to_spec(("batch", "length"), (8, 5), mesh) == (P("fsdp", None), [])


def test_logical_to_spec_drops_non_divisible_axis_with_reason() -> None:
    mesh = shd.make_mesh("tensor=4")
    spec, notes = shd.logical_to_spec(("vocab", "embed"), (18, 8), mesh, where="embedding")
    assert spec == P(None, None)
    assert len(notes) == 1
    assert "embedding" in notes[0] and "'tensor'" in notes[0] and "18 is not divisible by 4" in notes[0]


def test_logical_to_spec_batch_keeps_divisible_prefix() -> None:
    mesh = shd.make_mesh("data=2,fsdp=2")
    spec, notes = shd.logical_to_spec(("batch",), (6,), mesh)
    assert spec == P("data")
    assert "'fsdp'" in notes[0]
    assert shd.logical_to_spec(("batch",), (8,), mesh) == (P(("data", "fsdp")), [])


def test_logical_to_spec_never_uses_a_mesh_axis_twice() -> None:
    mesh = shd.make_mesh("tensor=4")
    spec, notes = shd.logical_to_spec(("mlp", "heads"), (8, 8), mesh)
    assert spec == P("tensor", None)
    assert "already shards" in notes[0]


def test_logical_to_spec_errors_name_the_problem() -> None:
    mesh = shd.make_mesh("fsdp=4")
    with pytest.raises(ValueError, match="'nonesuch'.*no rule"):
        shd.logical_to_spec(("nonesuch",), (4,), mesh, where="w")
    with pytest.raises(ValueError, match=r"2 entries.*1 dimensions"):
        shd.logical_to_spec(("embed", "mlp"), (4,), mesh)


def test_custom_rules_mapping() -> None:
    mesh = shd.make_mesh("data=2,tensor=2")
    spec, _ = shd.logical_to_spec(("embed", "mlp"), (8, 8), mesh, {"embed": "data", "mlp": None})
    assert spec == P("data", None)


def test_plan_shardings_of_model_and_optimizer_state() -> None:
    mesh = shd.make_mesh("fsdp=2,tensor=2")
    with shd.unsharded():
        _, state = nnx.split(nnx.eval_shape(make_model_and_optimizer))
    shardings, decisions = shd.plan_shardings(state, mesh)
    by_path = {d.path: d for d in decisions}
    assert by_path["[0]['up']['kernel']"].spec == P("fsdp", "tensor")
    assert by_path["[0]['embed']['embedding']"].spec == P("tensor", "fsdp")
    # adamw's moments carry the parameter's logical axes
    assert by_path["[1]['opt_state'][0]['mu']['up']['kernel']"].spec == P("fsdp", "tensor")
    assert by_path["[1]['opt_state'][0]['nu']['out']['kernel']"].spec == P("fsdp", "tensor")
    assert by_path["[1]['step']"].spec == P()
    assert all(not d.notes for d in decisions)
    leaves = jax.tree.leaves(shardings)
    assert len(leaves) == len(decisions) and all(isinstance(s, NamedSharding) for s in leaves)
    assert "up" in shd.format_plan(decisions)


def test_create_sharded_places_and_matches_unsharded_init() -> None:
    mesh = shd.make_mesh("fsdp=2,tensor=2")
    model, optimizer = shd.create_sharded(make_model_and_optimizer, mesh)
    with shd.unsharded():
        reference, _ = make_model_and_optimizer()
    kernel = model.up.kernel.get_value()
    assert kernel.sharding.spec == P("fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (EMBED // 2, HIDDEN // 2)
    mu = optimizer.opt_state[0].mu["up"]["kernel"].get_value()
    assert mu.sharding.spec == P("fsdp", "tensor")
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(reference.up.kernel.get_value()))
    np.testing.assert_array_equal(
        np.asarray(model.embed.embedding.get_value()), np.asarray(reference.embed.embedding.get_value())
    )


def test_shard_state_and_abstract_state() -> None:
    mesh = shd.make_mesh("tensor=4")
    with shd.unsharded():
        model = TinyLM(nnx.Rngs(1))
    state = nnx.state(model)
    placed = shd.shard_state(state, mesh)
    assert placed["out"]["kernel"].get_value().sharding.spec == P(None, "tensor")
    abstract = shd.abstract_state(state, shd.state_shardings(state, mesh))
    leaf = abstract["out"]["kernel"].get_value()
    assert isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding.spec == P(None, "tensor")


def test_shard_batch_global_arrays() -> None:
    mesh = shd.make_mesh("data=2,fsdp=2")
    tokens = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
    batch = shd.shard_batch({"tokens": tokens, "mask": tokens > 4}, mesh)
    assert batch["tokens"].sharding.spec == P(("data", "fsdp"), None)
    assert batch["tokens"].addressable_shards[0].data.shape == (2, 3)
    np.testing.assert_array_equal(np.asarray(batch["tokens"]), tokens)
    np.testing.assert_array_equal(np.asarray(batch["mask"]), tokens > 4)
    with pytest.raises(ValueError, match=r"\['tokens'\] of shape \(6, 3\): 6 rows do not divide .* 4 batch shards"):
        shd.shard_batch({"tokens": tokens[:6]}, mesh)


def test_logical_constraint_inside_jit() -> None:
    mesh = shd.make_mesh("data=4")
    x = jnp.ones((8, 4), jnp.float32)

    @jax.jit
    def f(v: jax.Array) -> jax.Array:
        return shd.logical_constraint(v * 2, ("batch", "embed"))

    assert f(x).sharding.is_fully_replicated  # no mesh set: unconstrained
    with jax.set_mesh(mesh):
        y = jax.jit(f.__wrapped__)(x)
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P("data", None)), 2)
    np.testing.assert_array_equal(np.asarray(y), 2 * np.ones((8, 4), np.float32))


# --------------------------------------------------------------------------- equivalence


def run_training(mesh_spec: str | None, steps: int) -> tuple[list[float], dict]:
    """Trains ``steps`` steps on one device (``None``) or on the 4-device mesh ``mesh_spec``."""
    if mesh_spec is None:
        mesh = shd.make_mesh("data=1", devices=jax.devices()[:1])
    else:
        mesh = shd.make_mesh(mesh_spec)
    model, optimizer = shd.create_sharded(make_model_and_optimizer, mesh)
    losses = []
    for tokens, targets in make_batches(steps):
        batch = shd.shard_batch({"tokens": tokens, "targets": targets}, mesh)
        # optax's bias correction raises a float to an int32 count: not allowed under "strict"
        with jax.numpy_dtype_promotion("standard"):
            losses.append(float(train_step(model, optimizer, batch["tokens"], batch["targets"])))
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return losses, params


@pytest.mark.slow
def test_sharded_training_equals_single_device() -> None:
    steps = 3
    ref_losses, ref_params = run_training(None, steps)
    # an independent float64 check of the first loss: the mean over counted tokens
    tokens, targets = make_batches(1)[0]
    with shd.unsharded():
        model = TinyLM(nnx.Rngs(0))
    logits = np.asarray(model(jnp.asarray(tokens)), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True
    )
    counted = targets != -100
    nll = -np.take_along_axis(logp, np.where(counted, targets, 0)[..., None], -1)[..., 0]
    np.testing.assert_allclose(ref_losses[0], nll[counted].mean(), rtol=1e-5)
    assert ref_losses[-1] < ref_losses[0]

    for mesh_spec in ("data=4", "fsdp=4", "tensor=4", "data=2,fsdp=2", "fsdp=2,tensor=2"):
        losses, params = run_training(mesh_spec, steps)
        np.testing.assert_allclose(losses, ref_losses, rtol=2e-6, err_msg=mesh_spec)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6, err_msg=mesh_spec),
            params,
            ref_params,
        )
