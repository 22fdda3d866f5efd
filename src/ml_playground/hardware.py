"""Peak throughput of the accelerators MFU is measured against (dense, no sparsity), and the
CUDA probe a CPU run does not need."""

from __future__ import annotations

import os

import torch

NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"

# Device-name fragment -> (bf16/fp16 tensor-core TFLOP/s, tf32 TFLOP/s), from vendor sheets.
# More specific names first: "H100 PCIe" must match before "H100".
PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("GH200", 989.0, 494.0),
    ("H200", 989.0, 494.0),
    ("H100 PCIe", 756.0, 378.0),
    ("H100 NVL", 835.0, 418.0),
    ("H100", 989.0, 494.0),  # SXM
    ("H800", 989.0, 494.0),
    ("B200", 2250.0, 1100.0),
    ("A100", 312.0, 156.0),
    ("A800", 312.0, 156.0),
    ("L40S", 362.0, 183.0),
    ("L40", 181.0, 90.5),
    ("L4", 121.0, 60.0),
    ("A10G", 70.0, 35.0),
    ("A10", 125.0, 62.5),
    ("RTX 4090", 165.0, 82.6),
    ("RTX 3090", 71.0, 35.6),
    ("V100", 125.0, 15.7),  # no TF32: fp32 peak
    ("T4", 65.0, 8.1),
)


def peak_flops(device: torch.device, precision: str) -> tuple[float | None, str]:
    """Peak FLOP/s for this device at this precision, or None, and the device's name."""
    if device.type != "cuda":
        return None, device.type.upper()
    name = torch.cuda.get_device_name(device)
    for fragment, half, tf32 in PEAK_TFLOPS:
        if fragment.lower() in name.lower():
            low = any(tag in precision for tag in ("16", "bf16"))
            return (half if low else tf32) * 1e12, name
    return None, name


def cheap_cuda_probe_without_gpus() -> None:
    """Let `torch.cuda.is_available()` use its cached answer when no CUDA device is visible.

    Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1 at import, so that the check does not
    initialise CUDA before a fork. torch's optimizers run the check on every step (a CUDA-graph
    capture guard), and while CUDA is uninitialised, as on a CPU run with torch's CUDA build,
    the NVML path tries to load libnvidia-ml each time: 0.4 ms a step, about 1% of the 4 x 128
    CPU recipe. With no CUDA device visible there is no fork to protect, so the variable is
    dropped and the plain check (cached by torch) answers. GPU runs initialise CUDA, which
    caches the count, and are left as they are."""
    if os.environ.get(NVML_CHECK) == "1" and torch.cuda.device_count() == 0:
        del os.environ[NVML_CHECK]
