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
import logging
import os
import threading
from pathlib import Path
from typing import Any

import jax

from train.models.sources import cache_root
from train.utilisation import jaxpr_flops

logger = logging.getLogger("train")

_TRACE = "/jax/core/compile/jaxpr_trace_duration"
_LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_BACKEND = "/jax/core/compile/backend_compile_duration"
_HIT = "/jax/compilation_cache/cache_hits"
_MISS = "/jax/compilation_cache/cache_misses"


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
        with cls._lock:
            if event == _HIT:
                cls._totals.hits += 1
            elif event == _MISS:
                cls._totals.misses += 1

    def snapshot(self) -> dict[str, float]:
        """Seconds tracing, lowering and compiling (or loading from the cache), programs
        compiled, and persistent-cache hits and misses since :meth:`start`."""
        now, then = self._totals, self._start
        return {
            "trace_seconds": now.trace - then.trace,
            "lower_seconds": now.lower - then.lower,
            "backend_seconds": now.backend - then.backend,
            "programs": now.programs - then.programs,
            "cache_hits": now.hits - then.hits,
            "cache_misses": now.misses - then.misses,
        }


class CompiledSteps:
    """A jitted function compiled ahead of time once per input shape, and called through its
    compiled executable: the training loop never traces or compiles between steps."""

    def __init__(self, jitted: Any, name: str):
        self.jitted = jitted
        self.name = name
        self.executables: dict[tuple, Any] = {}
        self.flops: dict[tuple, float] = {}  # per key: FLOPs of the program's matrix products (jaxpr_flops)

    def compile(self, key: tuple, *args: Any) -> None:
        compile_all(self.lower(key, *args))

    def lower(self, key: tuple, *args: Any) -> list[tuple["CompiledSteps", tuple, Any]]:
        """The lowered program for ``key`` (to compile with :func:`compile_all`); none if compiled."""
        if key in self.executables:
            return []
        traced = self.jitted.trace(*args)
        self.flops[key] = jaxpr_flops(traced.jaxpr)
        return [(self, key, traced.lower())]

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
    workers = workers or min(len(pending), os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        compiled = list(pool.map(lambda item: item[2].compile(), pending))
    for (steps, key, _), executable in zip(pending, compiled):
        steps.executables[key] = executable
