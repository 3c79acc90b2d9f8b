"""The MFU denominator: the dense bf16 peak of the GPU a rank runs on, by its torch name."""

from __future__ import annotations

import pytest
import torch

from mnemo.train.flops import device_peak_flops


@pytest.mark.parametrize(
    "name,peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),  # SXM
        ("NVIDIA H100 PCIe", 756e12),  # was given the SXM peak: MFU understated by a quarter
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A10", 125e12),
        ("NVIDIA GeForce RTX 4090", 0.0),  # unknown: MFU not logged
    ],
)
def test_the_peak_is_the_named_gpus(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    assert device_peak_flops(use_cuda=True) == peak


def test_no_peak_on_cpu():
    assert device_peak_flops(use_cuda=False) == 0.0
