"""How well a run uses its devices: FLOPs per step, TFLOP/s and tokens/s per device, and model
FLOPs utilisation (MFU) against the device's peak.

The FLOPs of a step are those of its matrix products, counted in the traced program
(:func:`jaxpr_flops`: ``2 M N K`` per product, times the length of every ``scan`` around it)
and divided by the number of devices: the work of one device when the step is spread evenly.
XLA's own count (``cost_analysis()``) counts a loop's body once, so it misses all but one of
the scanned layers and micro-batches. With ``--remat`` the traced backward pass holds the
recomputed forward products, so the utilisation is then the hardware's (HFU) rather than
the model's.
"""

from __future__ import annotations

from typing import Any

#: Dense bfloat16 peak TFLOP/s per device (one chip / one GPU), by a piece of ``device_kind``
#: (vendors' data sheets). A device not listed (a CPU) has no MFU unless ``--peak-tflops`` gives it.
PEAK_TFLOPS: dict[str, float] = {
    "H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L4": 121.0,
    "A10G": 125.0, "B200": 2250.0, "TPU v6": 918.0, "TPU v5p": 459.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0,
    "TPU v4": 275.0, "TPU v3": 123.0,
}


def peak_tflops(device_kind: str, override: float | None = None) -> float | None:
    """The peak TFLOP/s of one device: ``override`` if given, else :data:`PEAK_TFLOPS`'s entry
    for ``device_kind`` (the longest name it contains), else ``None``.

    Example:
      >>> peak_tflops("NVIDIA H100 80GB HBM3"), peak_tflops("TPU v5 lite"), peak_tflops("cpu")
      (989.0, 197.0, None)
      >>> peak_tflops("cpu", override=2.0)
      2.0
    """
    if override is not None:
        return float(override)
    matches = [name for name in PEAK_TFLOPS if name.lower() in device_kind.lower()]
    return PEAK_TFLOPS[max(matches, key=len)] if matches else None


def jaxpr_flops(jaxpr: Any) -> float:
    """FLOPs of the matrix products in a (closed) jaxpr: ``2 * prod(output shape) * K`` for
    each ``dot_general`` with contracted size ``K``, nested jaxprs included, a ``scan``'s body
    counted ``length`` times (a ``while`` loop's once; of a ``cond``, the costliest branch).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x = jnp.ones((4, 8)); w = jnp.ones((8, 16))
      >>> jaxpr_flops(jax.make_jaxpr(lambda x: x @ w)(x))  # 2 * 4 * 16 * 8
      1024.0
      >>> body = lambda h, _: (h @ jnp.ones((8, 8)), None)
      >>> jaxpr_flops(jax.make_jaxpr(lambda x: jax.lax.scan(body, x, length=3)[0])(x))  # 3 * 2 * 4 * 8 * 8
      1536.0
    """
    inner = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in inner.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            size = 1
            for axis in contract:
                size *= lhs[axis]
            out = 1
            for dim in eqn.outvars[0].aval.shape:
                out *= dim
            total += 2.0 * out * size
            continue
        if eqn.primitive.name == "cond":
            total += max(jaxpr_flops(branch) for branch in eqn.params["branches"])
        else:
            nested = sum(_flops_of(value) for value in eqn.params.values())
            total += nested * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
    return total


def _flops_of(param: Any) -> float:
    """FLOPs of the jaxprs an equation's parameter holds (one, or a tuple of them)."""
    if isinstance(param, (tuple, list)):
        return sum(_flops_of(p) for p in param)
    if hasattr(param, "eqns") or (hasattr(param, "jaxpr") and hasattr(param, "consts")):
        return jaxpr_flops(param)
    return 0.0


def utilisation(flops: float | None, seconds: float, tokens: int, devices: int,
                peak: float | None) -> dict[str, float]:
    """Per-device figures of a window of steps: ``flops`` (per device, summed over the steps)
    done in ``seconds`` while ``tokens`` went through ``devices`` devices.

    Example:
      >>> utilisation(4e12, 2.0, 8192, 4, peak=4.0)
      {'train/tokens_per_second_per_device': 1024.0, 'train/tflops_per_second_per_device': 2.0, 'train/mfu': 0.5}
    """
    out = {"train/tokens_per_second_per_device": tokens / max(seconds, 1e-9) / devices}
    if flops is not None:
        tflops = flops / max(seconds, 1e-9) / 1e12
        out["train/tflops_per_second_per_device"] = tflops
        if peak:
            out["train/mfu"] = tflops / peak
    return out
