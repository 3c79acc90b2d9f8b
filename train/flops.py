"""Peak FLOP/s of the device a rank runs on: the denominator of MFU (train/mfu)."""

from __future__ import annotations

# Dense bf16 peak FLOP/s by a substring of torch.cuda.get_device_name(); the first match wins, so the PCIe
# and NVL parts (lower clocks: "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200 NVL") come before the SXM ones.
PEAK_BF16_FLOPS = (
    ("H200 NVL", 835e12),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10", 125e12),
)


def device_peak_flops(use_cuda: bool) -> float:
    """Dense bf16 peak of known GPUs; 0 (unknown: MFU not logged) on CPU and other GPUs."""
    if not use_cuda:
        return 0.0
    import torch

    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), 0.0)
