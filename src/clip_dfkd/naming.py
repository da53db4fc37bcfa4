"""Stable identifiers: file-safe names and seeds that do not shift when a list grows."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any


def slugify(text: str) -> str:
    """A lowercase, file-system-safe form of a class or style name."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug or "x"


def stable_hash(*parts: Any, length: int = 8) -> str:
    """A short hex digest of JSON-serialisable parts (same parts → same digest everywhere)."""
    payload = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(payload).hexdigest()[:length]


def stable_seed(*parts: Any) -> int:
    """A 31-bit seed derived from ``parts``; unlike ``base + row index`` it does not change
    for existing images when a class or style is added."""
    return int(stable_hash(*parts, length=8), 16) & 0x7FFFFFFF


def shard_of(key: str, num_shards: int) -> int:
    """Which of ``num_shards`` shards ``key`` belongs to, the same in every process."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:16], 16) % num_shards
