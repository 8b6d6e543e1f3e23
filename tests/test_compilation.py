"""The executable cache: a program loaded from disk without tracing computes what the freshly
compiled one does, and anything a program depends on that differs is a miss."""

from __future__ import annotations

import logging
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from train.compilation import CompiledSteps, CompileStats, ExecutableCache, compile_all


def _step(x, w):
    return jnp.tanh(x @ w).sum(axis=0), x.shape[0] * 2.0 * x.shape[1] * w.shape[1]


def _compiled(cache: ExecutableCache, key: tuple, *args) -> tuple[CompiledSteps, list]:
    steps = CompiledSteps(jax.jit(_step), "step", cache)
    pending = steps.lower(key, *args)
    compile_all(pending)
    cache.flush()  # as a run does at its end
    return steps, pending


def _args(rows: int = 8) -> tuple[jax.Array, jax.Array]:
    x = jax.random.normal(jax.random.key(0), (rows, 16), jnp.float32)
    w = jax.random.normal(jax.random.key(1), (16, 4), jnp.float32)
    return x, w


def test_a_second_program_is_loaded_without_tracing_and_computes_the_same(tmp_path):
    args = _args()
    first, pending = _compiled(ExecutableCache(tmp_path, ["run"]), ("n", 8), *args)
    assert len(pending) == 1 and len(list(tmp_path.glob("*.pkl"))) == 1

    stats = CompileStats.start()
    second, pending = _compiled(ExecutableCache(tmp_path, ["run"]), ("n", 8), *args)
    snapshot = stats.snapshot()
    assert pending == [] and snapshot["executable_cache_hits"] == 1
    assert snapshot["trace_seconds"] == 0.0 and snapshot["programs"] == 0
    assert second.flops == first.flops
    for a, b in zip(first(("n", 8), *args), second(("n", 8), *args)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(np.asarray(second(("n", 8), *args)[0]), np.tanh(np.asarray(args[0]) @ np.asarray(args[1])).sum(0),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change", ["run", "shape", "dtype", "sharding", "name"])
def test_anything_the_program_depends_on_that_differs_is_a_miss(tmp_path, change):
    x, w = _args()
    _compiled(ExecutableCache(tmp_path, ["run"]), ("n", 8), x, w)
    parts, key, name = ["run"], ("n", 8), "step"
    if change == "run":
        parts = ["another run"]
    elif change == "shape":
        x = x[:4]
    elif change == "dtype":
        x, w = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    elif change == "sharding":
        mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:2])
        x = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    else:
        name = "another step"
    steps = CompiledSteps(jax.jit(_step), name, ExecutableCache(tmp_path, parts))
    assert len(steps.lower(key, x, w)) == 1  # traced and lowered: not loaded


def test_a_sharded_program_loads_onto_its_own_devices(tmp_path):
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[2:4])
    x, w = _args()
    x = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    w = jax.device_put(w, NamedSharding(mesh, PartitionSpec()))
    first, _ = _compiled(ExecutableCache(tmp_path, ["run"]), ("n", 8), x, w)
    second, pending = _compiled(ExecutableCache(tmp_path, ["run"]), ("n", 8), x, w)
    assert pending == []
    out = second(("n", 8), x, w)[0]
    assert out.sharding.device_set == set(jax.devices()[2:4])
    np.testing.assert_array_equal(np.asarray(out), np.asarray(first(("n", 8), x, w)[0]))


def test_a_damaged_entry_is_compiled_again(tmp_path, caplog):
    args = _args()
    _compiled(ExecutableCache(tmp_path, ["run"]), ("n", 8), *args)
    (entry,) = tmp_path.glob("*.pkl")
    entry.write_bytes(entry.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="train"):
        steps, pending = _compiled(ExecutableCache(tmp_path, ["run"]), ("n", 8), *args)
    assert len(pending) == 1 and "could not be loaded" in caplog.text
    assert entry.exists() and entry.stat().st_size > 100  # written again, whole
    np.testing.assert_allclose(np.asarray(steps(("n", 8), *args)[0]),
                               np.tanh(np.asarray(args[0]) @ np.asarray(args[1])).sum(0), rtol=1e-5, atol=1e-5)


def test_programs_are_written_in_the_background_while_the_run_goes_on(tmp_path, monkeypatch):
    """store() returns while the program is still being serialized; flush() waits for it, and
    a load in the same process finds it."""
    from jax.experimental import serialize_executable

    release, started = threading.Event(), threading.Event()
    serialize = serialize_executable.serialize

    def slow_serialize(executable):
        started.set()
        assert release.wait(timeout=60)
        return serialize(executable)

    monkeypatch.setattr(serialize_executable, "serialize", slow_serialize)
    cache = ExecutableCache(tmp_path, ["run"])
    args = _args()
    steps = CompiledSteps(jax.jit(_step), "step", cache)
    compile_all(steps.lower(("n", 8), *args))  # returns with the write still waiting
    assert started.wait(timeout=60) and not list(tmp_path.glob("*.pkl"))
    np.testing.assert_array_equal(np.asarray(steps(("n", 8), *args)[0]),  # the run goes on meanwhile
                                  np.asarray(jax.jit(_step)(*args)[0]))
    release.set()
    cache.flush()
    assert len(list(tmp_path.glob("*.pkl"))) == 1
    assert CompiledSteps(jax.jit(_step), "step", cache).lower(("n", 8), *args) == []


def test_a_failed_write_is_a_warning_and_leaves_no_file(tmp_path, monkeypatch, caplog):
    import os

    def full_disk(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    cache = ExecutableCache(tmp_path, ["run"])
    with caplog.at_level(logging.WARNING, logger="train"):
        steps, _ = _compiled(cache, ("n", 8), *_args())
    assert "No space left on device" in caplog.text
    assert list(tmp_path.iterdir()) == []
    assert steps(("n", 8), *_args())[0].shape == (4,)
