"""Each stage through the project's code against a bare loop of the library doing the same
work, in one process: throughput (images/s), peak memory and the ratio project/bare.

Stages (project side → bare side; same model object or architecture, batch size, dtype,
device and number of images on both):

- ``synthesis/diffusion``: the image_synthesis node ``synthesize_images`` and its lazy
  images, as Kedro calls them (``DiffusionRenderer``: prompt encoding with the pseudo-word
  splice, the pipeline call, PIL images with their records) → per batch
  ``pipe.encode_prompt`` and ``pipe(prompt_embeds=...)`` on the same pipeline object, rows,
  seeds, steps and size. cpu-tiny loads the demo's tiny pipeline from disk through
  ``load_text_to_image``; gpu-full hands the renderer an SD-1.5-sized pipeline built in
  memory (:func:`sd15_pipeline`) in its place.
- ``synthesis/inversion``: the same node with the inversion backend (``InversionRenderer``)
  → a plain Adam loop over the same Fourier parameterisation, cut-outs and noise drawn on
  the device, ``model.encode_image`` on the same cut-out count, iterations and size.
- ``teacher_labeling``: :meth:`ClipTeacher.classify_images` over the synthetic PNGs, listed
  and loaded through the catalog's ``synthetic_images`` dataset as the pipeline gets them
  (:meth:`Bench.catalog_loaders`: the listing and each image's read, both timed), uint8
  batches normalised once per batch → ``Image.open`` + the same open_clip preprocessing per
  image + ``model.encode_image`` per batch.
- ``student_training``: :func:`~clip_dfkd.student_training.fit_student` with the
  distillation loss → a timm train-step loop with the same model, batch, fused AdamW,
  one-cycle schedule, loss, augmentation and image size; the row also carries the bare loop
  on images transformed once beforehand (``bare_step_only_img_s``), the compute ceiling.
- ``evaluation``: :func:`~clip_dfkd.pipelines.ood_evaluation.scoring.predict_student` over
  benchmark PNGs (normalised once per batch, as above) → ``Image.open`` + the student's eval
  transform per image + forward per batch.

Then what distillation buys (parameters, batch-1 latency and batch-N throughput of the
student against each teacher's image tower, and the student under onnxruntime when
``clip_dfkd.onnx_export`` exists) and, for the diffusion stage, the UNet's model FLOPs
utilisation: the FLOPs of one UNet forward (``torch.utils.flop_counter.FlopCounterMode`` on a
meta-device copy) times UNet calls per second, over the device's peak (:data:`PEAK_TFLOPS`).

Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA and the process's peak resident
set size on the CPU (``VmHWM``, reset through ``/proc/self/clear_refs``; psutil has no peak
on Linux, ``ru_maxrss`` cannot be reset), reset before each measurement; both are of the
whole process (models already loaded included), so each row also has the peak above the
level at the start of its timing.

Every side is warmed up once (a batch) before it is timed; CUDA is synchronised around each
timing. The teachers and the generator have random weights, which throughput does not
depend on: nothing is downloaded.

The JSON written by :func:`run` has the keys :data:`REPORT_KEYS`: ``machine`` has
:data:`MACHINE_KEYS` (``name`` is the GPU's name, or the CPU model on a CPU), each of
``stages`` has :data:`ROW_KEYS`, ``distillation`` has ``student``, ``teachers`` (one each)
and ``onnx``; ``mfu`` is empty when the diffusion stage did not run, and its ``mfu`` values
are null where the device's peak is unknown (every CPU). NaN is written as null.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clip_dfkd.params import RuntimeParams
from clip_dfkd.runtime import Runtime

logger = logging.getLogger(__name__)

TARGET_RATIO = 0.9
# Timed seconds each side of a stage runs at least, in as many runs as that takes (see compare).
MIN_SECONDS = 3.0
CLASSES = ("ball", "box", "tent", "kite")
STYLES = ("photo", "sketch", "cartoon")
TEMPLATES = ("a photo of a {class_name}.", "a sketch of a {class_name}.")
STAGES = ("synthesis/diffusion", "synthesis/inversion", "teacher_labeling", "student_training", "evaluation")
REPORT_KEYS = (
    "preset",
    "reduced",
    "reductions",
    "device",
    "dtype",
    "machine",
    "settings",
    "memory_measure",
    "repeats",
    "min_seconds",
    "target_ratio",
    "stages",
    "below_target",
    "distillation",
    "mfu",
    "stage_seconds",
    "seconds",
)
MACHINE_KEYS = ("name", "cpu_model", "cores", "torch_threads", "gpu", "torch", "cuda", "python", "libraries", "date")
ROW_KEYS = (
    "stage",
    "model",
    "label",
    "images",
    "batch_size",
    "project_img_s",
    "bare_img_s",
    "ratio",
    "project_peak_mib",
    "bare_peak_mib",
    "project_peak_over_start_mib",
    "bare_peak_over_start_mib",
    "project_seconds",
    "bare_seconds",
    "runs",
    "details",
)

# Dense peak TFLOP/s per precision (fp32: without TF32 tensor cores), from the vendors' data
# sheets; the first pattern found in torch.cuda.get_device_name() wins, so longer names first.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}),
    ("A10G", {"bf16": 70.0, "fp16": 70.0, "fp32": 31.2}),
    ("A10", {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
    ("T4", {"fp16": 65.0, "fp32": 8.1}),
]


@dataclasses.dataclass(frozen=True)
class Preset:
    """The models and the amount of work of every stage."""

    name: str
    generator: str  # "tiny": the demo's tiny Stable Diffusion; "sd15": SD-1.5-sized, random init
    teachers: tuple[str, ...]  # open_clip names; the first also drives the inversion
    student: str  # timm name
    synthesis_size: int  # generator output, height = width; also the synthetic PNGs' size
    synthesis_steps: int
    synthesis_batch: int
    synthesis_images: int
    inversion_size: int
    inversion_cutouts: int
    inversion_iterations: int
    inversion_batch: int
    inversion_images: int
    inversion_tv_weight: float
    labeling_batch: int
    labeling_images: int
    student_size: int
    training_batch: int
    training_images: int
    training_epochs: int
    evaluation_size: int
    evaluation_batch: int
    evaluation_images: int
    latency_repeats: int
    throughput_batch: int
    student_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)  # timm create_model kwargs

    def student_params(self):
        """The student as the pipeline's parameters describe it."""
        from clip_dfkd.params import StudentParams

        return StudentParams(model_name=self.student, model_kwargs=self.student_kwargs, image_size=self.student_size)

    def capped(self, images: int) -> Preset:
        """The same preset with at most ``images`` images, batch size and timed latency
        repeats in every stage."""
        capped = {
            field.name: min(getattr(self, field.name), images)
            for field in dataclasses.fields(self)
            if field.name.endswith(("_images", "_batch", "_repeats"))
        }
        return dataclasses.replace(self, **capped)


PRESETS: dict[str, Preset] = {
    # The demo's models (conf/demo/parameters.yml): tiny open_clip teacher, tiny random Stable
    # Diffusion, a narrowed resnet10t at 32 px.
    "cpu-tiny": Preset(
        name="cpu-tiny",
        generator="tiny",
        teachers=("clip-dfkd-tiny",),
        student="resnet10t",
        student_kwargs={"channels": [12, 24, 48, 96], "stem_width": 12},
        synthesis_size=32,
        synthesis_steps=4,
        synthesis_batch=24,
        synthesis_images=48,
        inversion_size=32,
        inversion_cutouts=8,
        inversion_iterations=50,
        inversion_batch=16,
        inversion_images=16,
        inversion_tv_weight=1.0,
        labeling_batch=32,
        # Labelling and scoring run at ~2000 img/s here: 1024 images make each timing about
        # half a second, long enough for 2 shared cores to give a steady ratio.
        labeling_images=1024,
        student_size=32,
        training_batch=32,
        training_images=256,
        training_epochs=2,
        evaluation_size=32,
        evaluation_batch=32,
        evaluation_images=1024,
        latency_repeats=30,
        throughput_batch=32,
    ),
    # Full-size architectures with random weights, at conf/base's image and batch sizes: an
    # SD-1.5-sized UNet, VAE and CLIP text encoder at 512 px, open_clip ViT-B/32 and ViT-L/14
    # at 224 px, resnet18 at 224 px. The inversion runs 25 of conf/base's 400 iterations (its
    # images/s scale with 1/iterations).
    "gpu-full": Preset(
        name="gpu-full",
        generator="sd15",
        teachers=("ViT-B-32", "ViT-L-14"),
        student="resnet18",
        synthesis_size=512,
        synthesis_steps=4,
        synthesis_batch=16,
        synthesis_images=64,
        inversion_size=224,
        inversion_cutouts=32,
        inversion_iterations=25,
        inversion_batch=16,
        inversion_images=16,
        inversion_tv_weight=0.0,
        labeling_batch=256,
        labeling_images=512,
        student_size=224,
        training_batch=128,
        training_images=512,
        training_epochs=2,
        evaluation_size=224,
        evaluation_batch=256,
        evaluation_images=512,
        latency_repeats=50,
        throughput_batch=32,
    ),
}

# gpu-full on a CPU: the same architectures, far less work (the teachers keep their 224 px
# input, which their position embeddings fix).
REDUCED_GPU_FULL = dict(
    synthesis_size=64,
    synthesis_steps=1,
    synthesis_batch=1,
    synthesis_images=2,
    inversion_size=64,
    inversion_cutouts=2,
    inversion_iterations=2,
    inversion_batch=1,
    inversion_images=1,
    labeling_batch=2,
    labeling_images=2,
    student_size=64,
    training_batch=2,
    training_images=4,
    training_epochs=1,
    evaluation_size=64,
    evaluation_batch=2,
    evaluation_images=4,
    latency_repeats=3,
    throughput_batch=4,
)


def reduced(preset: Preset) -> tuple[Preset, list[str]]:
    """``preset`` cut down for a CPU (gpu-full's architectures, less work) and what changed."""
    changes = REDUCED_GPU_FULL if preset.name == "gpu-full" else {}
    smaller = dataclasses.replace(preset, **changes)
    return smaller, _differences(preset, smaller)


def _differences(before: Preset, after: Preset) -> list[str]:
    return [
        f"{field.name}: {getattr(before, field.name)} -> {getattr(after, field.name)}"
        for field in dataclasses.fields(before)
        if getattr(before, field.name) != getattr(after, field.name)
    ]


# --- measuring --------------------------------------------------------------------------------


class PeakMemory:
    """Peak memory since the last :meth:`reset`: CUDA allocations on a GPU, the process's
    resident set on the CPU; :attr:`baseline_mib` is the usage at the reset."""

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline_mib = float("nan")
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated"
        elif _can_reset_rss_peak():
            self.method = "peak RSS (VmHWM, reset through /proc/self/clear_refs)"
        else:
            self.method = "peak RSS since the process started (ru_maxrss; cannot be reset here)"

    def reset(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_mib = torch.cuda.memory_allocated(self.device) / 2**20
            return
        if "clear_refs" in self.method:
            Path("/proc/self/clear_refs").write_text("5")
        self.baseline_mib = _status_mib("VmRSS")

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if "VmHWM" in self.method:
            # The kernel updates the high-water mark lazily, so right after a reset it can read a
            # few pages below the resident set measured as the baseline: the peak is at least that.
            return max(_status_mib("VmHWM"), self.baseline_mib)
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mib(key: str) -> float:
    """A ``kB`` line of ``/proc/self/status`` in MiB; NaN where there is none."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _can_reset_rss_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return "VmHWM:" in Path("/proc/self/status").read_text()
    except OSError:
        return False


@dataclasses.dataclass
class Measurement:
    seconds: float
    images: int
    peak_mib: float
    baseline_mib: float = float("nan")  # memory in use when the measurement started
    runs: int = 1  # timed runs it is the fastest of

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(work: Callable[[], Any], images: int, device: torch.device, memory: PeakMemory) -> Measurement:
    """Wall time of ``work()`` (CUDA synchronised on both sides) and the peak memory during it."""
    memory.reset()
    _synchronize(device)
    started = time.perf_counter()
    work()
    _synchronize(device)
    seconds = time.perf_counter() - started
    return Measurement(seconds, images, memory.peak_mib(), memory.baseline_mib)


def compare(
    project: Callable[[], Any],
    bare: Callable[[], Any],
    images: int,
    device: torch.device,
    memory: PeakMemory,
    repeats: int = 1,
    min_seconds: float = 0.0,
) -> tuple[Measurement, Measurement]:
    """Both sides (already warmed up) ``repeats`` times, alternating, and more (up to
    ``5 × repeats``) until each side has run ``min_seconds`` in all; the fastest run of each,
    with the highest peak memory seen.

    The fastest of a few sub-second runs still catches the machine's hiccups (on a shared
    2-core machine, ±15% between identical runs): short work gets more tries, as ``timeit``
    gives it, while long work keeps to ``repeats``."""
    runs: dict[str, list[Measurement]] = {"project": [], "bare": []}

    def more_needed() -> bool:
        done = len(runs["project"])
        too_short = min(sum(m.seconds for m in measured) for measured in runs.values()) < min_seconds
        return done < repeats or (too_short and done < 5 * repeats)

    while more_needed():
        runs["project"].append(measure(project, images, device, memory))
        runs["bare"].append(measure(bare, images, device, memory))
    best = {}
    for side, measured in runs.items():
        fastest = min(measured, key=lambda m: m.seconds)
        highest = max(measured, key=lambda m: m.peak_mib)
        best[side] = Measurement(fastest.seconds, images, highest.peak_mib, highest.baseline_mib, len(measured))
    return best["project"], best["bare"]


def _row(
    stage: str,
    model: str,
    label: str,
    batch_size: int,
    project: Measurement,
    bare: Measurement,
    details: dict | None = None,
) -> dict[str, Any]:
    ratio = project.images_per_second / bare.images_per_second
    return {
        "stage": stage,
        "model": model,
        "label": label,
        "images": project.images,
        "batch_size": batch_size,
        "project_img_s": project.images_per_second,
        "bare_img_s": bare.images_per_second,
        "ratio": ratio,
        "project_peak_mib": project.peak_mib,
        "bare_peak_mib": bare.peak_mib,
        "project_peak_over_start_mib": project.peak_mib - project.baseline_mib,
        "bare_peak_over_start_mib": bare.peak_mib - bare.baseline_mib,
        "project_seconds": project.seconds,
        "bare_seconds": bare.seconds,
        "runs": project.runs,
        "details": details or {},
    }


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --- inputs -------------------------------------------------------------------------------------


def write_images(folder: Path, count: int, size: int, seed: int) -> list[Path]:
    """``count`` smooth random RGB PNGs of ``size`` px (upsampled 8×8 noise: they compress
    and decode like rendered images rather than like noise)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for n in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        path = folder / f"{n:05d}.png"
        # Fast zlib level: the writing is not measured, and decoding costs the same.
        coarse.resize((size, size), Image.BILINEAR).save(path, compress_level=1)
        paths.append(path)
    return paths


def _synthesis_node(count: int, params, bench: Bench, keeping: Keeping):
    """The image_synthesis stage's node ``synthesize_images`` on ``count`` vanilla prompts
    (made by prompt_generation's ``generate_prompts``): lazy images by ``image_id``, as Kedro
    gets them, and the plan, sorted as they are rendered."""
    from clip_dfkd.params import ClassNames, PromptGenerationParams
    from clip_dfkd.pipelines.image_synthesis.nodes import synthesize_images
    from clip_dfkd.pipelines.prompt_generation.nodes import generate_prompts
    from clip_dfkd.styles import StyleBank

    per_cell = math.ceil(count / (len(CLASSES) * len(STYLES)))
    bank = StyleBank("vanilla", "none", torch.zeros(0, 1))
    prompt_params = PromptGenerationParams(method="vanilla", styles=list(STYLES), images_per_class_and_style=per_cell)
    prompts = generate_prompts(ClassNames(list(CLASSES)), prompt_params, bank).head(count)
    teacher_params = bench.models.teacher_params(bench.preset.teachers[0])
    images, plan, _ = synthesize_images(
        prompts, bank, params, teacher_params, bench.runtime_params, loaders=keeping.loaders()
    )
    return images, plan


class Keeping:
    """Model loaders that keep what they load (the bare side runs on the same object), or hand
    over a model built here instead of loading one (``model``: full-size models with random
    weights have no files to load from)."""

    def __init__(self, model=None):
        self.model = model

    def loaders(self):
        from clip_dfkd.models import PROJECT_LOADERS, ModelLoaders

        def keep(load):
            def load_or_hand_over(params, runtime):
                if self.model is None:
                    self.model = load(params, runtime)
                return self.model

            return load_or_hand_over

        return ModelLoaders(teacher=keep(PROJECT_LOADERS.teacher), text_to_image=keep(PROJECT_LOADERS.text_to_image))


# --- models -------------------------------------------------------------------------------------


class Models:
    """The preset's teachers, built once and shared by the stages that need them."""

    def __init__(self, preset: Preset, runtime: Runtime, workdir: Path):
        self.preset = preset
        self.runtime = runtime
        self.workdir = workdir
        self._teachers: dict[str, Any] = {}

    def teacher_params(self, name: str):
        from clip_dfkd.params import TeacherParams

        pretrained = str(self.workdir / "tiny-clip.safetensors") if name == "clip-dfkd-tiny" else f"random/{name}"
        return TeacherParams(
            model_name=name, pretrained=pretrained, templates=list(TEMPLATES), batch_size=self.preset.labeling_batch
        )

    def teacher(self, name: str):
        """A :class:`ClipTeacher`: the demo's tiny one through ``load_teacher`` (from a seeded
        random checkpoint), a full-size one built by open_clip without weights."""
        if name not in self._teachers:
            self._teachers[name] = self._build_teacher(name)
        return self._teachers[name]

    def _build_teacher(self, name: str):
        import open_clip

        from clip_dfkd.demo.tiny_models import build_tiny_clip
        from clip_dfkd.models import ClipTeacher, load_teacher
        from clip_dfkd.models.model_configs import building_without_weights

        params = self.teacher_params(name)
        if name == "clip-dfkd-tiny":
            build_tiny_clip(Path(params.pretrained))
            return load_teacher(params, self.runtime)
        # load_teacher takes a tag or a checkpoint file; random full-size weights have neither,
        # so the teacher is assembled as load_teacher does.
        with building_without_weights():
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=None, device=self.runtime.device
            )
        model.eval().requires_grad_(False)
        return ClipTeacher(
            model=model,
            preprocess=preprocess,
            tokenizer=open_clip.get_tokenizer(name),
            runtime=self.runtime,
            name=f"{name}/random",
        )

    def release(self) -> None:
        self._teachers.clear()
        gc.collect()
        if self.runtime.device.type == "cuda":
            torch.cuda.empty_cache()


def _embedding_dim(name: str) -> int:
    import open_clip

    from clip_dfkd.models.model_configs import register_project_model_configs

    register_project_model_configs()
    return int(open_clip.get_model_config(name)["embed_dim"])


def sd15_pipeline(runtime: Runtime, workdir: Path, scheduler: str):
    """A Stable Diffusion 1.5-sized pipeline (UNet 860M, VAE 84M, CLIP ViT-L/14 text encoder
    123M) with random weights, in ``runtime``'s dtype on its device, set up as
    :func:`~clip_dfkd.models.generator.load_text_to_image` sets up a loaded one."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTokenizer

    from clip_dfkd.demo.tiny_models import build_clip_tokenizer, sd1_pipeline, sd1_text_encoder

    tokenizer = CLIPTokenizer.from_pretrained(build_clip_tokenizer(workdir / "sd15-tokenizer"))
    with torch.device(runtime.device):
        # UNet2DConditionModel's defaults are SD 1.x's block layout (320/640/1280/1280, two
        # layers per block, cross-attention in the first three down and last three up blocks).
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(
            sample_size=512,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            scaling_factor=0.18215,
        )
        text_encoder = sd1_text_encoder(
            tokenizer,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            hidden_act="quick_gelu",
        )
    pipeline = sd1_pipeline(unet, vae, text_encoder, tokenizer)
    for component in (unet, vae, text_encoder):
        # torch's own .to: diffusers' warns about casting on every model, even to fp32.
        torch.nn.Module.to(component, device=runtime.device, dtype=runtime.dtype)
    pipeline.scheduler = getattr(diffusers, scheduler).from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    if runtime.compile:
        pipeline.unet = torch.compile(pipeline.unet)
    return pipeline


# --- stages -------------------------------------------------------------------------------------


class Bench:
    """One run: the resolved runtime, the models, the input images and the results."""

    def __init__(
        self,
        preset: Preset,
        runtime_params: RuntimeParams,
        workdir: Path,
        repeats: int = 1,
        min_seconds: float = 0.0,
    ):
        self.preset = preset
        self.runtime_params = runtime_params
        self.runtime = Runtime.resolve(runtime_params)
        self.device = self.runtime.device
        self.workdir = workdir
        self.repeats = repeats
        self.min_seconds = min_seconds
        self.memory = PeakMemory(self.device)
        self.models = Models(preset, self.runtime, workdir)
        self.rows: list[dict[str, Any]] = []
        self.mfu: dict[str, Any] = {}
        self._synthetic: list[Path] | None = None
        self._benchmark: list[Path] | None = None

    @property
    def synthetic_paths(self) -> list[Path]:
        if self._synthetic is None:
            count = max(self.preset.labeling_images, self.preset.training_images)
            self._synthetic = write_images(self.workdir / "synthetic", count, self.preset.synthesis_size, seed=1)
        return self._synthetic

    @property
    def benchmark_paths(self) -> list[Path]:
        if self._benchmark is None:
            self._benchmark = write_images(
                self.workdir / "benchmark" / "photo", self.preset.evaluation_images, self.preset.evaluation_size, seed=2
            )
        return self._benchmark

    def catalog_loaders(self, paths: list[Path]) -> list[Any]:
        """What the pipeline's nodes get for these synthetic PNGs: the lazy loaders of the
        catalog's ``synthetic_images`` dataset (listed here, so the listing is timed too)."""
        from clip_dfkd.datasets import ResumablePartitionedDataset

        folder = self.workdir / "synthetic"
        loaders = ResumablePartitionedDataset(
            path=str(folder), dataset="pillow.ImageDataset", filename_suffix=".png"
        ).load()
        return [loaders[path.stem] for path in paths]

    def _compare(self, project, bare, images: int) -> tuple[Measurement, Measurement]:
        return compare(project, bare, images, self.device, self.memory, self.repeats, self.min_seconds)

    # --- synthesis: diffusion ---

    def synthesis_diffusion(self) -> None:
        from clip_dfkd.params import GeneratorParams, ImageSynthesisParams

        preset = self.preset
        generator_dir = self.workdir / "tiny-stable-diffusion"
        if preset.generator == "tiny":
            from clip_dfkd.demo.tiny_models import build_tiny_stable_diffusion

            build_tiny_stable_diffusion(generator_dir)
            preloaded = None
        else:
            preloaded = sd15_pipeline(self.runtime, self.workdir, "EulerDiscreteScheduler")
        generator = GeneratorParams(
            model_id=str(generator_dir),
            scheduler="EulerDiscreteScheduler",
            num_inference_steps=preset.synthesis_steps,
            guidance_scale=0.0,
            height=preset.synthesis_size,
            width=preset.synthesis_size,
        )
        params = ImageSynthesisParams(backend="diffusion", generator=generator, batch_size=preset.synthesis_batch)
        batch = preset.synthesis_batch
        keeping = Keeping(preloaded)
        images, plan = _synthesis_node(batch + preset.synthesis_images, params, self, keeping)
        ids = list(plan["image_id"])
        warm_ids, timed_ids = ids[:batch], ids[batch:]

        def project(image_ids=timed_ids):
            return [images[image_id]() for image_id in image_ids]

        project(warm_ids)  # loads the pipeline and warms it up
        pipe = keeping.model
        rows = plan.set_index("image_id")

        def bare(image_ids=timed_ids):
            rendered = []
            for chunk in _chunks(image_ids, batch):
                chunk_rows = rows.loc[list(chunk)]
                with torch.no_grad():
                    embeds, _ = pipe.encode_prompt(
                        prompt=list(chunk_rows["prompt"]),
                        device=pipe.device,
                        num_images_per_prompt=1,
                        do_classifier_free_guidance=False,
                    )
                rendered += pipe(
                    prompt_embeds=embeds,
                    num_inference_steps=generator.num_inference_steps,
                    guidance_scale=generator.guidance_scale,
                    height=generator.height,
                    width=generator.width,
                    generator=[torch.Generator("cpu").manual_seed(int(seed)) for seed in chunk_rows["seed"]],
                ).images
            return rendered

        bare(warm_ids)
        project_m, bare_m = self._compare(project, bare, len(timed_ids))
        unet_only = self._unet_only(pipe, batch, len(timed_ids))
        self.mfu = unet_utilisation(
            pipe,
            preset.synthesis_size,
            preset.synthesis_steps,
            batch,
            self.device,
            pipe.unet.dtype,
            {"project": project_m, "bare": bare_m, "unet_only": unet_only},
        )
        architecture = "tiny Stable Diffusion" if preset.generator == "tiny" else "SD-1.5-sized, random init"
        self.rows.append(
            _row(
                "synthesis/diffusion",
                architecture,
                f"synthesis: diffusion ({architecture}, {preset.synthesis_size} px, steps {preset.synthesis_steps})",
                batch,
                project_m,
                bare_m,
                {
                    "steps": preset.synthesis_steps,
                    "size": preset.synthesis_size,
                    "scheduler": "EulerDiscreteScheduler",
                    "unet_only_img_s": unet_only.images_per_second,
                },
            )
        )

    def _unet_only(self, pipe, batch: int, images: int) -> Measurement:
        """The UNet alone, called as often as the timed renders call it, at the same shapes;
        counted in images (``batch`` per call, divided by the steps)."""
        size = self.preset.synthesis_size // pipe.vae_scale_factor
        unet = pipe.unet
        latents = torch.randn(batch, unet.config.in_channels, size, size, device=self.device, dtype=unet.dtype)
        tokens = pipe.tokenizer.model_max_length
        text = torch.randn(batch, tokens, unet.config.cross_attention_dim, device=self.device, dtype=unet.dtype)
        timestep = torch.tensor(999, device=self.device)
        steps = self.preset.synthesis_steps
        calls = math.ceil(images / batch) * steps

        def run(calls: int = calls) -> None:
            with torch.inference_mode():
                for _ in range(calls):
                    unet(latents, timestep, encoder_hidden_states=text)

        run(1)
        runs = [measure(run, batch * calls // steps, self.device, self.memory) for _ in range(self.repeats)]
        return min(runs, key=lambda m: m.seconds)

    # --- synthesis: inversion ---

    def synthesis_inversion(self) -> None:
        from clip_dfkd.params import ImageSynthesisParams, InversionParams

        preset = self.preset
        name = preset.teachers[0]
        teacher = self.models.teacher(name)
        inversion = InversionParams(
            parameterization="fourier",
            image_size=preset.inversion_size,
            iterations=preset.inversion_iterations,
            cutouts=preset.inversion_cutouts,
            tv_weight=preset.inversion_tv_weight,
        )
        params = ImageSynthesisParams(backend="inversion", inversion=inversion, batch_size=preset.inversion_batch)
        batch = preset.inversion_batch
        images, plan = _synthesis_node(batch + preset.inversion_images, params, self, Keeping(teacher))
        ids = list(plan["image_id"])
        warm_ids, timed_ids = ids[:batch], ids[batch:]
        prompts = dict(zip(plan["image_id"], plan["prompt"], strict=True))

        def project(image_ids=timed_ids):
            return [images[image_id]() for image_id in image_ids]

        project(warm_ids)  # the renderer takes the teacher here

        def bare(image_ids=timed_ids):
            rendered = []
            for chunk in _chunks(image_ids, batch):
                chunk_prompts = [prompts[image_id] for image_id in chunk]
                rendered += bare_inversion(teacher.model, teacher.tokenizer, chunk_prompts, inversion, teacher.runtime)
            return rendered

        bare(warm_ids)
        project_m, bare_m = self._compare(project, bare, len(timed_ids))
        self.rows.append(
            _row(
                "synthesis/inversion",
                name,
                f"synthesis: inversion ({name}, {preset.inversion_size} px, {preset.inversion_cutouts} cut-outs, "
                f"{preset.inversion_iterations} it)",
                batch,
                project_m,
                bare_m,
                {
                    "size": preset.inversion_size,
                    "cutouts": preset.inversion_cutouts,
                    "iterations": preset.inversion_iterations,
                    "parameterization": "fourier",
                },
            )
        )

    # --- teacher labelling ---

    def teacher_labeling(self) -> None:
        preset = self.preset
        paths = self.synthetic_paths[: preset.labeling_images]
        batch = preset.labeling_batch
        for name in preset.teachers:
            teacher = self.models.teacher(name)
            weights = teacher.zero_shot_weights(list(CLASSES), list(TEMPLATES))
            model, preprocess, runtime = teacher.model, teacher.preprocess, teacher.runtime

            def project(paths=paths, teacher=teacher, weights=weights):
                return teacher.classify_images(self.catalog_loaders(paths), weights, batch, "Teacher labelling")

            def bare(paths=paths, model=model, preprocess=preprocess, runtime=runtime, weights=weights):
                scale = model.logit_scale.exp()
                logits, embeddings = [], []
                with torch.inference_mode():
                    for chunk in _chunks(paths, batch):
                        pixels = torch.stack([preprocess(Image.open(path).convert("RGB")) for path in chunk])
                        with torch.autocast(runtime.device.type, runtime.dtype, enabled=runtime.dtype != torch.float32):
                            features = model.encode_image(pixels.to(runtime.device))
                        features = F.normalize(features.float(), dim=-1)
                        logits.append((scale * features @ weights.T).cpu())
                        embeddings.append(features.cpu())
                return torch.cat(logits), torch.cat(embeddings)

            project(paths[:batch])
            bare(paths[:batch])
            project_m, bare_m = self._compare(project, bare, len(paths))
            self.rows.append(
                _row(
                    "teacher_labeling",
                    name,
                    f"teacher labelling ({name}, {preset.synthesis_size} px PNGs)",
                    batch,
                    project_m,
                    bare_m,
                    {"source_size": preset.synthesis_size},
                )
            )

    # --- student training ---

    def student_training(self) -> None:
        import timm

        from clip_dfkd.models import create_student
        from clip_dfkd.params import AugmentationParams, DistillationLossParams, TrainingParams
        from clip_dfkd.pipelines.student_distillation.nodes import distillation_loss
        from clip_dfkd.student_training import FreshViews, ViewedImages, fit_student
        from clip_dfkd.views import ViewRenderer

        preset = self.preset
        batch = preset.training_batch
        count = preset.training_images // batch * batch  # whole batches: fit_student drops the last
        paths = self.synthetic_paths[:count]
        # The first teacher's embedding size, which the student's projection head aligns with.
        embedding_dim = _embedding_dim(preset.teachers[0])
        generator = torch.Generator().manual_seed(0)
        teacher_logits = torch.randn(count, len(CLASSES), generator=generator) * 5
        teacher_embeddings = F.normalize(torch.randn(count, embedding_dim, generator=generator), dim=-1)
        loss_params = DistillationLossParams(temperature=4.0, kd_weight=1.0, embedding_weight=0.5)
        augmentation = AugmentationParams()
        student_params = preset.student_params()
        student = create_student(student_params, list(CLASSES), embedding_dim)
        renderer = ViewRenderer.for_student(student.config["data_config"])
        targets = [teacher_logits, teacher_embeddings]

        def step_loss(logits, embedding, batch_targets):
            losses = distillation_loss(logits, batch_targets[0], embedding, batch_targets[1], loss_params)
            agreement = (logits.argmax(-1) == batch_targets[0].argmax(-1)).float().mean()
            return losses, {"teacher_agreement": agreement}

        def training(epochs: int) -> TrainingParams:
            return TrainingParams(epochs=epochs, batch_size=batch, learning_rate=1e-3, weight_decay=0.05, seed=0)

        def project(epochs=preset.training_epochs, count=count):
            views = FreshViews(augmentation, [t[:count] for t in targets])
            images = ViewedImages(self.catalog_loaders(paths[:count]), renderer, views)
            return fit_student(student, images, step_loss, training(epochs), self.runtime, "Distilling student")

        # The bare side: timm, torch and the same transform, in a plain loop.
        torch.manual_seed(0)
        model = timm.create_model(preset.student, num_classes=len(CLASSES), **preset.student_kwargs).to(self.device)
        projection = torch.nn.Linear(model.num_features, embedding_dim).to(self.device)
        data_config = timm.data.resolve_model_data_config(
            model, args={"input_size": (3, preset.student_size, preset.student_size)}
        )
        bare_transform = timm.data.create_transform(
            **data_config,
            is_training=True,
            scale=augmentation.crop_scale,
            hflip=0.5,
            color_jitter=augmentation.color_jitter,
        )
        parameters = [*model.parameters(), *projection.parameters()]
        scaler = torch.amp.GradScaler(enabled=self.device.type == "cuda" and self.runtime.dtype == torch.float16)
        autocast = partial(
            torch.autocast, self.device.type, self.runtime.dtype, enabled=self.runtime.dtype != torch.float32
        )

        def bare_steps(
            batches: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]], epochs: int, count: int
        ) -> None:
            optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=0.05, fused=True)
            steps = epochs * (count // batch)
            schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.1)
            model.train()
            for _ in range(epochs):
                for pixels, index in batches():
                    pixels = pixels.to(self.device, non_blocking=True)
                    with autocast():
                        pooled = model.forward_head(model.forward_features(pixels), pre_logits=True)
                        logits = model.get_classifier()(pooled)
                        projected = projection(pooled)
                    soft = teacher_logits[index].to(self.device)
                    unit = teacher_embeddings[index].to(self.device)
                    kd = (
                        F.kl_div(
                            F.log_softmax(logits.float() / 4.0, dim=-1),
                            F.log_softmax(soft / 4.0, dim=-1),
                            reduction="batchmean",
                            log_target=True,
                        )
                        * 16.0
                    )
                    alignment = (1 - (F.normalize(projected.float(), dim=-1) * unit).sum(dim=-1)).mean()
                    loss = kd + 0.5 * alignment
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    schedule.step()

        def decoded_batches(count=count) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            order = torch.randperm(count)
            for index in _chunks(order, batch):
                pixels = torch.stack([bare_transform(Image.open(paths[i]).convert("RGB")) for i in index.tolist()])
                yield pixels, index

        def bare(epochs=preset.training_epochs, count=count):
            bare_steps(partial(decoded_batches, count), epochs, count)

        project(1, batch)
        bare(1, batch)
        project_m, bare_m = self._compare(project, bare, preset.training_epochs * count)
        # The compute ceiling: the same steps on images transformed once, outside the timing.
        transformed = torch.stack([bare_transform(Image.open(path).convert("RGB")) for path in paths])

        def ready_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            order = torch.randperm(count)
            for index in _chunks(order, batch):
                yield transformed[index], index

        step_only = min(
            (
                measure(
                    lambda: bare_steps(ready_batches, preset.training_epochs, count),
                    preset.training_epochs * count,
                    self.device,
                    self.memory,
                )
                for _ in range(self.repeats)
            ),
            key=lambda m: m.seconds,
        )
        self.rows.append(
            _row(
                "student_training",
                preset.student,
                f"student training ({preset.student}, {preset.student_size} px, {preset.training_epochs} epochs)",
                batch,
                project_m,
                bare_m,
                {
                    "epochs": preset.training_epochs,
                    "size": preset.student_size,
                    "bare_step_only_img_s": step_only.images_per_second,
                    "num_workers": self.runtime.num_workers,
                },
            )
        )

    # --- evaluation ---

    def evaluation(self) -> None:
        import pandas as pd
        import timm

        from clip_dfkd.models import create_student
        from clip_dfkd.params import BenchmarkParams, OodEvaluationParams
        from clip_dfkd.pipelines.ood_evaluation.scoring import predict_student

        preset = self.preset
        paths = self.benchmark_paths
        batch = preset.evaluation_batch
        student = create_student(preset.student_params(), list(CLASSES))
        params = OodEvaluationParams(
            benchmarks={"bench": BenchmarkParams(root=str(self.workdir / "benchmark"))}, batch_size=batch
        )
        index = pd.DataFrame({"benchmark": "bench", "domain": "photo", "path": [str(p) for p in paths], "label": 0})

        def project(index=index):
            return predict_student(index, student, params, self.runtime_params)

        project(index.head(batch))
        backbone = student.backbone  # the same timm model, already on the device
        transform = timm.data.create_transform(
            **timm.data.resolve_model_data_config(
                backbone, args={"input_size": (3, preset.student_size, preset.student_size)}
            ),
            is_training=False,
        )
        runtime = self.runtime

        def bare(paths=paths):
            predictions = []
            backbone.to(runtime.device).eval()
            with torch.inference_mode():
                for chunk in _chunks(paths, batch):
                    pixels = torch.stack([transform(Image.open(path).convert("RGB")) for path in chunk])
                    with torch.autocast(runtime.device.type, runtime.dtype, enabled=runtime.dtype != torch.float32):
                        logits = backbone(pixels.to(runtime.device, non_blocking=True))
                    predictions.append(logits.argmax(-1).cpu())
            return torch.cat(predictions)

        bare(paths[:batch])
        project_m, bare_m = self._compare(project, bare, len(paths))
        self.rows.append(
            _row(
                "evaluation",
                preset.student,
                f"evaluation: student scoring ({preset.student}, {preset.evaluation_size} px PNGs)",
                batch,
                project_m,
                bare_m,
                {"source_size": preset.evaluation_size},
            )
        )

    # --- what distillation buys ---

    def distillation_gain(self) -> dict[str, Any]:
        from clip_dfkd.models import create_student

        preset = self.preset
        student_params = preset.student_params()
        student = create_student(student_params, list(CLASSES))
        student.to(self.device).eval()
        size = preset.student_size
        student_timing = self._inference_timing(student, size)
        result: dict[str, Any] = {
            "student": {
                "model": student_params.architecture,
                "parameters": sum(p.numel() for p in student.backbone.parameters()),
                "input_size": size,
                **student_timing,
            },
            "teachers": [],
            "throughput_batch": preset.throughput_batch,
        }
        for name in preset.teachers:
            teacher = self.models.teacher(name)
            visual = teacher.model.visual
            teacher_size = visual.image_size[0] if isinstance(visual.image_size, tuple | list) else visual.image_size
            timing = self._inference_timing(teacher.model.encode_image, teacher_size)
            result["teachers"].append(
                {
                    "model": name,
                    "parameters": sum(p.numel() for p in visual.parameters()),
                    "input_size": teacher_size,
                    **timing,
                    "latency_speedup": timing["latency_ms"] / student_timing["latency_ms"],
                    "throughput_speedup": student_timing["throughput_img_s"] / timing["throughput_img_s"],
                    "parameter_ratio": sum(p.numel() for p in visual.parameters()) / result["student"]["parameters"],
                }
            )
        result["onnx"] = _onnx_student_timing(
            student.cpu(), self.workdir, size, preset.latency_repeats, preset.throughput_batch
        )
        return result

    def _inference_timing(self, forward: Callable[[torch.Tensor], torch.Tensor], size: int) -> dict[str, float]:
        """Median batch-1 latency (ms) and batch-N throughput (img/s) of ``forward``."""
        runtime = self.runtime
        batch = self.preset.throughput_batch
        one = torch.randn(1, 3, size, size, device=self.device)
        many = torch.randn(batch, 3, size, size, device=self.device)

        def call(pixels: torch.Tensor) -> None:
            with (
                torch.inference_mode(),
                torch.autocast(runtime.device.type, runtime.dtype, enabled=runtime.dtype != torch.float32),
            ):
                forward(pixels)

        call(one)
        latencies = []
        for _ in range(self.preset.latency_repeats):
            latencies.append(measure(partial(call, one), 1, self.device, _NoMemory()).seconds)
        call(many)
        rounds = max(1, min(10, self.preset.latency_repeats // 3))
        throughput = measure(lambda: [call(many) for _ in range(rounds)], batch * rounds, self.device, _NoMemory())
        return {"latency_ms": 1000 * statistics.median(latencies), "throughput_img_s": throughput.images_per_second}


class _NoMemory(PeakMemory):
    """For timings whose memory is not reported: no reset, no reading."""

    def __init__(self):
        self.method = "none"
        self.baseline_mib = float("nan")

    def reset(self) -> None:
        pass

    def peak_mib(self) -> float:
        return float("nan")


def bare_inversion(model, tokenizer, prompts: list[str], params, runtime: Runtime) -> list[Image.Image]:
    """The inversion in plain torch: Adam on a decorrelated Fourier image, cut-outs drawn on
    the device, the spherical distance of their ``model.encode_image`` to the prompt's."""
    device = runtime.device
    size = params.image_size
    rows, count = len(prompts), params.cutouts
    input_size = model.visual.image_size
    input_size = input_size[0] if isinstance(input_size, tuple | list) else input_size
    mean = torch.tensor(model.visual.preprocess_cfg["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.preprocess_cfg["std"], device=device).view(1, 3, 1, 1)
    with torch.no_grad():
        targets = F.normalize(model.encode_text(tokenizer(prompts).to(device)).float(), dim=-1)
    targets = targets.repeat_interleave(count, dim=0)
    frequencies = torch.sqrt(torch.fft.fftfreq(size)[:, None] ** 2 + torch.fft.rfftfreq(size)[None, :] ** 2)
    scale = (1.0 / frequencies.clamp(min=1.0 / size)).to(device)
    colours = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
    colours = (colours / colours.norm(dim=0).max()).to(device)
    spectrum = (torch.randn(rows, 3, size, size // 2 + 1, 2, device=device) * 0.01).requires_grad_()
    optimizer = torch.optim.Adam([spectrum], lr=params.learning_rate)

    def image() -> torch.Tensor:
        pixels = torch.fft.irfft2(torch.view_as_complex(spectrum) * scale, s=(size, size), norm="ortho")
        return torch.sigmoid(torch.einsum("bchw,dc->bdhw", pixels, colours))

    low, high = params.cutout_scale
    n = rows * count
    for _ in range(params.iterations):
        images = image()
        side = torch.empty(n, device=device).uniform_(low, high).sqrt()
        theta = torch.zeros(n, 2, 3, device=device)
        theta[:, 0, 0] = side * torch.where(torch.rand(n, device=device) < 0.5, -1.0, 1.0)
        theta[:, 1, 1] = side
        theta[:, :, 2] = (torch.rand(n, 2, device=device) * 2 - 1) * (1 - side)[:, None]
        grid = F.affine_grid(theta, [n, 3, input_size, input_size], align_corners=False)
        cutouts = F.grid_sample(images.repeat_interleave(count, dim=0), grid, align_corners=False)
        brightness, contrast = (params.color_jitter * (torch.rand(n, 2, device=device) * 2 - 1)).unbind(dim=1)
        centre = cutouts.mean(dim=(1, 2, 3), keepdim=True)
        cutouts = (cutouts - centre) * (1 + contrast.view(-1, 1, 1, 1)) + centre + brightness.view(-1, 1, 1, 1)
        if params.noise > 0:
            cutouts = cutouts + params.noise * torch.randn_like(cutouts)
        with torch.autocast(device.type, runtime.dtype, enabled=runtime.dtype != torch.float32):
            embeddings = model.encode_image((cutouts - mean) / std)
        embeddings = F.normalize(embeddings.float(), dim=-1)
        distances = (embeddings - targets).norm(dim=-1).div(2).clamp(max=1).arcsin().pow(2).mul(2)
        losses = distances.view(rows, count).mean(dim=1)
        if params.tv_weight > 0:
            dx = (images[..., 1:, :] - images[..., :-1, :]).abs().mean(dim=(1, 2, 3))
            dy = (images[..., :, 1:] - images[..., :, :-1]).abs().mean(dim=(1, 2, 3))
            losses = losses + params.tv_weight * (dx + dy)
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        optimizer.step()
    with torch.no_grad():
        final = (image().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
    return [Image.fromarray(pixels.numpy()) for pixels in final]


# --- model FLOPs utilisation ----------------------------------------------------------------------


def unet_forward_flops(unet_config: dict, latent_size: int, text_tokens: int) -> float:
    """FLOPs of one UNet forward of one image, counted by ``FlopCounterMode`` on a meta-device
    copy (no memory, no compute) with diffusers' plain-matmul attention, whose matmuls the
    counter sees on every device."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    unet.set_attn_processor(AttnProcessor())
    with torch.device("meta"):
        latents = torch.empty(1, unet.config.in_channels, latent_size, latent_size)
        text = torch.empty(1, text_tokens, unet.config.cross_attention_dim)
        timestep = torch.tensor([999])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(latents, timestep, encoder_hidden_states=text)
    return float(counter.get_total_flops())


def peak_tflops(device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    """The device's dense peak for ``dtype`` from :data:`PEAK_TFLOPS`, and its name."""
    if device.type != "cuda":
        return None, _cpu_model()
    name = torch.cuda.get_device_name(device)
    key = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    for pattern, peaks in PEAK_TFLOPS:
        if pattern in name:
            return peaks.get(key), name
    return None, name


def unet_utilisation(
    pipe,
    size: int,
    steps: int,
    batch: int,
    device: torch.device,
    dtype: torch.dtype,
    runs: dict[str, Measurement],
) -> dict[str, Any]:
    """Achieved UNet FLOP/s (FLOPs of one forward x UNet forwards per second) of each timed
    run in ``runs`` (images rendered at ``steps`` steps, or UNet calls at ``batch`` images),
    and each over the device's dense peak for ``dtype``."""
    latent_size = size // pipe.vae_scale_factor
    try:
        per_image = unet_forward_flops(dict(pipe.unet.config), latent_size, pipe.tokenizer.model_max_length)
    except Exception as exc:  # noqa: BLE001 - a report without MFU beats no report
        return {"error": f"FLOP count failed: {type(exc).__name__}: {exc}"}
    peak, device_name = peak_tflops(device, dtype)
    result: dict[str, Any] = {
        "device": device_name,
        "dtype": str(dtype).removeprefix("torch."),
        "peak_tflops": peak,
        "unet_gflops_per_image_forward": per_image / 1e9,
        "latent_size": latent_size,
        "batch_size": batch,
    }
    for side, measured in runs.items():
        # Every image goes through the UNet once per step (no classifier-free guidance).
        flops_per_second = per_image * measured.images * steps / measured.seconds
        result[side] = {
            "unet_calls_per_s": math.ceil(measured.images / batch) * steps / measured.seconds,
            "tflops_per_s": flops_per_second / 1e12,
            "mfu": flops_per_second / (peak * 1e12) if peak else None,
        }
    if peak is None and device.type == "cuda":
        result["note"] = f"no peak for {device_name!r} in PEAK_TFLOPS"
    return result


# --- machine and report ---------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    import importlib.metadata

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    libraries = {}
    for package in ("diffusers", "open_clip_torch", "timm", "transformers", "onnxruntime"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            libraries[package] = importlib.metadata.version(package)
    return {
        "name": gpu or _cpu_model(),
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "libraries": libraries,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _onnx_student_timing(
    student: torch.nn.Module, workdir: Path, size: int, repeats: int, batch: int
) -> dict[str, Any]:
    """ONNX: the student exported by ``clip_dfkd.onnx_export.export_onnx(student, path)``
    (input ``pixels`` N×3×H×W float32, output ``probabilities``) and timed under onnxruntime:
    median batch-1 latency and batch-``batch`` throughput. ``available`` False, with the
    reason, when the exporter or onnxruntime is missing or the export fails."""
    try:
        from clip_dfkd.onnx_export import export_onnx
    except Exception as exc:  # noqa: BLE001 - ImportError, or a module that does not load
        return {"available": False, "reason": f"clip_dfkd.onnx_export.export_onnx not importable ({exc})"}
    try:
        import onnxruntime
    except ImportError as exc:
        return {"available": False, "reason": f"onnxruntime not installed ({exc})"}
    try:
        path = Path(export_onnx(student.cpu().eval(), workdir / "student.onnx"))
    except Exception as exc:  # noqa: BLE001 - the exporter's failure is reported, not fatal
        return {"available": False, "reason": f"export_onnx failed: {type(exc).__name__}: {exc}"}
    providers = [
        p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in onnxruntime.get_available_providers()
    ]
    session = onnxruntime.InferenceSession(str(path), providers=providers)
    one = np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32)
    many = np.random.default_rng(1).standard_normal((batch, 3, size, size), dtype=np.float32)
    result: dict[str, Any] = {"available": True, "providers": session.get_providers(), "path": str(path)}
    for _ in range(3):
        session.run(["probabilities"], {"pixels": one})
    latencies = []
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(["probabilities"], {"pixels": one})
        latencies.append(time.perf_counter() - started)
    result["latency_ms"] = 1000 * statistics.median(latencies)
    try:
        session.run(["probabilities"], {"pixels": many})
        rounds = max(1, min(10, repeats // 3))
        started = time.perf_counter()
        for _ in range(rounds):
            session.run(["probabilities"], {"pixels": many})
        result["throughput_img_s"] = batch * rounds / (time.perf_counter() - started)
    except Exception as exc:  # noqa: BLE001 - e.g. an export with a fixed batch of 1
        result["throughput_img_s"] = None
        result["throughput_error"] = f"{type(exc).__name__}: {exc}"
    return result


# --- one run --------------------------------------------------------------------------------------

_STAGE_METHODS = {
    "synthesis/diffusion": "synthesis_diffusion",
    "synthesis/inversion": "synthesis_inversion",
    "teacher_labeling": "teacher_labeling",
    "student_training": "student_training",
    "evaluation": "evaluation",
}


def run(
    preset: str = "cpu-tiny",
    device: str = "auto",
    precision: str = "auto",
    reduce_size: bool | None = None,
    images: int | None = None,
    repeats: int = 1,
    min_seconds: float = MIN_SECONDS,
    threads: int | None = None,
    stages: Sequence[str] | None = None,
    output: Path | None = None,
    workdir: Path | None = None,
    echo: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Measure every stage (or those in ``stages``) of ``preset`` and what distillation buys;
    write the report to ``output`` as JSON when given and print it through ``echo``.

    Args:
        preset: A key of :data:`PRESETS`.
        device: ``auto``, ``cpu`` or ``cuda`` (resolved by :class:`~clip_dfkd.runtime.Runtime`).
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (likewise).
        reduce_size: Cut gpu-full down (:data:`REDUCED_GPU_FULL`); None: when not on CUDA.
        images: At most this many images (and batch size) in every stage.
        repeats: Timed runs per side; the fastest counts.
        min_seconds: More runs (up to 5 × ``repeats``) of a stage until each side has run
            this long in all (see :func:`compare`).
        threads: ``torch.set_num_threads`` for the run; None leaves torch's choice.
        stages: A subset of :data:`STAGES`; None: all.
        workdir: Where models and images are written; None: a temporary folder.

    Returns:
        The report (see the module docstring for its keys).
    """
    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(
            preset, device, precision, reduce_size, images, repeats, min_seconds, stages, output, workdir, echo, started
        )
    finally:
        torch.set_num_threads(previous_threads)


def _run(preset, device, precision, reduce_size, images, repeats, min_seconds, stages, output, workdir, echo, started):
    runtime_params = RuntimeParams(device=device, precision=precision)
    runtime = Runtime.resolve(runtime_params)
    chosen = PRESETS[preset]
    reductions: list[str] = []
    if reduce_size is None:
        reduce_size = preset == "gpu-full" and runtime.device.type != "cuda"
    if reduce_size:
        chosen, reductions = reduced(chosen)
    if images is not None:
        capped = chosen.capped(images)
        reductions += _differences(chosen, capped)
        chosen = capped
    selected = list(STAGES) if stages is None else list(stages)
    if unknown := [stage for stage in selected if stage not in _STAGE_METHODS]:
        raise ValueError(f"stages={unknown}: unknown; allowed: {', '.join(STAGES)}")
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="clip-dfkd-bench-")))
        bench = Bench(chosen, runtime_params, Path(workdir), repeats, min_seconds)
        stage_seconds = {}
        for stage in selected:
            logger.info("Benchmarking %s", stage)
            stage_started = time.perf_counter()
            getattr(bench, _STAGE_METHODS[stage])()
            stage_seconds[stage] = time.perf_counter() - stage_started
        stage_started = time.perf_counter()
        distillation = bench.distillation_gain()
        stage_seconds["distillation"] = time.perf_counter() - stage_started
        bench.models.release()
    rows = bench.rows
    report = {
        "preset": preset,
        "reduced": bool(reductions),
        "reductions": reductions,
        "device": str(runtime.device),
        "dtype": str(runtime.dtype).removeprefix("torch."),
        "machine": machine_info(runtime.device),
        "settings": dataclasses.asdict(chosen),
        "memory_measure": bench.memory.method,
        "repeats": repeats,
        "min_seconds": min_seconds,
        "target_ratio": TARGET_RATIO,
        "stages": rows,
        "below_target": [row["label"] for row in rows if not row["ratio"] >= TARGET_RATIO],
        "distillation": distillation,
        "mfu": bench.mfu,
        "stage_seconds": stage_seconds,
        "seconds": time.perf_counter() - started,
    }
    if output is not None:
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(_without_nan(report), indent=2, default=str, allow_nan=False) + "\n")
    if echo is not None:
        echo(format_report(report))
        if output is not None:
            echo(f"written: {output}")
    return report


def _without_nan(value: Any) -> Any:
    """``value`` with every NaN float replaced by None (strict JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _without_nan(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_without_nan(item) for item in value]
    return value


def _times(factor: float) -> str:
    return f"{factor:.1f}x" if factor >= 1 else f"{factor:.2g}x"


def _memory(row: dict[str, Any], side: str) -> str:
    over = row[f"{side}_peak_over_start_mib"]
    return f"{row[f'{side}_peak_mib']:.0f}" + ("" if math.isnan(over) else f" (+{over:.0f})")


def format_report(report: dict[str, Any]) -> str:
    """The report as the table, the flagged stages, the speed-ups and the MFU line."""
    machine = report["machine"]
    lines = [
        f"{report['preset']} on {report['device']} ({machine['name']}, {machine['cores']} cores, "
        f"torch {machine['torch']}, {report['dtype']}), {machine['date']}",
    ]
    if report["reductions"]:
        lines.append("reduced: " + "; ".join(report["reductions"]))
    width = max([len(row["label"]) for row in report["stages"]] + [5])
    header = f"{'stage':<{width}} | project img/s | bare img/s | ratio | peak MiB project | peak MiB bare"
    lines += ["", header, "-" * len(header)]
    for row in report["stages"]:
        lines.append(
            f"{row['label']:<{width}} | {row['project_img_s']:13.2f} | {row['bare_img_s']:10.2f} | "
            f"{row['ratio']:5.2f} | {_memory(row, 'project'):>16} | {_memory(row, 'bare'):>13}"
        )
    lines.append(f"(peak memory: {report['memory_measure']}; in brackets: above its level when the timing started)")
    for row in report["stages"]:
        if (step_only := row["details"].get("bare_step_only_img_s")) is not None:
            lines.append(
                f"{row['label']}: bare train steps on images transformed beforehand {step_only:.2f} img/s "
                f"(decoding and augmenting in the loop: bare runs at {row['bare_img_s'] / step_only:.0%} of it)"
            )
    below = report["below_target"]
    lines.append(
        f"BELOW TARGET (project/bare < {report['target_ratio']}): {', '.join(below)}"
        if below
        else f"every ratio >= {report['target_ratio']}"
        if report["stages"]
        else "no stage measured (--stages): only what distillation buys"
    )
    gain = report["distillation"]
    student = gain["student"]
    lines += [
        "",
        f"student {student['model']}: {student['parameters'] / 1e6:.2f}M parameters, {student['input_size']} px: "
        f"{student['latency_ms']:.2f} ms at batch 1, {student['throughput_img_s']:.1f} img/s at batch "
        f"{gain['throughput_batch']}",
    ]
    for teacher in gain["teachers"]:
        lines.append(
            f"vs teacher {teacher['model']} image tower: {teacher['parameters'] / 1e6:.2f}M parameters "
            f"({_times(teacher['parameter_ratio'])} the student), {teacher['input_size']} px: "
            f"{teacher['latency_ms']:.2f} ms, {teacher['throughput_img_s']:.1f} img/s -> student speed-up "
            f"{_times(teacher['latency_speedup'])} latency, {_times(teacher['throughput_speedup'])} throughput"
        )
    onnx = gain["onnx"]
    if onnx.get("available"):
        throughput = onnx.get("throughput_img_s")
        lines.append(
            f"student under onnxruntime ({', '.join(onnx['providers'])}): {onnx['latency_ms']:.2f} ms at batch 1, "
            + (
                f"{throughput:.1f} img/s at batch {gain['throughput_batch']}"
                if throughput
                else onnx["throughput_error"]
            )
        )
    else:
        lines.append(f"student under onnxruntime: not timed ({onnx['reason']})")
    mfu = report["mfu"]
    if mfu and "error" not in mfu:
        parts = []
        for side in ("project", "bare", "unet_only"):
            if side in mfu:
                value = mfu[side]["mfu"]
                shown = f"{value:.1%}" if value is not None else "n/a"
                parts.append(f"{side} {mfu[side]['tflops_per_s']:.3f} TFLOP/s, MFU {shown}")
        peak = f"peak {mfu['peak_tflops']} TFLOP/s {mfu['dtype']}" if mfu["peak_tflops"] else "peak unknown: MFU n/a"
        lines.append(
            f"UNet: {mfu['unet_gflops_per_image_forward']:.1f} GFLOPs per image forward at {mfu['latent_size']}x"
            f"{mfu['latent_size']} latents; {'; '.join(parts)} ({mfu['device']}, {peak})"
        )
    elif mfu:
        lines.append(f"UNet MFU: {mfu['error']}")
    spent = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in report["stage_seconds"].items())
    lines.append(f"wall time: {report['seconds']:.0f} s in all ({spent})")
    return "\n".join(lines)
