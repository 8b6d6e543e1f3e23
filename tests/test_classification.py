"""Classification losses against ``torch.nn.functional``: values and gradients over a grid.

The grid crosses batch layouts (``(N, C)``, ``(N, d1, d2, C)`` with the class axis last,
which torch gets through ``movedim``, and ``(N, C, d1, d2)`` with ``axis=1`` given to both
libraries as is), dtypes (float32, bfloat16, float64), every reduction and the options
(class weights, ``ignore_index``, label smoothing, probability targets, ``where`` masks,
``z_loss``). A ``where`` mask is compared with torch on the equivalent input in which the
masked elements are ignored (class ids set to ``ignore_index``) or dropped (rows removed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tests.torch_reference import JAX_DTYPES, TORCH_DTYPES, assert_close, check_against_torch, round_to

import jaxloss

C = 5
DTYPES = ["float32", "bfloat16", "float64"]
REDUCTIONS = ["none", "sum", "mean", "sum_count"]
# name -> (logits shape, class axis)
LAYOUTS = {"NC": ((7, C), -1), "N_d1_d2_C": ((2, 3, 4, C), -1), "NCd1d2_axis1": ((2, C, 3, 4), 1)}


def _grid(options: list[str], other_dtype_options: list[str]) -> list:
    """(layout, dtype, option, reduction) cells: float32 crosses every layout, option and
    reduction (the axis=1 layout with "none" and "mean"); bfloat16 and float64 cross
    ``other_dtype_options`` with each reduction once and with the axis=1 layout."""
    cells = []
    wanted = {"NC": ("sum", "sum_count"), "N_d1_d2_C": ("none", "mean"), "NCd1d2_axis1": ("mean",)}
    for layout in LAYOUTS:
        for dtype in DTYPES:
            for option in options if dtype == "float32" else other_dtype_options:
                for reduction in REDUCTIONS:
                    if dtype != "float32" and reduction not in wanted[layout]:
                        continue
                    if layout == "NCd1d2_axis1" and reduction not in ("none", "mean"):
                        continue  # the reductions do not depend on where the class axis was
                    cells.append(pytest.param(layout, dtype, option, reduction, id=f"{layout}-{dtype}-{option}-{reduction}"))
    return cells


def _weight_dtype(dtype: str) -> str:
    return "float64" if dtype == "float64" else "float32"


def _make_class_case(layout: str, option: str, seed: int = 0):
    """Logits, class ids, class weights, mask and keyword options for one grid cell."""
    shape, axis = LAYOUTS[layout]
    rng = np.random.default_rng(seed)
    batch = tuple(s for i, s in enumerate(shape) if i != axis % len(shape))
    logits = rng.normal(size=shape) * 2.0
    targets = rng.integers(0, C, size=batch)
    weight = rng.uniform(0.2, 2.0, size=C)
    mask = rng.random(batch) < 0.7
    mask.flat[0] = True
    opts: dict = {}
    if "ignore" in option:
        ignore_index = 2 if "ignore_custom" in option else -100  # a valid class id can be ignored too
        ignored = rng.random(batch) < 0.25
        ignored.flat[0] = False
        targets = np.where(ignored, ignore_index, targets)
        if ignore_index != -100:
            opts["ignore_index"] = ignore_index
    if "weight" in option:
        opts["weight"] = weight
    if "smoothing" in option:
        opts["label_smoothing"] = 0.2
    if "where" not in option:
        mask = None
    return logits, targets, mask, axis, opts


CLASS_OPTIONS = [
    "plain",
    "weight",
    "ignore",
    "ignore_custom",
    "smoothing",
    "weight_smoothing_ignore",
    "where",
    "where_weight_smoothing",
]


def _torch_layout(x: torch.Tensor, axis: int) -> torch.Tensor:
    """Torch wants the class axis at 1; our default puts it last."""
    return x.movedim(-1, 1).contiguous() if (axis == -1 and x.ndim > 2) else x


def _torch_reduction(reduction: str) -> str:
    return "sum" if reduction == "sum_count" else reduction


@pytest.mark.parametrize(("layout", "dtype", "option", "reduction"), _grid(CLASS_OPTIONS, ["plain", "smoothing", "weight_smoothing_ignore", "where_weight_smoothing"]))
def test_cross_entropy_class_ids_matches_torch(layout, dtype, option, reduction):
    logits, targets, mask, axis, opts = _make_class_case(layout, option)
    ignore_index = opts.get("ignore_index", -100)
    wdt = _weight_dtype(dtype)
    # The torch equivalent of a mask: the masked elements' class ids become ignore_index.
    torch_targets = targets if mask is None else np.where(mask, targets, ignore_index)
    with jax.enable_x64(dtype == "float64"):
        jax_kwargs = dict(opts, reduction=reduction, axis=axis)
        if "weight" in opts:
            jax_kwargs["weight"] = jnp.asarray(opts["weight"], JAX_DTYPES[wdt])
        if mask is not None:
            jax_kwargs["where"] = jnp.asarray(mask)

        def jax_fn(x):
            return jaxloss.cross_entropy(x, jnp.asarray(targets), **jax_kwargs)

        def torch_fn(x):
            kwargs = dict(opts, reduction=_torch_reduction(reduction))
            if "weight" in opts:
                kwargs["weight"] = torch.tensor(opts["weight"], dtype=x.dtype)
            return F.cross_entropy(_torch_layout(x, axis), torch.tensor(torch_targets), **kwargs)

        check_against_torch(jax_fn, torch_fn, logits, dtype, what=f"{layout} {dtype} {option} {reduction}")
        if reduction == "sum_count":
            pair = jax_fn(jnp.asarray(logits, JAX_DTYPES[dtype]))
            counted = torch_targets != ignore_index
            w = opts.get("weight", np.ones(C))
            expected_count = np.sum(np.where(counted, w[np.where(counted, torch_targets, 0)], 0.0))
            assert pair.count.dtype == (jnp.float64 if dtype == "float64" else jnp.float32)
            assert_close(np.asarray(pair.count), expected_count, (1e-6, 1e-6), "count")


PROB_OPTIONS = ["probs", "probs_weight", "probs_smoothing", "probs_weight_smoothing", "probs_where"]


def _make_prob_case(layout: str, option: str, seed: int = 0):
    shape, axis = LAYOUTS[layout]
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=shape) * 2.0
    probs = np.exp(rng.normal(size=shape) * 1.5)
    probs = probs / probs.sum(axis=axis, keepdims=True)
    batch = tuple(s for i, s in enumerate(shape) if i != axis % len(shape))
    mask = rng.random(batch) < 0.6 if "where" in option else None
    if mask is not None:
        mask.flat[0] = True
    opts: dict = {}
    if "weight" in option:
        opts["weight"] = rng.uniform(0.2, 2.0, size=C)
    if "smoothing" in option:
        opts["label_smoothing"] = 0.15
    return logits, probs, mask, axis, opts


@pytest.mark.parametrize(("layout", "dtype", "option", "reduction"), _grid(PROB_OPTIONS, ["probs", "probs_weight_smoothing", "probs_where"]))
def test_cross_entropy_probability_targets_matches_torch(layout, dtype, option, reduction):
    logits, probs, mask, axis, opts = _make_prob_case(layout, option)
    wdt = _weight_dtype(dtype)
    probs_seen = round_to(probs, dtype) if dtype != "float64" else probs
    with jax.enable_x64(dtype == "float64"):
        jax_kwargs = dict(opts, reduction=reduction, axis=axis)
        if "weight" in opts:
            jax_kwargs["weight"] = jnp.asarray(opts["weight"], JAX_DTYPES[wdt])
        if mask is not None:
            jax_kwargs["where"] = jnp.asarray(mask)
        jax_probs = jnp.asarray(probs, JAX_DTYPES[dtype])

        def jax_fn(x):
            return jaxloss.cross_entropy(x, jax_probs, **jax_kwargs)

        def torch_fn(x):
            kwargs = dict(opts)
            if "weight" in opts:
                kwargs["weight"] = torch.tensor(opts["weight"], dtype=x.dtype)
            p = torch.tensor(probs_seen, dtype=x.dtype)
            if mask is None:
                return F.cross_entropy(
                    _torch_layout(x, axis), _torch_layout(p, axis), reduction=_torch_reduction(reduction), **kwargs
                )
            # The torch equivalent of a mask: drop the masked rows.
            rows_x = x.movedim(axis, -1).reshape(-1, C)
            rows_p = p.movedim(axis, -1).reshape(-1, C)
            keep = torch.tensor(mask.reshape(-1))
            kept = F.cross_entropy(rows_x[keep], rows_p[keep], reduction="none", **kwargs)
            if reduction == "none":
                out = torch.zeros(keep.shape, dtype=kept.dtype).index_put((keep.nonzero()[:, 0],), kept)
                return out.reshape(mask.shape)
            return kept.mean() if reduction == "mean" else kept.sum()

        check_against_torch(jax_fn, torch_fn, logits, dtype, what=f"{layout} {dtype} {option} {reduction}")
        if reduction == "sum_count":
            pair = jax_fn(jnp.asarray(logits, JAX_DTYPES[dtype]))
            rows = logits.size // C
            assert float(pair.count) == (float(rows) if mask is None else float(mask.sum()))


@pytest.mark.parametrize("reduction", ["none", "mean", "sum_count"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("targets_kind", ["class_ids", "probs"])
def test_cross_entropy_z_loss_matches_composed_torch(targets_kind, dtype, reduction):
    """``z_loss`` adds ``zeta * w_y * lse**2`` per element (``zeta * lse**2`` for probabilities)."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 3, C)) * 2.0
    zeta = 1e-2
    weight = rng.uniform(0.2, 2.0, size=C)
    if targets_kind == "class_ids":
        targets = rng.integers(0, C, size=(2, 3))
        targets[0, 1] = -100
    else:
        targets = rng.dirichlet(np.ones(C), size=(2, 3))
    targets_seen = targets if targets_kind == "class_ids" or dtype == "float64" else round_to(targets, dtype)
    with jax.enable_x64(dtype == "float64"):
        wdt = JAX_DTYPES[_weight_dtype(dtype)]
        jax_targets = jnp.asarray(targets) if targets_kind == "class_ids" else jnp.asarray(targets, JAX_DTYPES[dtype])

        def jax_fn(x):
            return jaxloss.cross_entropy(
                x, jax_targets, weight=jnp.asarray(weight, wdt), z_loss=zeta, reduction=reduction
            )

        def torch_fn(x):
            w = torch.tensor(weight, dtype=x.dtype)
            lse = torch.logsumexp(x, dim=-1)
            if targets_kind == "class_ids":
                t = torch.tensor(targets)
                counted = t != -100
                per = F.cross_entropy(x.movedim(-1, 1), t, weight=w, reduction="none")
                w_y = torch.where(counted, w[t.clamp(min=0)], torch.zeros((), dtype=x.dtype))
                per = per + zeta * w_y * lse**2
                denominator = w_y.sum()
            else:
                p = torch.tensor(targets_seen, dtype=x.dtype)
                per = F.cross_entropy(x.movedim(-1, 1), p.movedim(-1, 1), weight=w, reduction="none")
                per = per + zeta * lse**2
                denominator = torch.tensor(float(per.numel()), dtype=x.dtype)
            if reduction == "none":
                return per
            return per.sum() / denominator if reduction == "mean" else per.sum()

        check_against_torch(jax_fn, torch_fn, logits, dtype, what=f"z_loss {targets_kind} {dtype} {reduction}")


NLL_OPTIONS = ["plain", "weight_ignore", "where", "weight_ignore_where"]


@pytest.mark.parametrize(("layout", "dtype", "option", "reduction"), _grid(NLL_OPTIONS, ["plain", "weight_ignore_where"]))
def test_nll_loss_matches_torch(layout, dtype, option, reduction):
    logits, targets, mask, axis, opts = _make_class_case(layout, option, seed=5)
    log_probs = np.asarray(torch.log_softmax(torch.tensor(logits), dim=axis))
    wdt = _weight_dtype(dtype)
    torch_targets = targets if mask is None else np.where(mask, targets, -100)
    with jax.enable_x64(dtype == "float64"):
        jax_kwargs = dict(reduction=reduction, axis=axis)
        if "weight" in opts:
            jax_kwargs["weight"] = jnp.asarray(opts["weight"], JAX_DTYPES[wdt])
        if mask is not None:
            jax_kwargs["where"] = jnp.asarray(mask)

        def jax_fn(x):
            return jaxloss.nll_loss(x, jnp.asarray(targets), **jax_kwargs)

        def torch_fn(x):
            kwargs = {"reduction": _torch_reduction(reduction)}
            if "weight" in opts:
                kwargs["weight"] = torch.tensor(opts["weight"], dtype=x.dtype)
            return F.nll_loss(_torch_layout(x, axis), torch.tensor(torch_targets), **kwargs)

        check_against_torch(jax_fn, torch_fn, log_probs, dtype, what=f"nll {layout} {dtype} {option} {reduction}")


BCE_OPTIONS = ["plain", "weight", "pos_weight", "weight_pos_weight", "where", "where_pos_weight"]


@pytest.mark.parametrize(
    ("dtype", "option", "reduction"),
    [(d, o, r) for d in DTYPES for o in BCE_OPTIONS for r in REDUCTIONS
     if d == "float32" or r == ("mean" if "where" in o else "none") or (o == "plain" and r == "sum_count")],
)
def test_binary_cross_entropy_with_logits_matches_torch(dtype, option, reduction):
    rng = np.random.default_rng(7)
    shape = (4, 3, C)
    logits = rng.normal(size=shape) * 3.0
    targets = rng.random(shape)
    targets[0] = (targets[0] > 0.5).astype(np.float64)  # hard and soft labels
    targets_seen = targets if dtype == "float64" else round_to(targets, dtype)
    weight = rng.uniform(0.2, 2.0, size=(3, C))  # broadcasts over the batch axis
    pos_weight = rng.uniform(0.5, 3.0, size=C)  # one per class, broadcast over the last axis
    mask = rng.random(shape) < 0.7 if "where" in option else None
    with jax.enable_x64(dtype == "float64"):
        wdt = JAX_DTYPES[_weight_dtype(dtype)]
        jax_kwargs: dict = {"reduction": reduction}
        if "weight" in option.replace("pos_weight", ""):
            jax_kwargs["weight"] = jnp.asarray(weight, wdt)
        if "pos_weight" in option:
            jax_kwargs["pos_weight"] = jnp.asarray(pos_weight, wdt)
        if mask is not None:
            jax_kwargs["where"] = jnp.asarray(mask)
        jax_targets = jnp.asarray(targets, JAX_DTYPES[dtype])

        def jax_fn(x):
            return jaxloss.binary_cross_entropy_with_logits(x, jax_targets, **jax_kwargs)

        def torch_fn(x):
            kwargs = {}
            if "weight" in jax_kwargs:
                kwargs["weight"] = torch.tensor(weight, dtype=x.dtype)
            if "pos_weight" in jax_kwargs:
                kwargs["pos_weight"] = torch.tensor(pos_weight, dtype=x.dtype)
            y = torch.tensor(targets_seen, dtype=x.dtype)
            if mask is None:
                return F.binary_cross_entropy_with_logits(x, y, reduction=_torch_reduction(reduction), **kwargs)
            # Masked elements are dropped: reduce only the kept elements.
            per = F.binary_cross_entropy_with_logits(x, y, reduction="none", **kwargs)
            keep = torch.tensor(mask)
            per = torch.where(keep, per, torch.zeros((), dtype=per.dtype))
            if reduction == "none":
                return per
            return per[keep].mean() if reduction == "mean" else per[keep].sum()

        check_against_torch(jax_fn, torch_fn, logits, dtype, what=f"bce {dtype} {option} {reduction}")


def test_cross_entropy_16bit_inputs_return_float32():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, C)), jnp.bfloat16)
    targets = jnp.array([0, 1, 2, 3])
    for dtype in (jnp.bfloat16, jnp.float16):
        x = logits.astype(dtype)
        assert jaxloss.cross_entropy(x, targets).dtype == jnp.float32
        assert jaxloss.cross_entropy(x, targets, reduction="none").dtype == jnp.float32
        assert jaxloss.nll_loss(jax.nn.log_softmax(x), targets).dtype == jnp.float32
        assert jaxloss.binary_cross_entropy_with_logits(x, jnp.zeros_like(x)).dtype == jnp.float32
        pair = jaxloss.cross_entropy(x, targets, reduction="sum_count")
        assert pair.total.dtype == jnp.float32 and pair.count.dtype == jnp.float32
        assert jax.grad(lambda x_: jaxloss.cross_entropy(x_, targets))(x).dtype == dtype


def test_float16_matches_torch_float32_on_the_same_values():
    rng = np.random.default_rng(11)
    logits = rng.normal(size=(6, C)) * 4
    targets = rng.integers(0, C, size=6)
    check_against_torch(
        lambda x: jaxloss.cross_entropy(x, jnp.asarray(targets), reduction="none", label_smoothing=0.1),
        lambda x: F.cross_entropy(x, torch.tensor(targets), reduction="none", label_smoothing=0.1),
        logits,
        "float16",
        what="float16",
    )



@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's buffer assignment")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("option", ["plain", "smoothing", "weight_smoothing", "probs"])
def test_compiled_gradient_holds_at_most_one_float32_copy(dtype, option):
    """Forward+backward temporaries (compiled, not run), in float32 copies of the logits.

    With integer targets: for float32 logits none (``e = exp(x - max)`` is written into the
    gradient's output buffer), for bf16 one (``e`` itself). Probability targets hold one
    more.
    """
    n, c = 8192, 4096  # a second float32 copy appears from 4096 rows on
    logits = jax.ShapeDtypeStruct((n, c), dtype)
    targets = jax.ShapeDtypeStruct((n, c) if option == "probs" else (n,), jnp.float32 if option == "probs" else jnp.int32)
    kwargs = {"label_smoothing": 0.1} if "smoothing" in option else {}
    if option == "weight_smoothing":
        kwargs["weight"] = jnp.linspace(0.5, 2.0, c, dtype=jnp.float32)

    def loss(x, t):
        return jaxloss.cross_entropy(x, t, **kwargs)

    temp = jax.jit(jax.value_and_grad(loss)).lower(logits, targets).compile().memory_analysis().temp_size_in_bytes
    float32_copy = 4 * n * c
    copies = (0 if dtype == jnp.float32 else 1) + (1 if option == "probs" else 0)
    limit = copies * float32_copy
    assert temp <= limit + float32_copy // 8, (temp, float32_copy)
