"""The stage benchmark (``benchmarks/stages.py``, ``benchmarks/stage_benchmark.py``): every stage
measured on both sides, the report's keys, and the pieces of gpu-full that run without a GPU."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import stage_benchmark as sb
import torch

from clip_dfkd.params import RuntimeParams

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """cpu-tiny at 8 images per stage, on one thread (the machine's cores are shared), one
    run per side: the code path, not the figures."""
    folder = tmp_path_factory.mktemp("stage-benchmark")
    output = folder / "report.json"
    report = sb.run(
        "cpu-tiny", device="cpu", images=8, min_seconds=0, threads=1, output=output, workdir=folder / "work", echo=None
    )
    return report, output


def test_every_stage_is_measured_on_both_sides(tiny_report) -> None:
    report, _ = tiny_report

    assert [row["stage"] for row in report["stages"]] == list(sb.STAGES)
    for row in report["stages"]:
        assert set(row) == set(sb.ROW_KEYS)
        # Both sides timed the images asked for, and each figure follows from the timings.
        passes = sb.PRESETS["cpu-tiny"].training_epochs if row["stage"] == "student_training" else 1
        assert row["images"] == 8 * passes and 0 < row["batch_size"] <= 8, row["label"]
        for side in ("project", "bare"):
            assert row[f"{side}_seconds"] > 0, row["label"]
            assert row[f"{side}_img_s"] == pytest.approx(row["images"] / row[f"{side}_seconds"]), row["label"]
            assert 0 <= row[f"{side}_peak_over_start_mib"] < row[f"{side}_peak_mib"], row["label"]
        assert row["ratio"] == pytest.approx(row["project_img_s"] / row["bare_img_s"]), row["label"]
    assert report["below_target"] == [row["label"] for row in report["stages"] if row["ratio"] < sb.TARGET_RATIO]


def test_the_report_is_written_with_the_documented_keys(tiny_report) -> None:
    report, output = tiny_report

    written = json.loads(output.read_text())

    assert tuple(written) == sb.REPORT_KEYS
    assert set(written["machine"]) == set(sb.MACHINE_KEYS)
    assert written["machine"]["cores"] == os.cpu_count() and written["machine"]["torch"] == torch.__version__
    assert (written["preset"], written["device"], written["dtype"]) == ("cpu-tiny", "cpu", "float32")
    # images=8 cut cpu-tiny down, and the report says how.
    assert written["reduced"] and any(line.startswith("synthesis_images:") for line in written["reductions"])
    assert written["settings"]["synthesis_images"] == 8
    assert [row["stage"] for row in written["stages"]] == list(sb.STAGES)


def test_short_work_is_timed_over_more_runs_and_long_work_over_the_repeats() -> None:
    """The fastest of 3 sub-second runs still catches a shared machine's hiccups."""
    clock = {"now": 0.0}

    def taking(seconds: float):
        def work() -> None:
            clock["now"] += seconds

        return work

    memory = sb._NoMemory()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sb.time, "perf_counter", lambda: clock["now"])
        short = sb.compare(taking(0.5), taking(0.4), 10, torch.device("cpu"), memory, repeats=2, min_seconds=1.8)
        capped = sb.compare(taking(0.01), taking(0.01), 10, torch.device("cpu"), memory, repeats=2, min_seconds=9)
        long = sb.compare(taking(2.0), taking(2.0), 10, torch.device("cpu"), memory, repeats=2, min_seconds=3)

    assert (short[0].runs, short[1].runs) == (5, 5)  # until the faster side too has 1.8 s: 5 × 0.4
    assert short[0].images_per_second == pytest.approx(20) and short[1].images_per_second == pytest.approx(25)
    assert capped[0].runs == 10  # at most 5 × repeats
    assert long[0].runs == 2


def test_what_distillation_buys_and_the_unet_flops_are_reported(tiny_report) -> None:
    report, _ = tiny_report
    gain = report["distillation"]

    assert gain["student"]["model"] == "resnet10t(channels=[12, 24, 48, 96], stem_width=12)"
    assert gain["student"]["parameters"] > 0
    assert [teacher["model"] for teacher in gain["teachers"]] == ["clip-dfkd-tiny"]
    for timing in (gain["student"], *gain["teachers"]):
        assert timing["latency_ms"] > 0 and timing["throughput_img_s"] > 0
    assert gain["teachers"][0]["latency_speedup"] > 0
    assert set(gain["onnx"]) >= {"available"}
    mfu = report["mfu"]
    assert mfu["unet_gflops_per_image_forward"] > 0
    # No peak for a CPU: MFU n/a, but the achieved FLOP/s are there.
    assert mfu["peak_tflops"] is None
    for side in ("project", "bare", "unet_only"):
        assert mfu[side]["mfu"] is None and mfu[side]["tflops_per_s"] > 0
    text = sb.format_report(report)
    assert "ratio" in text and "UNet:" in text and "speed-up" in text


def test_sd15_unet_forward_flops_are_counted_without_running_it() -> None:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        config = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).config

    flops = sb.unet_forward_flops(dict(config), latent_size=64, text_tokens=77)

    # Stable Diffusion 1.5's UNet: about 0.8 TFLOPs (0.4 TMACs) per 512 px image and step.
    assert 0.7e12 < flops < 0.9e12


@pytest.mark.parametrize(
    ("name", "dtype", "expected"),
    [
        ("NVIDIA H200", torch.bfloat16, 989.0),
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.0),
        ("NVIDIA H100 PCIe", torch.float16, 756.0),
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312.0),
        ("NVIDIA L40S", torch.bfloat16, 362.0),
        ("NVIDIA L4", torch.bfloat16, 121.0),
        ("NVIDIA A10G", torch.float16, 70.0),
        ("Tesla T4", torch.float16, 65.0),
        ("Tesla T4", torch.bfloat16, None),
        ("Some Future GPU", torch.bfloat16, None),
    ],
)
def test_peak_tflops_by_gpu_name(monkeypatch, name, dtype, expected) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)

    assert sb.peak_tflops(torch.device("cuda"), dtype) == (expected, name)


def test_reduced_gpu_full_keeps_the_architectures_and_says_what_it_cut() -> None:
    full = sb.PRESETS["gpu-full"]

    smaller, changes = sb.reduced(full)

    assert (smaller.generator, smaller.teachers, smaller.student) == ("sd15", ("ViT-B-32", "ViT-L-14"), "resnet18")
    assert smaller.synthesis_size < full.synthesis_size and smaller.synthesis_images < full.synthesis_images
    assert "synthesis_size: 512 -> 64" in changes
    assert sb.reduced(sb.PRESETS["cpu-tiny"]) == (sb.PRESETS["cpu-tiny"], [])


def test_the_cli_resolves_the_device_into_the_default_output(monkeypatch) -> None:
    # The script sets TQDM_DISABLE and HF_HUB_OFFLINE for its own process; not for later tests.
    monkeypatch.setattr(os, "environ", os.environ.copy())
    spec = importlib.util.spec_from_file_location("stages_cli", REPO_ROOT / "benchmarks" / "stages.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    calls = []
    monkeypatch.setattr(cli, "run", lambda **kwargs: calls.append(kwargs))

    cli.main(["--preset", "gpu-full", "--device", "cpu", "--images", "2", "--stages", "evaluation"])

    (call,) = calls
    assert call["output"] == REPO_ROOT / "benchmarks" / "results" / "gpu-full-cpu.json"
    assert (call["preset"], call["device"], call["reduce_size"], call["images"]) == ("gpu-full", "cpu", None, 2)
    assert call["stages"] == ["evaluation"]


# gpu-full's diffusion stage on a CPU, reduced to one 64 px image: the SD-1.5-sized pipeline
# is built, run on both sides and its UNet's FLOPs counted. (Its teachers and student are
# built by the same code as cpu-tiny's, by name; the whole preset takes about 75 s here.)
def test_gpu_full_diffusion_runs_reduced_on_the_cpu(tmp_path: Path) -> None:
    preset, reductions = sb.reduced(sb.PRESETS["gpu-full"])
    bench = sb.Bench(preset.capped(1), RuntimeParams(device="cpu"), tmp_path)

    bench.synthesis_diffusion()

    (row,) = bench.rows
    assert "synthesis_size: 512 -> 64" in reductions
    assert row["project_img_s"] > 0 and row["bare_img_s"] > 0
    assert bench.mfu["unet_gflops_per_image_forward"] > 10  # 8x8 latents of the full-size UNet


def test_cpu_tiny_measures_the_demos_own_student() -> None:
    """cpu-tiny stands for the demo: a student narrowed in conf/demo must be the one timed
    against the demo's teacher, or the speed-up it reports is another model's."""
    import yaml

    from clip_dfkd.params import StudentParams

    demo = yaml.safe_load((REPO_ROOT / "conf" / "demo" / "parameters.yml").read_text())
    assert sb.PRESETS["cpu-tiny"].student_params() == StudentParams(**demo["student_distillation"]["student"])
