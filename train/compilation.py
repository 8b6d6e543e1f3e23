"""Compilation: JAX's persistent compilation cache, and how much time compiling took.

A run compiles its training step once per batch shape and its evaluation once per shape.
JAX's persistent cache keeps the compiled programs on disk, so a second run of the same job
(or a resumed one) loads them instead of compiling: :func:`enable_compile_cache` turns it on
(``--compile-cache``: ``auto`` is a folder under the cache root, ``off`` disables it).
:class:`CompileStats` counts, from JAX's monitoring events, the seconds spent tracing,
lowering and compiling and how many programs came from the cache.

Example:
  >>> import jax, jax.numpy as jnp
  >>> stats = CompileStats.start()
  >>> _ = jax.jit(lambda x: x * 2 + 1)(jnp.ones(3))
  >>> stats.snapshot()["programs"] >= 1
  True
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import logging
import os
import pickle
import platform
import re
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

import jax
from jax.experimental import serialize_executable

from train.models.sources import cache_root
from train.utilisation import jaxpr_flops

logger = logging.getLogger("train")

_TRACE = "/jax/core/compile/jaxpr_trace_duration"
_LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_BACKEND = "/jax/core/compile/backend_compile_duration"
_HIT = "/jax/compilation_cache/cache_hits"
_MISS = "/jax/compilation_cache/cache_misses"
_EXECUTABLE_HIT = "/jaxloss/executable_cache/hits"


def compile_cache_folder(setting: str) -> Path | None:
    """The folder ``--compile-cache`` names: ``auto`` -> ``$JAX_COMPILATION_CACHE_DIR`` if set,
    else ``<cache root>/jax``; ``off`` -> None."""
    if setting in ("off", "none", ""):
        return None
    if setting == "auto":
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"]) if os.environ.get("JAX_COMPILATION_CACHE_DIR") \
            else cache_root() / "jax"
    return Path(setting).expanduser()


def enable_compile_cache(setting: str) -> Path | None:
    """Turns JAX's persistent compilation cache on in the folder ``setting`` names (or off).

    Every program is kept, however fast it compiled (a threshold in seconds would make what is
    cached depend on the machine's speed and load); the folder is created.
    """
    folder = compile_cache_folder(setting)
    if folder is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return folder


@dataclasses.dataclass
class _Totals:
    trace: float = 0.0
    lower: float = 0.0
    backend: float = 0.0
    programs: int = 0
    hits: int = 0
    misses: int = 0
    executable_hits: int = 0


_this_thread = threading.local()


class CompileStats:
    """Running totals of JAX's compile events in this process (one listener, registered once)."""

    _totals = _Totals()
    _lock = threading.Lock()
    _registered = False

    def __init__(self) -> None:
        self._start = dataclasses.replace(self._totals)

    @classmethod
    def start(cls) -> "CompileStats":
        """Totals from now on."""
        with cls._lock:
            if not cls._registered:
                jax.monitoring.register_event_duration_secs_listener(cls._on_duration)
                jax.monitoring.register_event_listener(cls._on_event)
                cls._registered = True
        return cls()

    @classmethod
    def _on_duration(cls, event: str, duration: float, **_: Any) -> None:
        with cls._lock:
            if event == _TRACE:
                cls._totals.trace += duration
            elif event == _LOWER:
                cls._totals.lower += duration
            elif event == _BACKEND:
                cls._totals.backend += duration
                cls._totals.programs += 1

    @classmethod
    def _on_event(cls, event: str, **_: Any) -> None:
        if event == _HIT:  # recorded in the thread that compiles the program
            _this_thread.loaded_from_persistent_cache = True
        with cls._lock:
            if event == _HIT:
                cls._totals.hits += 1
            elif event == _MISS:
                cls._totals.misses += 1
            elif event == _EXECUTABLE_HIT:
                cls._totals.executable_hits += 1

    def snapshot(self) -> dict[str, float]:
        """Seconds tracing, lowering and compiling (or loading from the cache), programs
        compiled, persistent-cache hits and misses, and programs loaded from the
        :class:`ExecutableCache` without tracing, since :meth:`start`."""
        now, then = self._totals, self._start
        return {
            "trace_seconds": now.trace - then.trace,
            "lower_seconds": now.lower - then.lower,
            "backend_seconds": now.backend - then.backend,
            "programs": now.programs - then.programs,
            "cache_hits": now.hits - then.hits,
            "cache_misses": now.misses - then.misses,
            "executable_cache_hits": now.executable_hits - then.executable_hits,
        }


_SOURCE_PACKAGES = ("jaxloss", "train")
_VERSIONED = ("jax", "jaxlib", "flax", "optax", "numpy", "ml_dtypes")


def _package_versions() -> list[str]:
    versions = []
    for name in _VERSIONED:
        try:
            versions.append(f"{name}={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name}=absent")
    return versions


def source_digest(packages: Iterable[str] = _SOURCE_PACKAGES) -> str:
    """SHA-256 over every ``.py`` file of ``packages`` (names and contents, in sorted order):
    any change to the code that builds a program changes it."""
    digest = hashlib.sha256()
    for package in packages:
        root = Path(__import__(package).__file__).parent
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(root.parent)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def environment_fingerprint() -> list[str]:
    """What outside a run's own inputs decides the program XLA builds: Python and library
    versions, the backend and its devices, JAX's configuration, and ``JAX_*`` / ``XLA_*``
    variables."""
    devices = jax.devices()
    backend = devices[0].client
    config = {k: v for k, v in jax.config.values.items() if "cache" not in k}  # where caches live is not the program
    env = {k: v for k, v in os.environ.items() if k.startswith(("JAX_", "XLA_")) and "CACHE" not in k}
    return [platform.python_version(), *_package_versions(), backend.platform, backend.platform_version,
            f"{jax.process_count()} processes", *(f"{d.id}:{d.device_kind}:{d.process_index}" for d in devices),
            repr(sorted(config.items())), repr(sorted(env.items()))]


_MEMORY_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _signature(args: Any) -> str:
    """The tree structure and each leaf's shape, dtype and sharding: what a compiled program
    is specialized to."""
    leaves, tree = jax.tree_util.tree_flatten(args)
    parts = [str(tree)]
    for leaf in leaves:
        sharding = getattr(leaf, "sharding", None)
        parts.append(f"{getattr(leaf, 'shape', ())}|{getattr(leaf, 'dtype', type(leaf).__name__)}|{sharding}")
    return "\n".join(parts)


class ExecutableCache:
    """Compiled programs kept on disk under a key of everything that decides them, so that a
    second run of the same job loads each program without tracing or lowering it.

    JAX's persistent cache (:func:`enable_compile_cache`) keys a program on its lowered text,
    so a run must trace and lower every program to find it there, which takes most of a
    cached run's compile time. This cache keys a program on what it is built from instead:
    the source of ``jaxloss`` and ``train`` (:func:`source_digest`), library versions, devices
    and JAX configuration (:func:`environment_fingerprint`), the run's own description
    (``run_parts``: its resolved config, its tasks' label state, the model's graph), the
    program's name and shape key, and the tree, shapes, dtypes and shardings of its arguments.
    Any difference is a miss, never a wrong program. An entry is a pickle of
    ``jax.experimental.serialize_executable``'s payload, written atomically by a background
    thread while training goes on (:meth:`flush` waits for the writes; :meth:`load` flushes
    first); one that cannot be read is deleted and compiled again. Like JAX's own cache, it
    trusts the files in its folder.

    Example:
      >>> import jax, jax.numpy as jnp, tempfile
      >>> cache = ExecutableCache(Path(tempfile.mkdtemp()), ["example"])
      >>> first = CompiledSteps(jax.jit(lambda x: x * 2), "double", cache)
      >>> compile_all(first.lower(("n", 3), jnp.ones(3)))
      >>> second = CompiledSteps(jax.jit(lambda x: x * 2), "double", cache)
      >>> second.lower(("n", 3), jnp.ones(3))      # loaded: nothing to trace or compile
      []
      >>> second(("n", 3), jnp.ones(3)).tolist()
      [2.0, 2.0, 2.0]
    """

    def __init__(self, folder: Path, run_parts: Iterable[str]):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        for part in [source_digest(), *environment_fingerprint(), *run_parts]:
            digest.update(_MEMORY_ADDRESS.sub("", part).encode())  # a function's repr names it by address
            digest.update(b"\0")
        self.run_digest = digest.hexdigest()
        # one writer: serializing a program takes seconds that the first steps need not wait for
        self._writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="executable-cache")
        self._writes: list[concurrent.futures.Future] = []
        self.write_seconds = 0.0  # spent by the writer serializing and writing programs

    def path(self, name: str, key: tuple, args: Any) -> Path:
        entry = hashlib.sha256(f"{self.run_digest}\0{name}\0{key!r}\0{_signature(args)}".encode()).hexdigest()
        return self.folder / f"{entry}.pkl"

    def load(self, path: Path) -> tuple[Any, float] | None:
        """The compiled program stored at ``path`` and its FLOPs, or None."""
        self.flush()
        if not path.exists():
            return None
        try:
            payload, in_tree, out_tree, device_ids, flops = pickle.loads(path.read_bytes())
            by_id = {d.id: d for d in jax.devices()}
            executable = serialize_executable.deserialize_and_load(
                payload, in_tree, out_tree, execution_devices=[by_id[i] for i in device_ids])
        except Exception as error:  # noqa: BLE001 - a damaged or foreign entry is compiled again
            logger.warning("compiled program %s could not be loaded (%s); compiling it again", path.name, error)
            path.unlink(missing_ok=True)
            return None
        jax.monitoring.record_event(_EXECUTABLE_HIT)
        return executable, flops

    def store(self, path: Path, executable: Any, flops: float) -> None:
        """Queues ``executable`` to be written to ``path`` by the background writer."""
        self._writes.append(self._writer.submit(self._write, path, executable, flops))

    def flush(self) -> None:
        """Waits until every queued program is on disk (or was skipped)."""
        writes, self._writes = self._writes, []
        for write in writes:
            write.result()

    def _write(self, path: Path, executable: Any, flops: float) -> None:
        """Writes ``executable`` to ``path`` (a temporary file renamed into place); a backend
        that cannot serialize its programs is skipped with a debug line, a failed write (a full
        disk) with a warning: the run goes on, the next one compiles again."""
        start = time.perf_counter()
        try:
            self._serialize_and_write(path, executable, flops)
        finally:
            self.write_seconds += time.perf_counter() - start

    def _serialize_and_write(self, path: Path, executable: Any, flops: float) -> None:
        try:
            payload, in_tree, out_tree = serialize_executable.serialize(executable)
            device_ids = [d.id for d in executable._executable._unloaded_executable.device_list]
            data = pickle.dumps((payload, in_tree, out_tree, device_ids, flops))
        except Exception as error:  # noqa: BLE001 - not every backend serializes its programs
            logger.debug("compiled program not kept in %s: %s", self.folder, error)
            return
        written = None
        try:
            with tempfile.NamedTemporaryFile(dir=self.folder, delete=False, suffix=".tmp") as tmp:
                written = tmp.name
                tmp.write(data)
            os.replace(written, path)
        except OSError as error:
            logger.warning("compiled program not kept in %s: %s", self.folder, error)
            if written is not None:
                Path(written).unlink(missing_ok=True)


class CompiledSteps:
    """A jitted function compiled ahead of time once per input shape, and called through its
    compiled executable: the training loop never traces or compiles between steps."""

    def __init__(self, jitted: Any, name: str, cache: ExecutableCache | None = None):
        self.jitted = jitted
        self.name = name
        self.cache = cache  # where compiled programs are kept between runs (None: nowhere)
        self.executables: dict[tuple, Any] = {}
        self.flops: dict[tuple, float] = {}  # per key: FLOPs of the program's matrix products (jaxpr_flops)
        self._cache_paths: dict[tuple, Path] = {}

    def compile(self, key: tuple, *args: Any) -> None:
        compile_all(self.lower(key, *args))

    def lower(self, key: tuple, *args: Any) -> list[tuple["CompiledSteps", tuple, Any]]:
        """The lowered program for ``key`` (to compile with :func:`compile_all`); none if it is
        compiled already or was loaded from the cache."""
        if key in self.executables:
            return []
        if self.cache is not None:
            path = self.cache.path(self.name, key, args)
            loaded = self.cache.load(path)
            if loaded is not None:
                self.executables[key], self.flops[key] = loaded
                return []
            self._cache_paths[key] = path
        traced = self.jitted.trace(*args)
        self.flops[key] = jaxpr_flops(traced.jaxpr)
        return [(self, key, traced.lower())]

    def add(self, key: tuple, executable: Any, *, compiled_here: bool = True) -> None:
        """Keeps the compiled program of ``key``, and writes it to the cache, if any, when it was
        compiled in this process: XLA:CPU serializes a program that JAX's persistent cache
        loaded without the code of its functions, so such a program is not written again."""
        self.executables[key] = executable
        path = self._cache_paths.pop(key, None)
        if path is not None and self.cache is not None and compiled_here:
            self.cache.store(path, executable, self.flops[key])

    def peak_memory_bytes(self) -> int | None:
        """The largest per-device footprint XLA plans for any compiled shape (arguments +
        outputs + temporaries - donated aliases), from its memory analysis; None where the
        backend gives none."""
        sizes = [program_memory_bytes(e) for e in self.executables.values()]
        sizes = [s for s in sizes if s is not None]
        return max(sizes) if sizes else None

    def __call__(self, key: tuple, *args: Any) -> Any:
        if key not in self.executables:
            logger.warning("%s: a batch shape that was not compiled ahead (%s); compiling it now", self.name, key)
            self.compile(key, *args)
        return self.executables[key](*args)


def program_memory_bytes(executable: Any) -> int | None:
    """Arguments + outputs + temporaries - aliased (donated) bytes of a compiled program, per device."""
    try:
        analysis = executable.memory_analysis()
    except Exception:  # noqa: BLE001 - backends without the analysis
        return None
    if analysis is None:
        return None
    return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
               - analysis.alias_size_in_bytes)


def compile_all(pending: list[tuple[CompiledSteps, tuple, Any]], workers: int | None = None) -> None:
    """Compiles lowered programs in parallel threads (XLA compiles a program on one core and
    releases the GIL), storing each executable in its :class:`CompiledSteps`."""
    if not pending:
        return
    CompileStats.start()  # its listener tells a program compiled here from one JAX's cache loaded
    workers = workers or min(len(pending), os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        compiled = list(pool.map(lambda item: _compile(item[2]), pending))
    for (steps, key, _), (executable, compiled_here) in zip(pending, compiled):
        steps.add(key, executable, compiled_here=compiled_here)


def _compile(lowered: Any) -> tuple[Any, bool]:
    """The compiled program, and whether it was compiled here (not loaded from JAX's cache)."""
    _this_thread.loaded_from_persistent_cache = False
    executable = lowered.compile()
    return executable, not _this_thread.loaded_from_persistent_cache
