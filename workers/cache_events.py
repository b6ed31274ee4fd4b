"""Prefix-cache events a worker publishes to the global prefix directory (drained in batches).

``stored``: a full block with ``block_hash`` is now cached in ``namespace``; ``evicted``: it no
longer is; ``cleared``: every cached block of ``namespace`` is gone (``namespace == ""``: of every
namespace). ``tier`` says where the stored block lives ("device" memory, "host" after a swap,
"disk").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

TIERS: tuple[str, ...] = ("device", "host", "disk")


@dataclass(frozen=True)
class CacheEvent:
    kind: Literal["stored", "evicted", "cleared"]
    block_hash: bytes | None  # None for "cleared"
    namespace: str
    tier: str = "device"
