"""The PyTorch parity table: it passes on the library, fails on a wrong implementation,
and computes its errors correctly."""

from __future__ import annotations

import importlib.metadata
import json
import math
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import jaxloss
from jaxloss import crosscheck

LOSS_FUNCTIONS = {
    name for name in jaxloss.__all__
    if callable(getattr(jaxloss, name)) and name[0].islower() and name not in ("combine",)
}


@pytest.mark.slow
def test_main_passes_on_every_public_loss_and_writes_json(tmp_path, capsys):
    path = tmp_path / "crosscheck.json"
    assert crosscheck.main(["--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "FAIL" not in printed and "PASS" in printed
    payload = json.loads(path.read_text())
    results = payload["results"]
    assert {r["function"] for r in results} == LOSS_FUNCTIONS
    assert {r["dtype"] for r in results} == {"float32", "bfloat16", "float64"}
    assert all(r["passed"] for r in results)
    assert payload["torch"] and payload["jax"]


def test_a_wrong_implementation_fails():
    def slightly_wrong(input, target, **kwargs):
        # In float32 or wider: 1.001 is below bfloat16's resolution.
        wide = input.astype(jnp.float64 if input.dtype == jnp.float64 else jnp.float32)
        return jaxloss.mse_loss(wide * 1.001, target.astype(wide.dtype), **kwargs)

    results = crosscheck.run_checks(functions=["mse_loss"], implementations={"mse_loss": slightly_wrong})
    assert results and not any(r.passed for r in results)
    assert not any(r.error for r in results)
    assert all(r.value_max_abs_err > 0 for r in results)
    assert "FAIL" in crosscheck.format_table(results)


def test_a_wrong_gradient_alone_fails():
    """A value that is right with a wrong gradient is caught by the gradient column."""
    import jax

    @jax.custom_vjp
    def l1(input, target):
        return jnp.abs(input - target)

    l1.defvjp(lambda x, y: (l1(x, y), (x, y)), lambda res, g: (2.0 * g * jnp.sign(res[0] - res[1]), -g))

    def wrong_grad(input, target, reduction="mean", **kwargs):
        wide = input.astype(jnp.float64 if input.dtype == jnp.float64 else jnp.float32)
        per = l1(wide, target.astype(wide.dtype))
        return jnp.mean(per) if reduction == "mean" else (jnp.sum(per) if reduction == "sum" else per)

    results = crosscheck.run_checks(functions=["l1_loss"], implementations={"l1_loss": wrong_grad})
    for r in results:
        assert r.value_max_abs_err <= r.value_atol + r.value_rtol * 100
        assert r.grad_max_rel_err > 0.5 and not r.passed


def test_main_exit_status_is_nonzero_on_failure(monkeypatch, capsys):
    monkeypatch.setattr(jaxloss, "huber_loss", lambda input, target, **kw: jaxloss.mse_loss(input, target, reduction=kw["reduction"]))
    assert crosscheck.main(["--function", "huber_loss"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_a_crash_is_a_reported_failure():
    def crashes(*args, **kwargs):
        raise RuntimeError("boom")

    (result, *_) = crosscheck.run_checks(functions=["kl_div"], implementations={"kl_div": crashes})
    assert not result.passed and "RuntimeError: boom" in result.error
    assert "boom" in crosscheck.format_table([result])


def test_compare_on_known_discrepancies():
    assert crosscheck.compare(np.array([1.0, 2.0]), np.array([1.0, 2.5]), rtol=0.1, atol=0.0) == (0.5, 0.2, False)
    assert crosscheck.compare(np.array([1.0, 2.0]), np.array([1.0, 2.1]), rtol=0.1, atol=0.0)[2]
    abs_err, rel_err, ok = crosscheck.compare(np.array([0.0, 1e-9]), np.array([0.0, 0.0]), rtol=0.0, atol=1e-8)
    assert ok and abs_err == 1e-9 and rel_err == 0.0  # relative error skips zeros of the reference
    # Non-finite entries must coincide.
    assert crosscheck.compare(np.array([np.inf, 1.0]), np.array([np.inf, 1.0]), rtol=0, atol=0)[2]
    assert not crosscheck.compare(np.array([np.nan, 1.0]), np.array([0.0, 1.0]), rtol=1, atol=1)[2]
    assert not crosscheck.compare(np.array([1.0, 1.0]), np.array([np.nan, 1.0]), rtol=1, atol=1)[2]
    assert not crosscheck.compare(np.array([-np.inf]), np.array([np.inf]), rtol=1, atol=1)[2]
    assert crosscheck.compare(np.zeros(2), np.zeros(3), rtol=1, atol=1) == (math.inf, math.inf, False)


def test_unknown_function_is_an_error():
    with pytest.raises(ValueError, match="no cases for"):
        crosscheck.run_checks(functions=["not_a_loss"])


def test_missing_torch_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(SystemExit, match="pip install torch"):
        crosscheck._import_torch()


def test_console_script_is_declared():
    scripts = importlib.metadata.entry_points(group="console_scripts")
    (entry,) = [e for e in scripts if e.name == "jaxloss-crosscheck"]
    assert entry.value == "jaxloss.crosscheck:main"
