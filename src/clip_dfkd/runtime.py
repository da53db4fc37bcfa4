"""Device, precision and seeding choices shared by every stage that runs a model."""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from clip_dfkd.errors import UserError
from clip_dfkd.params import RuntimeParams

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Runtime:
    """The resolved device and compute dtype of a run (``auto`` already decided)."""

    device: torch.device
    dtype: torch.dtype
    compile: bool = False
    num_workers: int = 0
    # Of the student's weights and input batches (the CLIP towers have no convolutions to speak of).
    memory_format: torch.memory_format = torch.contiguous_format

    @classmethod
    def resolve(cls, params: RuntimeParams) -> Runtime:
        if params.device == "auto":
            if torch.cuda.is_available():
                device = torch.device("cuda")
            elif torch.backends.mps.is_available():
                device = torch.device("mps")
            else:
                device = torch.device("cpu")
                if torch.version.cuda and nvidia_driver_present():
                    logger.warning(
                        "runtime.device=auto: this machine has an NVIDIA driver but PyTorch (CUDA %s) cannot use "
                        "its GPU (torch.cuda.is_available() is False; a driver older than the CUDA build is the "
                        "usual cause), so every model runs on the CPU, many times slower; set runtime.device=cuda "
                        "to stop instead",
                        torch.version.cuda,
                    )
        else:
            if problem := unavailable_device(params):
                raise UserError(problem)
            device = torch.device(params.device)
        if params.precision == "auto":
            # Half precision only pays on accelerators; bf16 needs no loss scaling, but GPUs
            # without bf16 units (T4, V100) only emulate it, slowly: they get fp16.
            if device.type == "cuda":
                native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
                dtype = torch.bfloat16 if native_bf16 else torch.float16
            else:
                dtype = torch.float32
        else:
            dtype = _DTYPES[params.precision]
        channels_last = params.channels_last if params.channels_last is not None else device.type == "cuda"
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if device.type == "cuda" and dtype == torch.float32 and params.tf32:
            # Process-wide, like every backend flag: fp32 runs here are all this run's models.
            torch.backends.cuda.matmul.fp32_precision = "tf32"
        num_workers = auto_workers() if params.num_workers == "auto" else params.num_workers
        runtime = cls(device, dtype, params.compile, num_workers, memory_format)
        _announce(str(device), str(dtype).removeprefix("torch."))
        return runtime

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for forward passes; a no-op in fp32."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


def auto_workers() -> int:
    """DataLoader workers for ``runtime.num_workers: auto``: one per core this process may use,
    but the main process's, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(8, cores - 1))


@functools.cache
def _announce(device: str, dtype: str) -> None:
    """Logs a choice once per process: every node that runs a model resolves it."""
    logger.info("Running models on %s in %s", device, dtype)


def release_device_memory() -> None:
    """Return the accelerator memory that no live tensor uses to the driver.

    A node's models are dropped when the node returns (or, for synthesis, once its images are
    saved), but PyTorch's caching allocator keeps their blocks reserved for this process;
    emptying the cache hands them back, so other processes on the GPU and ``nvidia-smi`` see
    what the run really holds. A no-op until a GPU has been used.
    """
    if torch.cuda.is_initialized():
        gc.collect()  # models caught in reference cycles hold their tensors until collected
        torch.cuda.empty_cache()
    elif torch.backends.mps.is_available() and torch.mps.current_allocated_memory() > 0:
        gc.collect()
        torch.mps.empty_cache()


class FittingBatches:
    """Runs ``work`` on a batch at once or, when the batch does not fit in device memory, on
    half as many items at a time (down to one), and keeps to the size that fitted for the
    batches after. ``warn(tried, fits)`` says so; ``too_large()`` is raised when a single item
    does not fit."""

    def __init__(self, warn: Callable[[int, int], None], too_large: Callable[[], Exception]):
        self._warn = warn
        self._too_large = too_large
        self._fits: int | None = None

    def run(self, items: Sequence[T], work: Callable[[Sequence[T]], R], join: Callable[[list[R]], R]) -> R:
        """Parts that fitted are kept: only a part that did not fit is split and redone."""
        parts, done = [], 0
        while done < len(items):
            chunk = items[done : done + (self._fits or len(items))]
            parts.append(self._fitting(chunk, work, join))
            done += len(chunk)
        return parts[0] if len(parts) == 1 else join(parts)

    def run_whole(
        self,
        items: Sequence[T],
        work: Callable[[Sequence[T]], R],
        join: Callable[[list[R]], R],
        discard: Callable[[], None],
    ) -> R:
        """For work whose parts leave effects behind (gradients accumulated by ``backward``):
        when a part does not fit, ``discard()`` undoes what the parts before it left and the
        whole batch is taken again in smaller parts."""
        while True:
            size = min(self._fits or len(items), len(items))
            try:
                parts = [work(items[start : start + size]) for start in range(0, len(items), size)]
                return parts[0] if len(parts) == 1 else join(parts)
            except torch.OutOfMemoryError:
                pass  # retried below, once this frame no longer holds the failed part's tensors
            discard()
            self._shrink(size)

    def _fitting(self, chunk: Sequence[T], work: Callable[[Sequence[T]], R], join: Callable[[list[R]], R]) -> R:
        try:
            return work(chunk)
        except torch.OutOfMemoryError:
            pass  # retried below, once this frame no longer holds the failed batch's tensors
        self._shrink(len(chunk))
        return self.run(chunk, work, join)

    def _shrink(self, tried: int) -> None:
        if tried == 1:
            raise self._too_large()
        release_device_memory()
        self._fits = (tried + 1) // 2
        self._warn(tried, self._fits)


def unavailable_device(params: RuntimeParams) -> str | None:
    """Why ``runtime.device`` cannot be used on this machine, or None."""
    if params.device == "auto" or params.device == "cpu":
        return None
    if params.device == "mps":
        available, allowed = torch.backends.mps.is_available(), "auto, cpu"
    else:
        # device_count() asks NVML, which counts GPUs that CUDA itself may be unable to use.
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(params.device.partition(":")[2] or 0)
        available = index < count
        allowed = "auto, cpu" + "".join(f", cuda:{n}" for n in range(count)) + (", cuda" if count else "")
    if available:
        return None
    return f"runtime.device={params.device!r}: no such device on this machine; allowed here: {allowed}"


def nvidia_driver_present() -> bool:
    """Whether the NVIDIA kernel driver is loaded (Linux), whatever PyTorch makes of it."""
    return Path("/proc/driver/nvidia/version").exists()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
