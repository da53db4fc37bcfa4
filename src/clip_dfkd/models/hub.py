"""Whether the Hugging Face hub can be reached, asked once per process.

Without ``HF_HUB_OFFLINE``, a machine that cannot reach the hub spends minutes in
huggingface_hub's retries before a download fails with a network error that names no model.
One quick request tells instead; when it fails, the process works offline from then on, as
``HF_HUB_OFFLINE=1`` would have made it, so the weight checks give their one-line
missing-model message and models in the local cache load without waiting for the network.
"""

from __future__ import annotations

import functools
import logging
import os

logger = logging.getLogger(__name__)

_PROBE_SECONDS = 5.0


@functools.cache
def hub_reachable() -> bool:
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.is_offline_mode():
        return False
    try:
        # Any answer, even an error status, means the hub (or the proxy in front of it) is there.
        get_session().head(constants.ENDPOINT, timeout=_PROBE_SECONDS)
    except Exception as exc:  # noqa: BLE001 - every way of not answering means the same here
        logger.warning(
            "The Hugging Face hub (%s) does not answer (%s): working offline, as with HF_HUB_OFFLINE=1, so every "
            "model must be in a local folder or the local cache",
            constants.ENDPOINT,
            type(exc).__name__,
        )
        constants.HF_HUB_OFFLINE = True
        os.environ["HF_HUB_OFFLINE"] = "1"  # for the processes this one starts (DataLoader, Ray workers)
        return False
    return True
