r"""The PyTorch parity table: every public loss against the installed ``torch.nn.functional``.

Run ``python -m jaxloss.crosscheck`` (or the ``jaxloss-crosscheck`` script). For each public
loss it evaluates a few cases (shapes, dtypes, options) on random inputs, in JAX and in
PyTorch, and compares the value and the gradient with respect to the first argument. The
gradient is that of ``sum(loss * g)`` for a fixed random cotangent ``g``, so a per-element
(``reduction="none"``) result is checked through its full vector-Jacobian product.

An error is counted against the tolerance as ``|ours - torch| <= atol + rtol * |torch|``
element-wise (NaN and inf must sit at the same places); the table reports the largest
absolute error and the largest relative error ``|ours - torch| / |torch|`` over the
elements where torch is nonzero.

16-bit (bfloat16) inputs are compared with PyTorch in float32 on the very same 16-bit
values, because jaxloss computes 16-bit inputs in float32: the values must then agree to
float32 rounding and the gradients (returned in bfloat16) to one bfloat16 rounding.

The exit status is 0 when every case passes and 1 otherwise; ``--json PATH`` writes the
results. PyTorch is imported only when the checks run.

Example:
  >>> from jaxloss import crosscheck
  >>> results = crosscheck.run_checks(functions=["mse_loss"])
  >>> all(r.passed for r in results), sorted({r.dtype for r in results})
  (True, ['bfloat16', 'float32', 'float64'])
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
import warnings
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jaxloss

# (rtol, atol) of the value and of the gradient, by the dtype of the inputs.
TOLERANCES: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "float64": ((1e-10, 1e-12), (1e-10, 1e-12)),
    "float32": ((2e-5, 2e-6), (2e-5, 2e-6)),
    "bfloat16": ((2e-5, 2e-6), (1e-2, 1e-4)),
}
_JAX_DTYPES = {"float64": jnp.float64, "float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Case:
    """One comparison: a loss, its inputs and the PyTorch expression it must equal.

    ``make(rng)`` returns the float64 numpy inputs; ``inputs["x"]`` is the differentiated
    one (logits, log-probabilities or predictions). ``x`` and the float inputs named in
    ``cast`` are given in ``dtype`` to both sides; the other float inputs (class weights,
    most targets) in float32, or float64 in a float64 case; integers and booleans as is.
    ``ours(fn, x, inputs)`` calls the jaxloss function ``fn``, ``theirs(x, inputs)`` the
    torch equivalent (``x`` a torch tensor, ``inputs`` torch tensors).
    """

    function: str
    case: str
    dtype: str
    make: Callable[[np.random.Generator], dict[str, np.ndarray]]
    ours: Callable[..., Any]
    theirs: Callable[..., Any]
    cast: tuple[str, ...] = ()


@dataclasses.dataclass
class Result:
    """The errors of one case, and whether they lie within the tolerance."""

    function: str
    case: str
    dtype: str
    value_max_abs_err: float
    value_max_rel_err: float
    grad_max_abs_err: float
    grad_max_rel_err: float
    value_rtol: float
    value_atol: float
    grad_rtol: float
    grad_atol: float
    passed: bool
    error: str | None = None


def compare(actual: np.ndarray, expected: np.ndarray, rtol: float, atol: float) -> tuple[float, float, bool]:
    """``(max abs err, max rel err, within tolerance)`` of ``actual`` against ``expected``.

    Non-finite entries must match exactly (NaN with NaN, +inf with +inf); the errors are
    taken over the finite ones. The relative error skips entries where ``expected`` is 0.

    Example:
      >>> compare(np.array([1.0, 2.0]), np.array([1.0, 2.5]), rtol=0.1, atol=0.0)
      (0.5, 0.2, False)
    """
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    if actual.shape != expected.shape:
        return math.inf, math.inf, False
    finite = np.isfinite(expected)
    same_nonfinite = np.array_equal(np.isnan(actual), np.isnan(expected)) and np.array_equal(
        np.where(finite, 0.0, expected), np.where(np.isfinite(actual), 0.0, actual), equal_nan=True
    )
    a, e = actual[finite], expected[finite]
    diff = np.abs(a - e)
    max_abs = float(diff.max(initial=0.0))
    nonzero = e != 0
    max_rel = float((diff[nonzero] / np.abs(e[nonzero])).max(initial=0.0))
    ok = same_nonfinite and bool(np.all(diff <= atol + rtol * np.abs(e)))
    return max_abs, max_rel, ok


def _import_torch():
    try:
        import torch  # noqa: PLC0415
        import torch.nn.functional as F  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit(
            "jaxloss.crosscheck compares jaxloss with PyTorch, which is not installed: "
            "pip install torch (or the 'test' extra: pip install 'jaxloss[test]')"
        ) from exc
    return torch, F


def _cotangent(shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(12345).uniform(0.5, 1.5, size=shape)


def _rounded(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` as the exact float64 values that ``dtype`` holds."""
    if dtype == "float64":
        return np.asarray(x, np.float64)
    return np.asarray(jnp.asarray(np.asarray(x, np.float32), _JAX_DTYPES[dtype]).astype(jnp.float32), np.float64)


def _run_jax(case: Case, fn: Callable[..., Any], inputs: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    dtype = _JAX_DTYPES[case.dtype]

    def convert(name: str, v: np.ndarray) -> jax.Array:
        if np.issubdtype(v.dtype, np.floating):
            if name in case.cast or name == "x":
                return jnp.asarray(np.asarray(v, np.float32) if case.dtype != "float64" else v, dtype)
            return jnp.asarray(v, jnp.float64 if case.dtype == "float64" else jnp.float32)
        return jnp.asarray(v)

    # float32 matmuls in full float32 on every backend (TPUs default to bfloat16 passes).
    with jax.enable_x64(case.dtype == "float64"), jax.default_matmul_precision("highest"):
        args = {k: convert(k, v) for k, v in inputs.items()}

        def scalar(x: jax.Array) -> tuple[jax.Array, jax.Array]:
            out = case.ours(fn, x, args)
            if isinstance(out, jaxloss.SumCount):
                out = out.total
            g = jnp.asarray(_cotangent(tuple(out.shape)), out.dtype)
            return jnp.sum(out * g), out

        # One compiled program per case: cheaper than dispatching each operation eagerly.
        (_, value), grad = jax.jit(jax.value_and_grad(scalar, has_aux=True))(args["x"])
        if case.dtype != "float64":
            value, grad = value.astype(jnp.float32), grad.astype(jnp.float32)
        return np.asarray(value, np.float64), np.asarray(grad, np.float64)


def _run_torch(case: Case, inputs: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    torch, _ = _import_torch()
    torch_dtype = torch.float64 if case.dtype == "float64" else torch.float32

    def convert(name: str, v: np.ndarray):
        if np.issubdtype(v.dtype, np.floating):
            seen = _rounded(v, case.dtype) if (name in case.cast or name == "x") else v
            return torch.tensor(np.asarray(seen, np.float64), dtype=torch.float64).to(torch_dtype)
        return torch.tensor(v)

    args = {k: convert(k, v) for k, v in inputs.items()}
    x = args["x"].requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # kl_div's note that "mean" is not the KL
        out = case.theirs(x, args)
    g = torch.tensor(_cotangent(tuple(out.shape)), dtype=torch.float64)
    (out.double() * g).sum().backward()
    return out.detach().double().numpy(), x.grad.detach().double().numpy()


def run_case(case: Case, *, seed: int = 0, implementation: Callable[..., Any] | None = None) -> Result:
    """Runs one case; ``implementation`` replaces the jaxloss function under test."""
    fn = implementation if implementation is not None else getattr(jaxloss, case.function)
    (v_rtol, v_atol), (g_rtol, g_atol) = TOLERANCES[case.dtype]
    inputs = case.make(np.random.default_rng(seed))
    try:
        value, grad = _run_jax(case, fn, inputs)
        ref_value, ref_grad = _run_torch(case, inputs)
    except Exception as exc:  # noqa: BLE001 - a crash is a failed check, reported in the table
        nan = math.nan
        return Result(case.function, case.case, case.dtype, nan, nan, nan, nan, v_rtol, v_atol, g_rtol, g_atol,
                      False, f"{type(exc).__name__}: {exc}")
    v_abs, v_rel, v_ok = compare(value, ref_value, v_rtol, v_atol)
    g_abs, g_rel, g_ok = compare(grad, ref_grad, g_rtol, g_atol)
    return Result(case.function, case.case, case.dtype, v_abs, v_rel, g_abs, g_rel, v_rtol, v_atol, g_rtol, g_atol,
                  v_ok and g_ok)


# --- the cases ---------------------------------------------------------------------------------

_C = 7  # classes
_V = 13  # vocabulary


def _class_inputs(shape: tuple[int, ...], *, ignore: bool = False, axis: int = -1):
    def make(rng: np.random.Generator) -> dict[str, np.ndarray]:
        batch = tuple(s for i, s in enumerate(shape) if i != axis % len(shape))
        targets = rng.integers(0, _C, size=batch)
        if ignore:
            targets = np.where(rng.random(batch) < 0.25, -100, targets)
            targets.flat[0] = 0
        probs = rng.dirichlet(np.ones(_C), size=batch)
        return {
            "x": rng.normal(size=shape) * 3.0,
            "targets": targets,
            "weight": rng.uniform(0.2, 2.0, size=_C),
            "probs": np.moveaxis(probs, -1, axis),
            "mask": rng.random(batch) < 0.7,
        }

    return make


def _torch_nc(x):
    """torch wants classes on axis 1; jaxloss' default is the last axis."""
    return x.movedim(-1, 1).contiguous() if x.ndim > 2 else x


def _elementwise_inputs(shape=(6, 5)):
    def make(rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {
            "x": rng.normal(size=shape) * 2.0,
            "y": rng.normal(size=shape) * 2.0,
            "binary": (rng.random(shape) < 0.5).astype(np.float64),
            "soft": rng.random(shape),
            "weight": rng.uniform(0.2, 2.0, size=shape[-1:]),
            "pos_weight": rng.uniform(0.5, 3.0, size=shape[-1:]),
            "mask": rng.random(shape) < 0.7,
        }

    return make


def _kl_inputs(rng: np.random.Generator) -> dict[str, np.ndarray]:
    logits = rng.normal(size=(5, 3, 6)) * 2.0
    log_q = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    p = rng.dirichlet(np.ones(6), size=(5, 3))
    p[0, 0, 0] = 0.0
    return {"x": log_q, "p": p, "log_p": np.log(np.maximum(p, 1e-30))}


def _sequence_inputs(rng: np.random.Generator) -> dict[str, np.ndarray]:
    ids = rng.integers(0, _V, size=(3, 8))
    lengths = np.array([8, 5, 2])
    attention = (np.arange(8)[None] < lengths[:, None]).astype(np.int64)
    return {
        "x": rng.normal(size=(3, 8, _V)) * 2.0,
        "ids": ids,
        "targets": np.where(attention == 1, ids, -100),
        "attention": attention,
    }


def _torch_sequence_nll(F, x, targets):
    return F.cross_entropy(x.movedim(-1, 1).contiguous(), targets, reduction="none")


def default_cases() -> list[Case]:
    """A few shapes, dtypes and options for every public loss."""
    _, F = _import_torch()
    ce = "cross_entropy"
    cases = [
        Case(ce, "(N,C) mean", "float32", _class_inputs((16, _C)),
             lambda f, x, a: f(x, a["targets"]),
             lambda x, a: F.cross_entropy(x, a["targets"])),
        Case(ce, "(N,C) weight+ignore+smoothing", "float32", _class_inputs((16, _C), ignore=True),
             lambda f, x, a: f(x, a["targets"], weight=a["weight"], label_smoothing=0.1),
             lambda x, a: F.cross_entropy(x, a["targets"], weight=a["weight"], label_smoothing=0.1)),
        Case(ce, "(N,C) weight+ignore", "float64", _class_inputs((16, _C), ignore=True),
             lambda f, x, a: f(x, a["targets"], weight=a["weight"]),
             lambda x, a: F.cross_entropy(x, a["targets"], weight=a["weight"])),
        Case(ce, "(N,d1,d2,C) none", "bfloat16", _class_inputs((2, 3, 4, _C), ignore=True),
             lambda f, x, a: f(x, a["targets"], reduction="none"),
             lambda x, a: F.cross_entropy(_torch_nc(x), a["targets"], reduction="none")),
        Case(ce, "(N,C,d1,d2) axis=1 sum", "float32", _class_inputs((2, _C, 3, 4), axis=1),
             lambda f, x, a: f(x, a["targets"], axis=1, reduction="sum", label_smoothing=0.2),
             lambda x, a: F.cross_entropy(x, a["targets"], reduction="sum", label_smoothing=0.2)),
        Case(ce, "probabilities weight+smoothing", "float32", _class_inputs((16, _C)),
             lambda f, x, a: f(x, a["probs"], weight=a["weight"], label_smoothing=0.1),
             lambda x, a: F.cross_entropy(x, a["probs"], weight=a["weight"], label_smoothing=0.1)),
        Case(ce, "probabilities (N,d,C) none", "bfloat16", _class_inputs((4, 3, _C)),
             lambda f, x, a: f(x, a["probs"], reduction="none"),
             lambda x, a: F.cross_entropy(_torch_nc(x), _torch_nc(a["probs"]), reduction="none"),
             cast=("probs",)),
        Case(ce, "where mask = ignored ids", "float32", _class_inputs((16, _C)),
             lambda f, x, a: f(x, a["targets"], where=a["mask"], weight=a["weight"]),
             lambda x, a: F.cross_entropy(x, a["targets"].masked_fill(~a["mask"], -100), weight=a["weight"])),
        Case("nll_loss", "(N,C) weight+ignore mean", "float32", _class_inputs((16, _C), ignore=True),
             lambda f, x, a: f(jax.nn.log_softmax(x), a["targets"], weight=a["weight"]),
             lambda x, a: F.nll_loss(F.log_softmax(x, -1), a["targets"], weight=a["weight"])),
        Case("nll_loss", "(N,d,C) none", "float64", _class_inputs((4, 3, _C), ignore=True),
             lambda f, x, a: f(x, a["targets"], reduction="none"),
             lambda x, a: F.nll_loss(_torch_nc(x), a["targets"], reduction="none")),
        Case("nll_loss", "(N,C) sum", "bfloat16", _class_inputs((16, _C)),
             lambda f, x, a: f(x, a["targets"], reduction="sum"),
             lambda x, a: F.nll_loss(x, a["targets"], reduction="sum")),
    ]
    bce = "binary_cross_entropy_with_logits"
    cases += [
        Case(bce, "weight+pos_weight mean", "float32", _elementwise_inputs(),
             lambda f, x, a: f(x, a["binary"], weight=a["weight"], pos_weight=a["pos_weight"]),
             lambda x, a: F.binary_cross_entropy_with_logits(x, a["binary"], weight=a["weight"], pos_weight=a["pos_weight"])),
        Case(bce, "soft targets none", "bfloat16", _elementwise_inputs(),
             lambda f, x, a: f(x, a["soft"], reduction="none"),
             lambda x, a: F.binary_cross_entropy_with_logits(x, a["soft"], reduction="none"), cast=("soft",)),
        Case(bce, "sum", "float64", _elementwise_inputs(),
             lambda f, x, a: f(x, a["binary"], reduction="sum"),
             lambda x, a: F.binary_cross_entropy_with_logits(x, a["binary"], reduction="sum")),
    ]
    for name, torch_fn, opts in (
        ("mse_loss", F.mse_loss, {}),
        ("l1_loss", F.l1_loss, {}),
        ("smooth_l1_loss", F.smooth_l1_loss, {"beta": 0.5}),
        ("huber_loss", F.huber_loss, {"delta": 2.0}),
    ):
        label = ", ".join(f"{k}={v}" for k, v in opts.items())
        for dtype, reduction in (("float32", "mean"), ("bfloat16", "sum"), ("float64", "none")):
            cases.append(
                Case(name, f"{reduction} {label}".strip(), dtype, _elementwise_inputs(),
                     lambda f, x, a, r=reduction, o=opts: f(x, a["y"], reduction=r, **o),
                     lambda x, a, r=reduction, o=opts, t=torch_fn: t(x, a["y"], reduction=r, **o),
                     cast=("y",))
            )
    cases += [
        Case("kl_div", "batchmean", "float32", _kl_inputs,
             lambda f, x, a: f(x, a["p"], reduction="batchmean"),
             lambda x, a: F.kl_div(x, a["p"], reduction="batchmean")),
        Case("kl_div", "log_target sum", "float64", _kl_inputs,
             lambda f, x, a: f(x, a["log_p"], reduction="sum", log_target=True),
             lambda x, a: F.kl_div(x, a["log_p"], reduction="sum", log_target=True)),
        Case("kl_div", "mean", "bfloat16", _kl_inputs,
             lambda f, x, a: f(x, a["p"], reduction="mean"),
             lambda x, a: F.kl_div(x, a["p"], reduction="mean"), cast=("p",)),
        Case("sequence_log_likelihood", "(B,T,V) padded", "float32", _sequence_inputs,
             lambda f, x, a: f(x, a["targets"]),
             lambda x, a: -_torch_sequence_nll(F, x, a["targets"]).sum(-1)),
        Case("sequence_nll_loss", "normalize=sequence", "float32", _sequence_inputs,
             lambda f, x, a: f(x, a["targets"], normalize="sequence"),
             lambda x, a: _torch_sequence_nll(F, x, a["targets"]).sum() / x.shape[0]),
        Case("sequence_nll_loss", "normalize=token", "float64", _sequence_inputs,
             lambda f, x, a: f(x, a["targets"], normalize="token"),
             lambda x, a: F.cross_entropy(x.reshape(-1, _V), a["targets"].reshape(-1))),
        Case("causal_lm_loss", "attention mask (HF labels=-100)", "float32", _sequence_inputs,
             lambda f, x, a: f(x, a["ids"], attention_mask=a["attention"]),
             lambda x, a: F.cross_entropy(
                 x[:, :-1].reshape(-1, _V), a["targets"][:, 1:].reshape(-1), ignore_index=-100)),
        Case("causal_lm_loss", "bf16 logits", "bfloat16", _sequence_inputs,
             lambda f, x, a: f(x, a["targets"]),
             lambda x, a: F.cross_entropy(x[:, :-1].reshape(-1, _V), a["targets"][:, 1:].reshape(-1))),
        Case("perplexity", "(B,T,V) padded", "float32", _sequence_inputs,
             lambda f, x, a: f(x, a["targets"]),
             lambda x, a: F.cross_entropy(x.reshape(-1, _V), a["targets"].reshape(-1)).exp()),
    ]
    if hasattr(jaxloss, "linear_cross_entropy"):  # the fused output layer, when it is exported
        cases += [
            Case("linear_cross_entropy", "(N,D)x(D,V) ignore+smoothing", "float32", _linear_inputs,
                 lambda f, x, a: f(x, a["w"], a["targets"], label_smoothing=0.1),
                 lambda x, a: F.cross_entropy(x @ a["w"], a["targets"], label_smoothing=0.1)),
            Case("linear_cross_entropy", "sum", "float64", _linear_inputs,
                 lambda f, x, a: f(x, a["w"], a["targets"], reduction="sum"),
                 lambda x, a: F.cross_entropy(x @ a["w"], a["targets"], reduction="sum")),
        ]
    return cases


def _linear_inputs(rng: np.random.Generator) -> dict[str, np.ndarray]:
    targets = rng.integers(0, 50, size=24)
    targets[::5] = -100
    return {"x": rng.normal(size=(24, 16)), "w": rng.normal(size=(16, 50)) * 0.3, "targets": targets}


def run_checks(
    cases: Sequence[Case] | None = None,
    *,
    functions: Sequence[str] | None = None,
    implementations: Mapping[str, Callable[..., Any]] | None = None,
    seed: int = 0,
) -> list[Result]:
    """Runs ``cases`` (default: :func:`default_cases`), optionally only for ``functions``.

    ``implementations`` maps a function name to a replacement for the jaxloss function
    (to check a variant, or that a wrong implementation fails).
    """
    cases = default_cases() if cases is None else list(cases)
    if functions:
        unknown = set(functions) - {c.function for c in cases}
        if unknown:
            raise ValueError(f"no cases for {sorted(unknown)}; known: {sorted({c.function for c in cases})}")
        cases = [c for c in cases if c.function in functions]
    implementations = implementations or {}
    return [run_case(c, seed=seed, implementation=implementations.get(c.function)) for c in cases]


def format_table(results: Sequence[Result]) -> str:
    """The results as a fixed-width text table."""
    header = ("function", "case", "dtype", "value abs", "value rel", "grad abs", "grad rel", "tolerance (rtol/atol)", "")
    rows = [header]
    for r in results:
        tol = f"v {r.value_rtol:.0e}/{r.value_atol:.0e} g {r.grad_rtol:.0e}/{r.grad_atol:.0e}"
        rows.append((
            r.function, r.case, r.dtype,
            f"{r.value_max_abs_err:.2e}", f"{r.value_max_rel_err:.2e}",
            f"{r.grad_max_abs_err:.2e}", f"{r.grad_max_rel_err:.2e}",
            tol, "PASS" if r.passed else "FAIL",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines += [f"  {r.function} / {r.case} / {r.dtype}: {r.error}" for r in results if r.error]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: prints the table, optionally writes JSON; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="jaxloss-crosscheck", description="Compare every jaxloss loss with the installed PyTorch."
    )
    parser.add_argument("--json", metavar="PATH", help="write the results to PATH as JSON")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    parser.add_argument("--function", action="append", metavar="NAME", help="check only NAME (repeatable)")
    args = parser.parse_args(argv)

    torch, _ = _import_torch()
    start = time.perf_counter()
    results = run_checks(functions=args.function, seed=args.seed)
    elapsed = time.perf_counter() - start
    failed = [r for r in results if not r.passed]
    print(f"jaxloss {jaxloss.__version__} vs torch {torch.__version__} (jax {jax.__version__}, "
          f"{jax.default_backend()}); seed {args.seed}")
    print("bfloat16 rows: torch runs in float32 on the same bfloat16 values (jaxloss computes 16-bit inputs in float32)")
    print(format_table(results))
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed in {elapsed:.1f} s")
    if args.json:
        payload = {
            "jaxloss": jaxloss.__version__,
            "torch": torch.__version__,
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "seed": args.seed,
            "seconds": elapsed,
            "results": [dataclasses.asdict(r) for r in results],
        }
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=2, allow_nan=True)
            fh.write("\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
