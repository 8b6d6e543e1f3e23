"""Forward+backward time of ``jaxloss.cross_entropy`` against optax, PyTorch and the memory floor.

For logits of shape (N, V) with integer targets and a mean reduction, each candidate computes
the loss and its gradient w.r.t. the logits:

- ``jaxloss``: ``jax.jit(jax.value_and_grad(jaxloss.cross_entropy))``
- ``optax``: ``optax.softmax_cross_entropy_with_integer_labels(...).mean()``, same transform
- ``torch``: ``F.cross_entropy(x, t)`` then ``.backward()``
- ``pass``: one in-place pass over the logits (``-x`` with the input donated), the memory
  floor; a fused forward+backward needs about three (read, read, write)
- ``fresh_pass``: ``-x`` into a new buffer. Every candidate above returns its gradient in a
  new buffer, which the allocator must hand out (and the kernel fault in) on each call, so
  ``2 passes + fresh`` is the floor they can reach; without huge pages it dominates.

The candidates are timed in turns (one run of each per round, the fastest kept). Each
allocator setting runs in its own process (``GLIBC_TUNABLES`` is read at start-up) and
the table shows them side by side. Ratios are to the ``3 passes`` floor and between candidates.

    python -m benchmarks.bench_cross_entropy            # full run, saves benchmarks/results/cross_entropy.json
    python -m benchmarks.bench_cross_entropy --quick    # small shapes, a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable

from benchmarks._harness import ALLOCATORS, format_table, run_per_allocator, save_json, time_interleaved

FULL_SHAPES = [(8192, 32000), (4096, 128256)]
QUICK_SHAPES = [(512, 4096)]
DTYPES = ["float32", "bfloat16"]


def _measure(shapes: list[tuple[int, int]], repeats: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import torch
    import torch.nn.functional as F

    import jaxloss

    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    for n, v in shapes:
        rng = np.random.default_rng(0)
        logits_f32 = (rng.standard_normal((n, v), dtype=np.float32) * 2.0)
        targets_np = rng.integers(0, v, size=(n,), dtype=np.int64)
        for dtype_name in DTYPES:
            dtype = jnp.dtype(dtype_name)
            x = jnp.asarray(logits_f32, dtype)
            t = jnp.asarray(targets_np, jnp.int32)

            def jaxloss_loss(logits: jax.Array) -> jax.Array:
                return jaxloss.cross_entropy(logits, t)

            def optax_loss(logits: jax.Array) -> jax.Array:
                return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, t))

            tx = torch.from_numpy(logits_f32).to(getattr(torch, dtype_name))
            tt = torch.from_numpy(targets_np)

            def torch_step() -> None:
                leaf = tx.detach().requires_grad_(True)
                F.cross_entropy(leaf, tt).backward()

            times = time_interleaved({
                "jaxloss": _jax_call(jax.jit(jax.value_and_grad(jaxloss_loss)), x),
                "optax": _jax_call(jax.jit(jax.value_and_grad(optax_loss)), x),
                "pass": _in_place_pass(x),
                "fresh_pass": _jax_call(jax.jit(lambda a: -a), x),
                "torch": torch_step,
            }, repeats=repeats)
            rows.append({"N": n, "V": v, "dtype": dtype_name, "seconds": times})
            del x
    return {"rows": rows}


def _jax_call(step: Callable, x: Any) -> Callable[[], None]:
    import jax

    return lambda: jax.block_until_ready(step(x))


def _in_place_pass(x: Any) -> Callable[[], None]:
    import jax
    import jax.numpy as jnp

    scale = jax.jit(lambda a: -a, donate_argnums=0)
    state = {"x": jnp.array(x, copy=True)}

    def one_pass() -> None:
        state["x"] = jax.block_until_ready(scale(state["x"]))

    return one_pass


def _summary_rows(results: dict[str, Any]) -> list[list[Any]]:
    rows = []
    allocators = list(results)
    for i, row in enumerate(results[allocators[0]]["rows"]):
        for name in allocators:
            s = results[name]["rows"][i]["seconds"]
            floor = 3 * s["pass"]
            fresh_floor = 2 * s["pass"] + s["fresh_pass"]
            rows.append([
                f"{row['N']}x{row['V']}",
                row["dtype"],
                name,
                s["jaxloss"] * 1e3,
                s["optax"] * 1e3,
                s["torch"] * 1e3,
                floor * 1e3,
                fresh_floor * 1e3,
                f"{s['jaxloss'] / s['optax']:.2f}x",
                f"{s['jaxloss'] / s['torch']:.2f}x",
                f"{s['jaxloss'] / floor:.2f}x",
                f"{s['jaxloss'] / fresh_floor:.2f}x",
                f"{s['optax'] / floor:.2f}x",
            ])
    return rows


HEADERS = [
    "N x V", "dtype", "allocator", "jaxloss ms", "optax ms", "torch ms", "3 passes ms",
    "2 + fresh ms", "jaxloss/optax", "jaxloss/torch", "jaxloss/floor", "jaxloss/fresh floor",
    "optax/floor",
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes only (a smoke test)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per candidate (the fastest is kept)")
    parser.add_argument("--allocators", default=",".join(ALLOCATORS), help="comma-separated: default,hugetlb")
    parser.add_argument("--json", default=None, help="where to save results (default benchmarks/results/cross_entropy.json)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    if args.worker:
        print(json.dumps(_measure(shapes, args.repeats)))
        return
    worker_args = ["--repeats", str(args.repeats)] + (["--quick"] if args.quick else [])
    results = run_per_allocator("benchmarks.bench_cross_entropy", worker_args, args.allocators.split(","))
    print(format_table(HEADERS, _summary_rows(results)))
    path = save_json(
        "cross_entropy" + ("_quick" if args.quick else ""),
        {"command": " ".join(["python -m benchmarks.bench_cross_entropy", *(argv if argv is not None else sys.argv[1:])]),
         "results": results},
        args.json,
    )
    print(f"saved {path}")


if __name__ == "__main__":
    main()
