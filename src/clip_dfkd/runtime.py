"""Device, precision and seeding choices shared by every stage that runs a model."""

from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import dataclass

import numpy as np
import torch

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
            device = torch.device(params.device)
            if device.type == "cuda" and not torch.cuda.is_available():
                raise RuntimeError(
                    f"runtime.device={params.device!r}: CUDA is not available on this machine; allowed here: auto, cpu"
                )
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
