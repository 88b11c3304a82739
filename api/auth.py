"""Who is calling, at which tier.

With ``INFERSTACK_KEYS_FILE`` set, every request needs ``Authorization: Bearer <key>``;
the file maps keys (preferably stored as ``sha256:<hex>``, see ``inferstack hash-key``)
to a user, a tier and an optional weight, queue cap and prefix-cache scope. Plain keys in the file are
hashed at load, so only hashes stay in memory. Without the file the API is open:
the OpenAI ``user`` field names the user, at tier ``normal``.

A request may lower its tier with ``priority``; asking for a higher one than its key
allows is refused (403).
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass
from pathlib import Path

from api.errors import OpenAIError
from broker.messages import Tier

ANONYMOUS = "anonymous"
"""The user of an open-mode request that names none."""


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Identity:
    user: str
    tier: Tier = Tier.NORMAL
    weight: float = 1.0
    max_queued: int | None = None
    admin: bool = False
    cache_scope: str | None = None
    """Keys with the same scope may reuse each other's prompt-prefix KV caches (and so
    see each other's prefixes in ``cached_tokens``); unset = the key's user alone."""

    @property
    def scope(self) -> str:
        return self.cache_scope or self.user

    def with_priority(self, priority: str | None) -> Tier:
        if priority is None:
            return self.tier
        wanted = Tier(priority)
        if wanted.rank > self.tier.rank:
            raise OpenAIError(403, f"priority '{wanted}' is above this key's tier '{self.tier}'.",
                              type="permission_error", param="priority", code="priority_not_allowed")
        return wanted


class KeyStore:
    def __init__(self, entries: dict[str, Identity] | None):
        self._entries = entries  # None = open mode

    @classmethod
    def load(cls, path: Path | None) -> "KeyStore":
        if path is None:
            return cls(None)
        with open(path, "rb") as f:
            data = tomllib.load(f)
        entries = {}
        for key, raw in data.get("keys", {}).items():
            digest = key if key.startswith("sha256:") else hash_key(key)
            entries[digest] = Identity(
                user=raw["user"], tier=Tier(raw.get("tier", "normal")), weight=float(raw.get("weight", 1.0)),
                max_queued=raw.get("max_queued"), admin=bool(raw.get("admin", False)),
                cache_scope=raw.get("cache_scope"),
            )
        return cls(entries)

    @property
    def open(self) -> bool:
        return self._entries is None

    def identify(self, authorization: str | None, body_user: str | None) -> Identity:
        if self._entries is None:
            return Identity(user=(body_user or ANONYMOUS))
        if not authorization or not authorization.lower().startswith("bearer "):
            raise OpenAIError(401, "Missing API key: send `Authorization: Bearer <key>`.",
                              type="authentication_error", code="missing_api_key")
        identity = self._entries.get(hash_key(authorization[7:].strip()))
        if identity is not None:
            return identity
        raise OpenAIError(401, "Incorrect API key provided.", type="authentication_error", code="invalid_api_key")
