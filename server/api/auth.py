"""API keys, roles and tenant allow-lists.

The keys file (YAML, or the same structure as JSON)::

    keys:
      - key: sk-admin-change-me
        role: admin
      - key: sk-alice-change-me
        role: user
        adapters: ["alice-*", "shared-*"]     # glob patterns; absent = no adapters
        collections: ["alice-*"]              # likewise for RAG collections
        write_collections: ["alice-notes"]    # may also ingest into / delete documents of these
        requests_per_minute: 120
        tokens_per_minute: 50000

Keys are compared in constant time (SHA-256 digests with ``hmac.compare_digest``, against every key).
A user asking for an adapter or collection outside its allow-list gets the same 404 as for a name
that does not exist, so allow-lists leak nothing about other tenants.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import yaml
from fastapi import Depends, Request

from server.api.errors import APIError


class KeysFileInvalid(ValueError):
    """The keys file cannot be used; the message names the entry and field."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: a role and what it may use."""

    name: str
    role: Literal["admin", "user"]
    adapters: tuple[str, ...] = ()
    collections: tuple[str, ...] = ()
    write_collections: tuple[str, ...] = ()
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def may_use_adapter(self, name: str) -> bool:
        return self.is_admin or any(fnmatch.fnmatchcase(name, p) for p in self.adapters)

    def may_use_collection(self, name: str) -> bool:
        return self.is_admin or any(fnmatch.fnmatchcase(name, p) for p in self.collections)

    def may_write_collection(self, name: str) -> bool:
        """Ingest into and delete documents of ``name`` (collection create/delete stay admin-only)."""
        return self.is_admin or (
            self.may_use_collection(name)
            and any(fnmatch.fnmatchcase(name, p) for p in self.write_collections)
        )


ANONYMOUS_ADMIN = Principal(name="anonymous", role="admin")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class KeyRing:
    """The configured keys, looked up in constant time."""

    def __init__(self, entries: list[tuple[bytes, Principal]]):
        self._entries = entries

    @classmethod
    def from_file(cls, path: Path) -> KeyRing:
        try:
            text = Path(path).read_text()
            data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
        except (OSError, ValueError, yaml.YAMLError) as e:
            raise KeysFileInvalid(f"api keys file cannot be read: {e}") from e
        if not isinstance(data, dict) or not isinstance(data.get("keys"), list) or not data["keys"]:
            raise KeysFileInvalid("api keys file must hold a non-empty list under 'keys'")
        entries, seen = [], set()
        for i, item in enumerate(data["keys"]):
            entries.append(_parse_key(i, item, seen))
        return cls(entries)

    def authenticate(self, presented: str) -> Principal | None:
        digest = _digest(presented)
        found = None
        for key_digest, principal in self._entries:  # no early exit: time does not depend on the match
            if hmac.compare_digest(digest, key_digest):
                found = principal
        return found


def _parse_key(i: int, item: object, seen: set[str]) -> tuple[bytes, Principal]:
    where = f"keys[{i}]"
    if not isinstance(item, dict):
        raise KeysFileInvalid(f"{where} must be a mapping")
    key, role = item.get("key"), item.get("role")
    if not isinstance(key, str) or len(key) < 8:
        raise KeysFileInvalid(f"{where}.key must be a string of at least 8 characters")
    if key in seen:
        raise KeysFileInvalid(f"{where}.key is a duplicate")
    seen.add(key)
    if role not in ("admin", "user"):
        raise KeysFileInvalid(f"{where}.role must be 'admin' or 'user'")
    lists = {}
    for field in ("adapters", "collections", "write_collections"):
        value = item.get(field, [])
        if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
            raise KeysFileInvalid(f"{where}.{field} must be a list of glob patterns")
        lists[field] = tuple(value)
    limits = {}
    for field in ("requests_per_minute", "tokens_per_minute"):
        value = item.get(field)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise KeysFileInvalid(f"{where}.{field} must be a positive integer")
        limits[field] = value
    principal = Principal(name=item.get("name") or f"key{i}", role=role, **lists, **limits)
    return _digest(key), principal


def get_principal(request: Request) -> Principal:
    """The caller, from ``Authorization: Bearer KEY``; anonymous admin when no keys are configured."""
    keyring: KeyRing | None = getattr(request.app.state, "keyring", None)
    if keyring is None:
        return ANONYMOUS_ADMIN
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    principal = keyring.authenticate(token.strip()) if scheme.lower() == "bearer" and token else None
    if principal is None:
        raise APIError(
            401,
            "Missing or invalid API key: send 'Authorization: Bearer <key>'.",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    request.state.principal = principal
    return principal


def require_admin(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
    if not principal.is_admin:
        raise APIError(403, "This operation needs an admin key.", code="permission_denied")
    return principal


Caller = Annotated[Principal, Depends(get_principal)]
Admin = Annotated[Principal, Depends(require_admin)]


def may_see_adapter(state, principal: Principal, name: str) -> bool:
    """Whether ``principal`` may see resident or stored adapter ``name``: a computed merge only if it
    may use every part (a merge's name is derived from an open spec hash, so it proves nothing)."""
    parts = state.registry.merge_parts(name)
    if parts is not None:
        return all(principal.may_use_adapter(part) for part in parts)
    return principal.may_use_adapter(name)
