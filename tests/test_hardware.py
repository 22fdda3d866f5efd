"""What the project tells torch about the machine it runs on."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ml_playground.hardware import NVML_CHECK, cheap_cuda_probe_without_gpus, peak_flops

PROBE = f"""
import os, torch
import lightning.fabric  # sets {NVML_CHECK}=1
from ml_playground.hardware import NVML_CHECK, cheap_cuda_probe_without_gpus
before = os.environ.get(NVML_CHECK)
cheap_cuda_probe_without_gpus()
print(before, os.environ.get(NVML_CHECK), torch.cuda.is_available())
"""


def test_without_a_visible_gpu_the_nvml_probe_is_dropped() -> None:
    """Lightning's PYTORCH_NVML_BASED_CUDA_CHECK=1 makes every optimizer step try to load NVML
    while CUDA is uninitialised; with no visible device the variable goes and the check is
    torch's cached one. A fresh process: CUDA must not be initialised already."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop(NVML_CHECK, None)
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == ["1", "None", "False"]


def test_a_setting_other_than_lightnings_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv(NVML_CHECK, "0")
    cheap_cuda_probe_without_gpus()
    assert os.environ[NVML_CHECK] == "0"


def test_no_peak_is_claimed_for_a_cpu() -> None:
    assert peak_flops(torch.device("cpu"), "32-true") == (None, "CPU")
