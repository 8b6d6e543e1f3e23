"""Shared benchmark plumbing: timing, allocator variants run side by side, tables and JSON."""

from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# glibc's malloc returns large freed blocks to the OS and faults fresh pages in on every
# allocation; with transparent huge pages for malloc, filling a fresh buffer costs about half.
ALLOCATORS: dict[str, dict[str, str]] = {
    "default": {},
    "hugetlb": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
}


def time_call(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1) -> float:
    """The fastest of ``repeats`` wall-clock timings of ``fn()`` in seconds (after ``warmup`` calls).

    ``fn`` must block until its work is done (``jax.block_until_ready`` inside).
    """
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def time_interleaved(fns: dict[str, Callable[[], Any]], *, repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """The fastest of ``repeats`` timings of each ``fn()``, taken in turns (one run of each
    per round), so that a machine slowing down or speeding up mid-run moves every candidate
    alike and their ratios stay fair.

    Each round takes the candidates in a new order (a seeded shuffle): a candidate can slow
    the one after it (PyTorch's OpenMP threads keep spinning for a while after each call), so
    each must follow different ones from round to round. (Rotating one order would not do:
    it keeps every candidate behind the same one.)
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    best = {name: float("inf") for name in fns}
    order = random.Random(0)
    for _ in range(repeats):
        for name in order.sample(names, len(names)):
            fn = fns[name]
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    import jax

    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
    }


def _cpu_model() -> str:
    """The CPU's model name and its vector extensions that matter here, from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    flags = next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())
    extensions = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(extensions)})"


def run_worker(module: str, args: Sequence[str], *, env: Mapping[str, str | None] | None = None,
               label: str = "") -> dict[str, Any]:
    """Runs ``python -m module ARGS`` in a fresh process from the repository root; returns the
    JSON object on the last line of its output.

    ``env`` changes the environment of that process (a value ``None`` removes the variable):
    settings read once at start-up, such as ``GLIBC_TUNABLES`` or XLA's simulated device
    count, need a process of their own. The worker's stderr is passed through; a failure
    raises ``RuntimeError`` with its end.
    """
    child = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            child.pop(key, None)
        else:
            child[key] = value
    proc = subprocess.run([sys.executable, "-m", module, *args], env=child, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} worker{f' ({label})' if label else ''} failed:\n{proc.stderr[-4000:]}")
    sys.stderr.write(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_per_allocator(module: str, args: Sequence[str], allocators: Sequence[str]) -> dict[str, Any]:
    """Runs ``python -m module --worker ARGS`` once per allocator setting; returns their JSON outputs."""
    return {
        name: run_worker(module, ["--worker", *args], env={"GLIBC_TUNABLES": None, **ALLOCATORS[name]},
                         label=f"{name} allocator")
        for name in allocators
    }


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with right-aligned numeric columns."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    for row in cells:
        out.append("  ".join(c.rjust(w) if _is_number(c) else c.ljust(w) for c, w in zip(row, widths)))
    return "\n".join(out)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _is_number(text: str) -> bool:
    try:
        float(text.rstrip("x"))
        return True
    except ValueError:
        return False


def save_json(name: str, payload: dict[str, Any], path: str | None = None) -> Path:
    """Writes ``payload`` (plus machine info) to ``path`` or ``benchmarks/results/<name>.json``."""
    target = Path(path) if path else RESULTS_DIR / f"{name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine_info(), **payload}
    target.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return target
