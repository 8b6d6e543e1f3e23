"""Memory and time of ``jaxloss.linear_cross_entropy`` against ``hidden @ weight`` + cross-entropy.

Every candidate computes a mean loss over N tokens and its gradients w.r.t. hidden (N, D)
and weight (D, V), in bfloat16 with float32 accumulation:

- ``fused``: ``linear_cross_entropy`` (gradients formed in the forward pass)
- ``low_mem``: ``linear_cross_entropy(..., low_memory=True)`` (recompute, vocabulary outside)
- ``naive``: ``cross_entropy(hidden @ weight, targets)`` (bf16 logits, as a model would)
- ``matmuls``: the three bare matmuls (logits, d/dhidden, d/dweight) with a given logits
  gradient, each in its fast operand layout: the floor of any exact method

Memory is XLA's compiled memory analysis of the whole forward+backward program, without
running it: ``temp`` is the temporary buffers (the goal's measure), ``out`` the outputs (the
loss and the bf16 gradients of hidden and weight, the same for every candidate and
unavoidable) and ``args`` the inputs; a buffer that XLA turns into an output counts there
only, as it would in memory. Ratios are taken against ``naive`` measured the same way, both
for temporaries alone and for temporaries plus outputs. Time is the fastest of
``--repeats`` runs; each allocator setting (``GLIBC_TUNABLES``, read at process start) runs
in its own process and the table shows them side by side. The machine may be shared, so
compare ratios measured in the same run rather than absolute times.

    python -m benchmarks.bench_fused                # saves benchmarks/results/fused.json
    python -m benchmarks.bench_fused --memory-only  # the memory table only (seconds; saves nothing)
    python -m benchmarks.bench_fused --quick        # small shapes, a smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from benchmarks._harness import ALLOCATORS, format_table, run_per_allocator, save_json, time_call

MEMORY_SHAPES = [(8192, 2048, 131072), (16384, 4096, 256000)]
TIME_SHAPES = [(1024, 512, 16384), (4096, 1024, 50257)]
QUICK_MEMORY_SHAPES = [(1024, 256, 8192)]
QUICK_TIME_SHAPES = [(256, 128, 4096)]


def _candidates() -> dict[str, Callable]:
    import jax
    import jax.numpy as jnp

    import jaxloss
    from jaxloss.fused import linear_cross_entropy

    def naive(h, w, t):
        logits = jnp.matmul(h, w, preferred_element_type=jnp.float32).astype(h.dtype)
        return jaxloss.cross_entropy(logits, t)

    def grads(loss: Callable) -> Callable:
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

    return {
        "fused": grads(lambda h, w, t: linear_cross_entropy(h, w, t)),
        "low_mem": grads(lambda h, w, t: linear_cross_entropy(h, w, t, low_memory=True)),
        "naive": grads(naive),
    }


def _matmuls() -> Callable:
    import jax
    import jax.numpy as jnp

    def dot(a, b, contract_b):
        return jax.lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())), preferred_element_type=jnp.float32)

    def three(h, h_t, w, g):
        logits = dot(h, w, 0)  # (N, D) @ (D, V)
        dh = dot(g, w, 1).astype(h.dtype)  # (N, V) @ (D, V)^T
        dw = dot(h_t, g, 0).astype(w.dtype)  # (D, N) @ (N, V)
        return jnp.sum(logits[:, :1]), dh, dw

    return jax.jit(three)


def _memory(shapes: list[tuple[int, int, int]]) -> list[dict[str, Any]]:
    import jax
    import jax.numpy as jnp

    rows = []
    for n, d, v in shapes:
        h = jax.ShapeDtypeStruct((n, d), jnp.bfloat16)
        w = jax.ShapeDtypeStruct((d, v), jnp.bfloat16)
        t = jax.ShapeDtypeStruct((n,), jnp.int32)
        row: dict[str, Any] = {"N": n, "D": d, "V": v, "temp_bytes": {}, "output_bytes": {}, "argument_bytes": {}}
        for name, fn in _candidates().items():
            stats = fn.lower(h, w, t).compile().memory_analysis()
            row["temp_bytes"][name] = int(stats.temp_size_in_bytes)
            row["output_bytes"][name] = int(stats.output_size_in_bytes)
            row["argument_bytes"][name] = int(stats.argument_size_in_bytes)
        rows.append(row)
    return rows


def _time(shapes: list[tuple[int, int, int]], repeats: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    rows = []
    for n, d, v in shapes:
        keys = jax.random.split(jax.random.key(0), 4)
        h = jax.random.normal(keys[0], (n, d), jnp.bfloat16)
        w = (jax.random.normal(keys[1], (d, v), jnp.float32) * d**-0.5).astype(jnp.bfloat16)
        t = jax.random.randint(keys[2], (n,), 0, v)
        g = (jax.random.normal(keys[3], (n, v), jnp.float32) / n).astype(jnp.bfloat16)
        h_t = jnp.array(h.T)
        seconds = {}
        for name, fn in _candidates().items():
            seconds[name] = time_call(lambda fn=fn: jax.block_until_ready(fn(h, w, t)), repeats=repeats)
        three = _matmuls()
        seconds["matmuls"] = time_call(lambda: jax.block_until_ready(three(h, h_t, w, g)), repeats=repeats)
        rows.append({"N": n, "D": d, "V": v, "seconds": seconds})
        del g
    return {"rows": rows}


def _memory_table(rows: list[dict[str, Any]]) -> str:
    gib = 2.0**30
    body = []
    for r in rows:
        temp, out = r["temp_bytes"], r["output_bytes"]
        with_out = {k: temp[k] + out[k] for k in temp}
        body.append([
            f"{r['N']}x{r['D']}x{r['V']}", temp["naive"] / gib, temp["fused"] / gib, temp["low_mem"] / gib,
            f"{100 * temp['fused'] / temp['naive']:.1f}%", f"{100 * temp['low_mem'] / temp['naive']:.1f}%",
            out["fused"] / gib, r["argument_bytes"]["fused"] / gib,
            f"{100 * with_out['fused'] / with_out['naive']:.1f}%", f"{100 * with_out['low_mem'] / with_out['naive']:.1f}%",
        ])
    headers = ["N x D x V", "naive GiB", "fused GiB", "low_mem GiB", "fused/naive", "low_mem/naive", "out GiB",
               "args GiB", "fused+out/naive+out", "low_mem+out/naive+out"]
    return format_table(headers, body)


def _time_table(results: dict[str, Any]) -> str:
    body = []
    allocators = list(results)
    for i, row in enumerate(results[allocators[0]]["rows"]):
        for name in allocators:
            s = results[name]["rows"][i]["seconds"]
            body.append([
                f"{row['N']}x{row['D']}x{row['V']}", name,
                s["matmuls"] * 1e3, s["fused"] * 1e3, s["low_mem"] * 1e3, s["naive"] * 1e3,
                f"{s['fused'] / s['matmuls']:.2f}x", f"{s['low_mem'] / s['matmuls']:.2f}x",
                f"{s['naive'] / s['matmuls']:.2f}x", f"{s['fused'] / s['naive']:.2f}x",
            ])
    headers = ["N x D x V", "allocator", "matmuls ms", "fused ms", "low_mem ms", "naive ms",
               "fused/floor", "low_mem/floor", "naive/floor", "fused/naive"]
    return format_table(headers, body)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes only (a smoke test)")
    parser.add_argument("--memory-only", action="store_true",
                        help="print the memory table and stop (no timing; saves only with --json)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per candidate (the fastest is kept)")
    parser.add_argument("--allocators", default=",".join(ALLOCATORS), help="comma-separated: default,hugetlb")
    parser.add_argument("--json", default=None, help="where to save results (default benchmarks/results/fused.json)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    time_shapes = QUICK_TIME_SHAPES if args.quick else TIME_SHAPES
    if args.worker:
        print(json.dumps(_time(time_shapes, args.repeats)))
        return
    memory = _memory(QUICK_MEMORY_SHAPES if args.quick else MEMORY_SHAPES)
    print("Memory of forward+backward (XLA memory analysis, bf16, not run): temporaries, and with outputs")
    print(_memory_table(memory))
    command = " ".join(["python -m benchmarks.bench_fused", *(argv if argv is not None else sys.argv[1:])])
    if args.memory_only:
        if args.json:
            print(f"saved {save_json('fused_memory', {'command': command, 'memory': memory}, args.json)}")
        return
    worker_args = ["--repeats", str(args.repeats)] + (["--quick"] if args.quick else [])
    timing = run_per_allocator("benchmarks.bench_fused", worker_args, args.allocators.split(","))
    print("\nForward+backward time (fastest of --repeats; shared machine, so compare ratios)")
    print(_time_table(timing))
    path = save_json(
        "fused" + ("_quick" if args.quick else ""),
        {"command": command, "memory": memory, "time": timing},
        args.json,
    )
    print(f"saved {path}")


if __name__ == "__main__":
    main()
