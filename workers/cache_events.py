"""Prefix-cache events a worker publishes to the global prefix directory (drained in batches)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class CacheEvent:
    kind: Literal["stored", "evicted", "cleared"]
    block_hash: bytes | None  # None for "cleared"
    namespace: str
