"""One command for a GPU or TPU: the accelerator-relevant tests and the step, cross-entropy and
fused-loss benchmarks, all written to one JSON.

Each part runs in a process of its own with ``JAX_PLATFORMS`` set to the platform asked for,
so nothing falls back to the CPU unnoticed (JAX fails instead). A part that fails is recorded
with the end of its output and the others still run. The test part runs the suite's files
that exercise the numerics and the compiled programs (losses, fused loss, softmax kernel,
transformations, train step, scanned layers, bf16 models), skipping what needs several
simulated CPU devices; each benchmark saves its own JSON, which is folded into the combined
one. The benchmarks' PyTorch columns run on whatever device the installed torch has (the
CPU wheel pinned in the test extra): on an accelerator read the JAX rows' absolute times.

    python -m benchmarks.bench_accelerator --platform cuda            # writes benchmarks/results/accelerator_cuda.json
    python -m benchmarks.bench_accelerator --platform tpu --quick     # small shapes, a smoke test
    python -m benchmarks.bench_accelerator --platform cpu --quick --parts devices,tests
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any, Sequence

from benchmarks._harness import format_table

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"

# The suite's files whose subject is the compiled arithmetic, not the host-side training system.
ACCELERATOR_TESTS = (
    "tests/test_classification.py",
    "tests/test_fused.py",
    "tests/test_softmax_stats.py",
    "tests/test_numerics.py",
    "tests/test_transforms.py",
    "tests/test_reduce.py",
    "tests/test_regression.py",
    "tests/test_sequence.py",
    "tests/test_composite.py",
    "tests/test_long_rows.py",
    "tests/test_train_step.py",
    "tests/test_scan.py",
    "tests/test_models_bf16.py",
    "tests/test_models_matmul.py",
    "tests/test_memory_controls.py",
)

# name -> (module, arguments, quick arguments, the flag that names its JSON output)
BENCHMARKS: dict[str, tuple[str, list[str], list[str], str]] = {
    "train_step": ("benchmarks.bench_train_step", [], ["--quick"], "--out"),
    "cross_entropy": ("benchmarks.bench_cross_entropy", ["--allocators", "default"],
                      ["--allocators", "default", "--quick"], "--json"),
    "fused": ("benchmarks.bench_fused", ["--allocators", "default"], ["--allocators", "default", "--quick"], "--json"),
}

DEVICES_SCRIPT = """
import json, jax
print(json.dumps({"backend": jax.default_backend(), "jax": jax.__version__,
                  "device_kind": jax.devices()[0].device_kind,
                  "devices": [str(d) for d in jax.devices()], "process_count": jax.process_count()}))
"""


def platform_env(platform: str) -> dict[str, str]:
    """The environment of every part: JAX pinned to ``platform``, no simulated CPU devices.

    >>> platform_env("cuda")["JAX_PLATFORMS"]
    'cuda'
    """
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = platform
    if platform != "cpu":
        env["XLA_FLAGS"] = " ".join(
            flag for flag in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in flag
        )
    return env


def junit_counts(xml_text: str) -> dict[str, Any]:
    """Passed / failed / errors / skipped counts and the failed test ids of a JUnit XML report.

    >>> junit_counts('<testsuites><testsuite><testcase classname="t" name="a"/>'
    ...              '<testcase classname="t" name="b"><failure message="x"/></testcase>'
    ...              '<testcase classname="t" name="c"><skipped/></testcase></testsuite></testsuites>')
    {'passed': 1, 'failed': 1, 'errors': 0, 'skipped': 1, 'failures': ['t::b']}
    """
    counts: dict[str, Any] = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    for case in ElementTree.fromstring(xml_text).iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None:
            counts["failed"] += 1
            counts["failures"].append(test_id)
        elif case.find("error") is not None:
            counts["errors"] += 1
            counts["failures"].append(test_id)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


def run_part(command: Sequence[str], env: dict[str, str], timeout_s: float) -> tuple[int, float, str]:
    """Runs ``command`` from the repository root; returns its exit status, seconds and output tail."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(list(command), env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
        code, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as timeout:
        code, output = 124, f"timed out after {timeout_s:.0f} s\n{timeout.stdout or ''}"
    return code, time.perf_counter() - start, output[-4000:] if isinstance(output, str) else str(output)[-4000:]


def run_devices(env: dict[str, str], timeout_s: float) -> dict[str, Any]:
    """What JAX sees on the chosen platform."""
    code, seconds, output = run_part([sys.executable, "-c", DEVICES_SCRIPT], env, timeout_s)
    if code != 0:
        return {"status": code, "seconds": seconds, "output": output}
    return {"status": 0, "seconds": seconds, **json.loads(output.strip().splitlines()[-1])}


def run_tests(env: dict[str, str], files: Sequence[str], timeout_s: float) -> dict[str, Any]:
    """The accelerator-relevant test files under pytest, counted from its JUnit report."""
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *files]
        code, seconds, output = run_part(command, env, timeout_s)
        counts = junit_counts(report.read_text()) if report.exists() else {}
    return {"status": code, "seconds": seconds, "files": list(files), **counts,
            **({"output": output} if code not in (0,) else {})}


def run_benchmark(name: str, env: dict[str, str], quick: bool, timeout_s: float) -> dict[str, Any]:
    """One benchmark in its own process; its saved JSON is returned inside the record."""
    module, args, quick_args, out_flag = BENCHMARKS[name]
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / f"{name}.json"
        command = [sys.executable, "-m", module, *(quick_args if quick else args), out_flag, str(out)]
        code, seconds, output = run_part(command, env, timeout_s)
        saved = json.loads(out.read_text()) if out.exists() else None
    record: dict[str, Any] = {"status": code, "seconds": seconds, "command": " ".join(command[1:]), "result": saved}
    if code != 0 or saved is None:
        record["output"] = output
    return record


def summary_rows(result: dict[str, Any]) -> list[list[Any]]:
    """One row per part: its status, seconds and what it found."""
    rows = []
    devices = result.get("devices")
    if devices:
        rows.append(["devices", devices["status"], devices["seconds"],
                     f"{devices.get('backend', '?')}: {devices.get('device_kind', devices.get('output', '')[-60:])}"])
    tests = result.get("tests")
    if tests:
        found = f"{tests.get('passed', 0)} passed, {tests.get('failed', 0)} failed, " \
                f"{tests.get('errors', 0)} errors, {tests.get('skipped', 0)} skipped"
        rows.append(["tests", tests["status"], tests["seconds"], found])
    for name, record in result.get("benchmarks", {}).items():
        rows.append([name, record["status"], record["seconds"], "saved" if record["result"] else "no result"])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--platform", required=True, choices=("cuda", "rocm", "tpu", "cpu"),
                        help="the JAX platform every part must run on")
    parser.add_argument("--parts", default="devices,tests,benchmarks",
                        help="comma-separated: devices, tests, benchmarks (default: all)")
    parser.add_argument("--benchmarks", default=",".join(BENCHMARKS), help=f"comma-separated: {','.join(BENCHMARKS)}")
    parser.add_argument("--tests", default=",".join(ACCELERATOR_TESTS), help="comma-separated test files or ids")
    parser.add_argument("--quick", action="store_true", help="the benchmarks' small shapes (a smoke test)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per part")
    parser.add_argument("--out", default=None,
                        help="JSON path (default benchmarks/results/accelerator_<platform>[_quick].json)")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    unknown = parts - {"devices", "tests", "benchmarks"}
    if unknown:
        parser.error(f"--parts: unknown part(s) {sorted(unknown)}; choose from devices, tests, benchmarks")
    names = [n for n in args.benchmarks.split(",") if n]
    if set(names) - set(BENCHMARKS):
        parser.error(f"--benchmarks: unknown {sorted(set(names) - set(BENCHMARKS))}; choose from {list(BENCHMARKS)}")

    env = platform_env(args.platform)
    result: dict[str, Any] = {"benchmark": "accelerator", "platform": args.platform, "quick": args.quick,
                              "command": " ".join(["python -m benchmarks.bench_accelerator",
                                                   *(argv if argv is not None else sys.argv[1:])])}
    if "devices" in parts:
        print("devices ...", flush=True)
        result["devices"] = run_devices(env, args.timeout)
    if "tests" in parts:
        print("tests ...", flush=True)
        result["tests"] = run_tests(env, [t for t in args.tests.split(",") if t], args.timeout)
    if "benchmarks" in parts:
        result["benchmarks"] = {}
        for name in names:
            print(f"benchmark {name} ...", flush=True)
            result["benchmarks"][name] = run_benchmark(name, env, args.quick, args.timeout)

    print(format_table(["part", "exit", "seconds", "found"], summary_rows(result)))
    target = Path(args.out) if args.out else RESULTS_DIR / f"accelerator_{args.platform}{'_quick' if args.quick else ''}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {target}")
    failed = [row[0] for row in summary_rows(result) if row[1] != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
