"""How ``runtime: auto`` picks a device and a precision, on machines this CPU one pretends to be."""

from __future__ import annotations

import logging

import pytest
import torch

from clip_dfkd import runtime
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


def test_channels_last_is_on_for_cuda_by_default_and_can_be_set(monkeypatch) -> None:
    assert Runtime.resolve(RuntimeParams(device="cpu")).memory_format == torch.contiguous_format
    assert Runtime.resolve(RuntimeParams(device="cpu", channels_last=True)).memory_format == torch.channels_last
    _gpu(monkeypatch, native_bf16=True)
    assert Runtime.resolve(RuntimeParams(device="auto")).memory_format == torch.channels_last
    assert Runtime.resolve(RuntimeParams(device="auto", channels_last=False)).memory_format == torch.contiguous_format


@pytest.mark.parametrize(("cores", "workers"), [(1, 0), (2, 1), (6, 5), (64, 8)])
def test_auto_workers_leave_the_main_process_a_core_and_stop_at_eight(monkeypatch, cores, workers) -> None:
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(cores)))

    assert Runtime.resolve(RuntimeParams(device="cpu", num_workers="auto")).num_workers == workers
    assert Runtime.resolve(RuntimeParams(device="cpu", num_workers=3)).num_workers == 3


def test_tf32_is_set_for_fp32_on_cuda_only_and_can_be_refused(monkeypatch) -> None:
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision  # a backend flag, which monkeypatch cannot put back
    matmul.fp32_precision = "none"
    try:
        Runtime.resolve(RuntimeParams(device="cpu", precision="fp32"))
        assert matmul.fp32_precision == "none"
        _gpu(monkeypatch, native_bf16=True)
        Runtime.resolve(RuntimeParams(device="auto", precision="bf16"))
        Runtime.resolve(RuntimeParams(device="auto", precision="fp32", tf32=False))
        assert matmul.fp32_precision == "none"
        Runtime.resolve(RuntimeParams(device="auto", precision="fp32"))
        assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = before


def test_the_student_trains_and_predicts_in_channels_last_and_comes_back_contiguous(tmp_path) -> None:
    import pandas as pd
    import torch.nn.functional as F
    from PIL import Image

    from clip_dfkd.models.student import StudentClassifier, create_student
    from clip_dfkd.params import AugmentationParams, OodEvaluationParams, StudentParams, TrainingParams
    from clip_dfkd.pipelines.ood_evaluation.scoring import predict_student
    from clip_dfkd.student_training import FreshViews, ViewedImages, fit_student
    from clip_dfkd.views import ViewRenderer

    torch.manual_seed(0)
    student = create_student(StudentParams(model_name="test_resnet", image_size=32), ["ball", "box"], None)
    paths = []
    for n in range(4):
        Image.new("RGB", (32, 32), (60 * n, 0, 0)).save(tmp_path / f"{n}.png")
        paths.append(str(tmp_path / f"{n}.png"))
    views = FreshViews(AugmentationParams(), [torch.tensor([0, 1, 0, 1])])
    images = ViewedImages(paths, ViewRenderer.for_student(student.config["data_config"]), views)
    training_layouts = _first_conv_layouts(student)
    runtime = Runtime.resolve(RuntimeParams(device="cpu", channels_last=True))

    def step_loss(logits, embedding, targets):
        return {"total": F.cross_entropy(logits, targets[0])}, {}

    fit_student(student, images, step_loss, TrainingParams(epochs=1, batch_size=2), runtime, "test")
    assert all(weight.is_contiguous() for weight in student.parameters())  # the usual layout, to save and export
    student.save_pretrained(tmp_path / "student")
    loaded = StudentClassifier.from_pretrained(tmp_path / "student")
    scoring_layouts = _first_conv_layouts(loaded)
    predictions = predict_student(
        pd.DataFrame({"path": paths, "benchmark": "toy", "domain": "photo", "label": [0, 1, 0, 1]}),
        loaded,
        OodEvaluationParams.model_validate({"benchmarks": {"toy": {"root": str(tmp_path)}}, "batch_size": 2}),
        RuntimeParams(device="cpu", channels_last=True),
    )

    assert len(predictions) == 4
    assert training_layouts == scoring_layouts == [True, True]


def _first_conv_layouts(student: torch.nn.Module) -> list[bool]:
    """Filled, per forward pass, with whether the first convolution's input and weight were
    channels-last."""
    layouts: list[bool] = []
    first_conv = next(module for module in student.modules() if isinstance(module, torch.nn.Conv2d))
    first_conv.register_forward_pre_hook(
        lambda module, inputs: layouts.append(
            inputs[0].is_contiguous(memory_format=torch.channels_last)
            and module.weight.is_contiguous(memory_format=torch.channels_last)
        )
    )
    return layouts


def test_the_device_choice_is_logged_once_per_process_not_once_per_node(caplog) -> None:
    runtime._announce.cache_clear()
    with caplog.at_level(logging.INFO, logger="clip_dfkd.runtime"):
        for _ in range(3):
            Runtime.resolve(RuntimeParams(device="cpu", precision="fp32"))
        Runtime.resolve(RuntimeParams(device="cpu", precision="bf16"))
    assert [r.getMessage() for r in caplog.records] == [
        "Running models on cpu in float32",
        "Running models on cpu in bfloat16",
    ]
