"""Device, precision and seeding choices shared by every stage that runs a model."""

from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import dataclass

import numpy as np
import torch

from clip_dfkd.errors import UserError
from clip_dfkd.params import RuntimeParams

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Runtime:
    """The resolved device and compute dtype of a run (``auto`` already decided)."""

    device: torch.device
    dtype: torch.dtype
    compile: bool = False
    num_workers: int = 0

    @classmethod
    def resolve(cls, params: RuntimeParams) -> Runtime:
        if params.device == "auto":
            if torch.cuda.is_available():
                device = torch.device("cuda")
            elif torch.backends.mps.is_available():
                device = torch.device("mps")
            else:
                device = torch.device("cpu")
        else:
            if problem := unavailable_device(params):
                raise UserError(problem)
            device = torch.device(params.device)
        if params.precision == "auto":
            # Half precision only pays on accelerators; bf16 needs no loss scaling.
            if device.type == "cuda":
                dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            else:
                dtype = torch.float32
        else:
            dtype = _DTYPES[params.precision]
        runtime = cls(device, dtype, params.compile, params.num_workers)
        logger.info("Running models on %s in %s", device, str(dtype).removeprefix("torch."))
        return runtime

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for forward passes; a no-op in fp32."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


def unavailable_device(params: RuntimeParams) -> str | None:
    """Why ``runtime.device`` cannot be used on this machine, or None."""
    if params.device == "auto" or params.device == "cpu":
        return None
    if params.device == "mps":
        available, allowed = torch.backends.mps.is_available(), "auto, cpu"
    else:
        count = torch.cuda.device_count()
        index = int(params.device.partition(":")[2] or 0)
        available = index < count
        allowed = "auto, cpu" + "".join(f", cuda:{n}" for n in range(count)) + (", cuda" if count else "")
    if available:
        return None
    return f"runtime.device={params.device!r}: no such device on this machine; allowed here: {allowed}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
