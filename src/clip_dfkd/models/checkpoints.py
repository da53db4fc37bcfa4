"""Checkpoint files compared with the architecture they are meant for, without loading them.

A checkpoint of another architecture fails deep inside a run, after hours of synthesis, or
(timm with a new classifier loads non-strictly) is silently half-loaded. Names and shapes
are read from the file's header (safetensors) or with the meta device (torch files), and
the model is built on the meta device, so the comparison is cheap even for large models.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open


def checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]] | None:
    """Parameter name → shape, unwrapped as open_clip and timm unwrap checkpoints (a
    ``state_dict``/``model`` entry, a ``module.`` prefix); None for a layout this cannot read
    (TorchScript archives and others: the library's own loader decides).

    Raises:
        ValueError: a ``.safetensors`` file that is not one.
    """
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), "pt") as handle:
                state = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118
        except SafetensorError as exc:
            raise ValueError(f"not a safetensors file ({exc})") from None
    else:
        try:
            loaded = torch.load(path, map_location="meta", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - not a plain torch checkpoint: the library's loader decides
            return None
        if isinstance(loaded, dict):
            loaded = loaded.get("state_dict", loaded.get("model", loaded))
        if not isinstance(loaded, dict):
            return None
        state = {name: tuple(tensor.shape) for name, tensor in loaded.items() if isinstance(tensor, torch.Tensor)}
    return {name.removeprefix("module."): shape for name, shape in state.items()}


def architecture_mismatch(
    model: torch.nn.Module, found: dict[str, tuple[int, ...]], ignored: Iterable[str] = ()
) -> str | None:
    """How the checkpoint ``found`` differs from ``model``'s parameters, as one example, or
    None when every parameter is there with its shape. The ``ignored`` parameters and
    modules are not compared (a classifier that is replaced, embeddings that are resized)."""
    ignored = tuple(ignored)
    expected = {
        name: tuple(tensor.shape)
        for name, tensor in model.state_dict().items()
        if name not in ignored and not name.startswith(tuple(f"{module}." for module in ignored))
    }
    if wrong := [name for name in expected if name in found and found[name] != expected[name]]:
        return f"{wrong[0]} is {list(expected[wrong[0]])} in the model, {list(found[wrong[0]])} in the file"
    if missing := sorted(set(expected) - set(found)):
        return f"{len(missing)} of its {len(expected)} tensors are missing, e.g. {missing[0]}"
    return None
