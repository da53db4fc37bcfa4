"""How ``runtime: auto`` picks a device and a precision, on machines this CPU one pretends to be."""

from __future__ import annotations

import logging

import pytest
import torch

from clip_dfkd.errors import UserError
from clip_dfkd.params import RuntimeParams
from clip_dfkd.runtime import Runtime


def _gpu(monkeypatch, *, native_bf16: bool) -> None:
    """A CUDA GPU with or without bf16 units; every GPU reports bf16 when emulation counts."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", lambda including_emulation=True: native_bf16 or including_emulation
    )


@pytest.mark.parametrize(("native_bf16", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_precision_takes_bf16_only_where_the_gpu_has_it(monkeypatch, native_bf16, expected) -> None:
    _gpu(monkeypatch, native_bf16=native_bf16)

    runtime = Runtime.resolve(RuntimeParams(device="auto", precision="auto"))

    assert (runtime.device.type, runtime.dtype) == ("cuda", expected)


def test_auto_precision_is_fp32_on_the_cpu() -> None:
    assert Runtime.resolve(RuntimeParams(device="cpu", precision="auto")).dtype == torch.float32


def test_auto_device_says_loudly_when_a_gpu_it_cannot_use_leaves_the_run_on_the_cpu(monkeypatch, caplog) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr("clip_dfkd.runtime.nvidia_driver_present", lambda: True)

    with caplog.at_level(logging.WARNING, logger="clip_dfkd.runtime"):
        runtime = Runtime.resolve(RuntimeParams(device="auto"))

    assert runtime.device.type == "cpu"
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.getMessage().startswith(
        "runtime.device=auto: this machine has an NVIDIA driver but PyTorch (CUDA 13.0) cannot use its GPU"
    )


def test_auto_device_on_a_machine_without_a_gpu_is_quiet(monkeypatch, caplog) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr("clip_dfkd.runtime.nvidia_driver_present", lambda: False)

    with caplog.at_level(logging.WARNING, logger="clip_dfkd.runtime"):
        assert Runtime.resolve(RuntimeParams(device="auto")).device.type == "cpu"

    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_asking_for_cuda_that_sees_a_gpu_it_cannot_use_fails_before_any_work(monkeypatch) -> None:
    # A driver older than PyTorch's CUDA build: NVML counts the GPU, CUDA cannot start on it.
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    with pytest.raises(
        UserError, match=r"^runtime.device='cuda': no such device on this machine; allowed here: auto, cpu$"
    ):
        Runtime.resolve(RuntimeParams(device="cuda"))
