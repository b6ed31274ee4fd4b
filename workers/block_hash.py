"""The one hashing module for KV blocks, used by workers, router and prefix directory alike.

A full block's identity is a SHA-256 chain::

    root = sha256("baton-kv-v1" | tenant_namespace | tokenizer_hash | model_fingerprint | kv_dtype | cache_salt)
    h_i  = sha256(h_{i-1} | token_ids of block i (int64 little-endian) | extras)

Every field is length-prefixed so that no two different inputs serialize alike. Python's ``hash()`` is never used:
it is salted per process and these hashes cross processes (worker -> directory -> router).
"""

from __future__ import annotations

import functools
import hashlib
import struct
from dataclasses import dataclass, replace
from typing import Sequence


def _field(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


@dataclass(frozen=True)
class CacheIdentity:
    """Everything that must match for two KV blocks with the same tokens to be interchangeable."""

    namespace: str
    tokenizer_hash: str
    model_fingerprint: str
    kv_dtype: str
    cache_salt: str = ""

    def root(self) -> bytes:
        h = hashlib.sha256(b"baton-kv-v1")
        for part in (
            self.namespace,
            self.tokenizer_hash,
            self.model_fingerprint,
            self.kv_dtype,
            self.cache_salt,
        ):
            h.update(_field(part.encode("utf-8")))
        return h.digest()


@functools.lru_cache(maxsize=4096)
def namespace_root(identity: CacheIdentity, namespace: str) -> bytes:
    """The chain root of ``identity`` under another tenant ``namespace`` (same model, tokenizer, KV format)."""
    return replace(identity, namespace=namespace).root()


def tokens_bytes(token_ids: Sequence[int]) -> bytes:
    return struct.pack(f"<{len(token_ids)}q", *token_ids)


def chain_hash(parent: bytes, token_ids: Sequence[int], extras: bytes = b"") -> bytes:
    """h_i = sha256(h_{i-1} | tokens_i | extras)."""
    h = hashlib.sha256(parent)
    h.update(_field(tokens_bytes(token_ids)))
    h.update(_field(extras))
    return h.digest()


def block_hashes(
    identity: CacheIdentity | bytes, token_ids: Sequence[int], block_size: int, extras: bytes = b""
) -> list[bytes]:
    """Hashes of every *full* block of ``token_ids`` (a trailing partial block has none)."""
    parent = identity.root() if isinstance(identity, CacheIdentity) else identity
    out: list[bytes] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = chain_hash(parent, token_ids[start : start + block_size], extras)
        out.append(parent)
    return out
