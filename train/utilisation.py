"""How well a run uses its devices: FLOPs per step, TFLOP/s and tokens/s per device, and model
FLOPs utilisation (MFU) against the device's peak.

The FLOPs of a step are XLA's count for the compiled step program (``cost_analysis()``), which
is the program of one device under SPMD: the work each device does per step. With ``--remat``
that count includes the recomputed forward passes, so the utilisation is then the hardware's
(HFU) rather than the model's.
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


def program_flops(executable: Any) -> float | None:
    """XLA's FLOP count of a compiled program (one device's share under SPMD), or ``None``
    where the backend does not give one."""
    try:
        analysis = executable.cost_analysis()
    except Exception:  # noqa: BLE001 - a backend without cost analysis
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


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
