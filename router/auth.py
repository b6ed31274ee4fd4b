"""API keys → tenants. The tenant (and its prefix-cache namespace) is decided here, never taken from
a request.

Keys file (YAML; e.g. a mounted Kubernetes Secret)::

    tenants:
      acme:   {keys: ["sk-acme-1", "sk-acme-2"], prefix_namespace: "shared-acme"}
      globex: {keys: ["sk-globex-1"]}            # namespace defaults to the tenant's name
    admin_keys: ["sk-admin-1"]                   # for /admin/* (optional)

Keys are held only as SHA-256 digests and compared with ``hmac.compare_digest`` over every known
digest, so neither the file's plaintext nor lookup timing reveals a key. Without a keys file the
router runs in single-tenant development mode: every request is tenant ``dev`` and admin calls are
open (logged loudly at start-up).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger(__name__)

DEV_TENANT = "dev"


@dataclass(frozen=True)
class Tenant:
    name: str
    namespace: str  # prefix-cache namespace (shared when the operator says so)
    admin: bool = False


class _TenantEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: list[str] = Field(min_length=1)
    prefix_namespace: str | None = Field(default=None, min_length=1)


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tenants: dict[str, _TenantEntry] = Field(default_factory=dict)
    admin_keys: list[str] = Field(default_factory=list)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class Authenticator:
    """Maps a presented key to a ``Tenant``; ``None`` for a missing or unknown key."""

    def __init__(self, keys: KeysFile | None) -> None:
        self.dev_mode = keys is None
        self._entries: list[tuple[bytes, Tenant]] = []
        if keys is None:
            return
        seen: dict[bytes, str] = {}
        for name, entry in keys.tenants.items():
            tenant = Tenant(name, entry.prefix_namespace or name)
            for key in entry.keys:
                self._add(seen, key, tenant, f"tenant {name!r}")
        for key in keys.admin_keys:
            self._add(seen, key, Tenant("admin", "admin", admin=True), "admin_keys")

    def _add(self, seen: dict[bytes, str], key: str, tenant: Tenant, where: str) -> None:
        if not key:
            raise ValueError(f"api keys file: empty key under {where}")
        d = _digest(key)
        if d in seen:
            raise ValueError(f"api keys file: a key under {where} is also listed under {seen[d]}")
        seen[d] = where
        self._entries.append((d, tenant))

    @classmethod
    def from_file(cls, path: str | Path | None) -> Authenticator:
        if path is None:
            log.warning(
                "no API keys file: single-tenant DEVELOPMENT mode (every request is tenant %r, "
                "no authentication, admin endpoints open); pass --api-keys FILE in production",
                DEV_TENANT,
            )
            return cls(None)
        import yaml

        raw = yaml.safe_load(Path(path).read_text()) or {}
        try:
            keys = KeysFile.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise ValueError(f"api keys file {path}: {loc}: {first['msg']}") from None
        auth = cls(keys)
        log.info(
            "api keys: %d tenants, %d keys loaded (held hashed)",
            len(keys.tenants),
            len(auth._entries),
        )
        return auth

    def authenticate(self, key: str | None) -> Tenant | None:
        if self.dev_mode:
            return Tenant(DEV_TENANT, DEV_TENANT, admin=True)
        if not key:
            return None
        d = _digest(key)
        found: Tenant | None = None
        for digest, tenant in self._entries:  # no early exit: time does not depend on the match
            if hmac.compare_digest(digest, d):
                found = tenant
        return found

    @property
    def num_keys(self) -> int:
        return len(self._entries)

    @property
    def tenant_names(self) -> frozenset[str]:
        """Configured tenants (bounded: safe as a metrics label)."""
        if self.dev_mode:
            return frozenset({DEV_TENANT})
        return frozenset(t.name for _, t in self._entries)


def bearer_key(authorization: str | None, x_api_key: str | None = None) -> str | None:
    """The key from ``Authorization: Bearer <key>`` (what the openai client sends) or ``x-api-key``."""
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return x_api_key.strip() if x_api_key else None
