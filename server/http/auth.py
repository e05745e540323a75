"""API keys, tenants and who a request is from.

Keys are shown once, when made; the catalog keeps only their SHA-256. A key is a random
256-bit token, so a plain hash (no salt, no stretching) is the right tool: there is no
dictionary to attack. Keys are never logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass

from pydantic import SecretStr

from adapters.database import Database, KeyRow
from adapters.spec import SHARED
from server.http.errors import GatewayError

logger = logging.getLogger(__name__)

KEY_PREFIX = "lgw-"


class Unauthorized(GatewayError):
    """No key, or a key that is not (or no longer) valid."""

    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"

    def __init__(self, message: str = "a valid API key is required: send 'Authorization: Bearer KEY'"):
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class AdminOnly(GatewayError):
    """A tenant asked for something only the admin may do."""

    status_code = 403
    error_type = "permission_error"
    code = "admin_only"

    def __init__(self, what: str):
        super().__init__(f"{what} is for the admin key only")


class MetricsForbidden(GatewayError):
    """A tenant's key asked for /metrics, whose series name every tenant's adapters."""

    status_code = 403
    error_type = "permission_error"
    code = "admin_only"

    def __init__(self) -> None:
        super().__init__("GET /metrics takes the admin key or the --metrics-key, not a tenant's key")


@dataclass(frozen=True)
class Principal:
    """Who a request is from: the admin, or one tenant."""

    tenant: str | None
    admin: bool

    @property
    def owner(self) -> str:
        """The owner of adapters this caller registers by default."""
        return self.tenant if self.tenant is not None else SHARED

    @property
    def visible_owners(self) -> set[str] | None:
        """Owners whose adapters this caller sees; None for all."""
        return None if self.admin else {SHARED, self.tenant or SHARED}


ADMIN = Principal(tenant=None, admin=True)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class IssuedKey:
    key_id: str
    key: str
    created_at: float


class KeyRing:
    """Checks keys; issues and revokes tenant keys."""

    def __init__(self, catalog: Database, admin_key: SecretStr | None, metrics_key: SecretStr | None = None):
        self._catalog = catalog
        self._admin_hash = hash_key(admin_key.get_secret_value()) if admin_key else None
        self._metrics_hash = hash_key(metrics_key.get_secret_value()) if metrics_key else None
        self._by_hash: dict[str, KeyRow] = {row.key_hash: row for row in catalog.keys()}

    @property
    def open(self) -> bool:
        """No admin key: every caller is the admin (local use and the demo)."""
        return self._admin_hash is None

    def authenticate(self, authorization: str | None) -> Principal:
        if self.open:
            return ADMIN
        digest = self._bearer_digest(authorization)
        if hmac.compare_digest(digest, self._admin_hash or ""):
            return ADMIN
        row = self._by_hash.get(digest)
        # The dict lookup is keyed by a hash the caller cannot steer; compare anyway.
        if row is None or not hmac.compare_digest(row.key_hash, digest):
            raise Unauthorized("the API key is not valid")
        return Principal(tenant=row.tenant, admin=False)

    def authenticate_metrics(self, authorization: str | None) -> None:
        """GET /metrics: the admin key or the --metrics-key (anyone in open mode). The metrics key
        opens nothing else; a tenant's key is refused, since the series name every tenant's adapters."""
        if self.open:
            return
        digest = self._bearer_digest(authorization)
        for accepted in (self._admin_hash, self._metrics_hash):
            if accepted is not None and hmac.compare_digest(digest, accepted):
                return
        if digest in self._by_hash:
            raise MetricsForbidden()
        raise Unauthorized("the API key is not valid")

    @staticmethod
    def _bearer_digest(authorization: str | None) -> str:
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized()
        return hash_key(key.strip())

    @staticmethod
    def mint(tenant: str) -> tuple[IssuedKey, KeyRow]:
        """A new key and the row that stores its hash; nothing is written yet."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        row = KeyRow(
            key_id="key_" + secrets.token_hex(8), tenant=tenant, key_hash=hash_key(key), created_at=time.time()
        )
        return IssuedKey(row.key_id, key, row.created_at), row

    def remember(self, row: KeyRow) -> None:
        """A key the catalog has stored now works here."""
        self._by_hash[row.key_hash] = row
        logger.info("issued key %s for tenant %s", row.key_id, row.tenant)

    async def issue(self, tenant: str) -> IssuedKey:
        issued, row = self.mint(tenant)
        await asyncio.to_thread(self._catalog.add_key, row)
        self.remember(row)
        return issued

    async def revoke(self, tenant: str, key_id: str) -> bool:
        if not await asyncio.to_thread(self._catalog.delete_key, tenant, key_id):
            return False
        self._by_hash = {h: row for h, row in self._by_hash.items() if row.key_id != key_id}
        logger.info("revoked key %s of tenant %s", key_id, tenant)
        return True

    def apply(self, keys: list[KeyRow]) -> None:
        """Take the catalog's keys, all of them, whichever process issued or revoked them."""
        self._by_hash = {row.key_hash: row for row in keys}

    def apply_changes(self, changes: dict[str, KeyRow | None]) -> None:
        """Take the catalog's rows for these key ids (None: revoked), whichever process wrote them."""
        if not changes:
            return
        by_hash = {h: row for h, row in self._by_hash.items() if row.key_id not in changes}
        by_hash.update((row.key_hash, row) for row in changes.values() if row is not None)
        self._by_hash = by_hash

    def forget_tenant(self, tenant: str) -> None:
        self._by_hash = {h: row for h, row in self._by_hash.items() if row.tenant != tenant}

    def keys_of(self, tenant: str) -> list[KeyRow]:
        return sorted((row for row in self._by_hash.values() if row.tenant == tenant), key=lambda r: r.created_at)
