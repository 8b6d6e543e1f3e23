"""Runs test worker processes side by side and always reaps them.

Each worker writes its result to the file named by ``RESULT_FILE`` rather than to stdout: native
libraries (gloo, XLA) write to the same stdout and can interleave with a printed line.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def run_together(commands: Sequence[tuple[list[str], dict[str, str]]], cwd: Path, timeout_s: float) -> list[tuple[int, str]]:
    """Starts every ``(argv, env)`` at once; returns ``(returncode, output)`` of each, in order.

    A process still running at the deadline is killed (its return code is then negative). Every
    process is waited for and its pipe closed, also when this function raises.
    """
    procs = [subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for argv, env in commands]
    deadline = time.monotonic() + timeout_s
    outputs: list[str] = []
    try:
        for proc in procs:
            try:
                outputs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
            except subprocess.TimeoutExpired:
                proc.kill()
                outputs.append(proc.communicate()[0] + "\n[killed at the test's deadline]")
    finally:
        for proc in procs[len(outputs):]:
            proc.kill()
            proc.communicate()
    return [(proc.returncode, out) for proc, out in zip(procs, outputs)]


def write_result(result: dict[str, Any]) -> None:
    """In a worker: hands ``result`` to the test through the file named by ``RESULT_FILE``."""
    Path(os.environ["RESULT_FILE"]).write_text(json.dumps(result))


def read_result(path: Path, output: str) -> dict[str, Any]:
    """In the test: the worker's result, or a failure that shows the worker's output."""
    assert path.exists(), f"the worker wrote no result:\n{output[-3000:]}"
    return json.loads(path.read_text())
