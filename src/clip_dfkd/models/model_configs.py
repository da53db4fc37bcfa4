"""The project's own open_clip architecture configs (``clip_dfkd/models/configs/*.json``).

Kept apart from :mod:`clip_dfkd.demo.tiny_models` so that parameter validation and model loaders
can register the configs without importing diffusers or transformers.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"


def register_project_model_configs() -> None:
    """Make every config in :data:`CONFIG_DIR` known to ``open_clip.list_models()``.

    Idempotent and cheap once registered: open_clip appends to its search path and rescans
    every config on each ``add_model_config`` call, so it is called only when a project
    config is missing from the registry.

    Raises:
        ValueError: a config file is not an open_clip CLIP config (open_clip would skip it
            silently and the model name would later fail to resolve).
    """
    import open_clip  # deferred: importing open_clip pulls in torch and timm

    names = sorted(path.stem for path in CONFIG_DIR.glob("*.json"))
    if not names or set(names) <= set(open_clip.list_models()):
        return
    open_clip.add_model_config(CONFIG_DIR)
    unregistered = sorted(set(names) - set(open_clip.list_models()))
    if unregistered:
        raise ValueError(
            f"open_clip did not register {unregistered} from {CONFIG_DIR}: "
            "a config needs the keys embed_dim, vision_cfg and text_cfg"
        )


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")


@contextlib.contextmanager
def building_without_weights() -> Iterator[None]:
    """Silences open_clip's "No pretrained weights loaded ... initialized randomly" warning
    (it logs it on the root logger for every model built without weights) while the project
    builds one on purpose: an architecture on the meta device, or a demo model it then saves.
    A teacher loaded for a run still warns, as it should, if its weights were not loaded."""
    quiet = _DropRandomInitWarning()
    logging.getLogger().addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(quiet)
