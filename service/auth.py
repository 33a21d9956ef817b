"""Bearer API keys: who is calling, what they may do, and within which limits.

Three sources, checked in this order: the admin token (settings), keys of the config file (held as hashes in
memory), keys created through the admin API or `imagegw keys` (records in Redis, see service/keys.py).

Dev mode (every request accepted, as the single owner "dev", admin included) is on only while nothing could
authenticate anyone: no config keys, no admin token, and no key ever created in Redis. Creating the first
Redis key (through the dev caller's /admin/keys or `imagegw keys create`) ends it at once and for good:
revoking every key again does not reopen it. `imagegw serve` refuses a non-loopback address in dev mode.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
from dataclasses import dataclass, field

from pydantic import SecretStr

from service.errors import AuthenticationFailed, PermissionDenied
from service.keys import ApiKey, KeyStore, key_hash
from service.settings import DEFAULT_CAPABILITIES, KeyConfig, KeyLimits

log = logging.getLogger(__name__)

DEV_OWNER = "dev"
ADMIN_OWNER = "admin"
OWNER_PREFIX = "key:"
REDIS_KEY_ID = re.compile(r"^key_[0-9a-f]{16}$")


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. `owner` keys job ownership: a caller sees only its own jobs and files.
    `key_id` names the key in usage records and admin views (a Redis key's id, a config key's name)."""

    owner: str
    name: str
    key_id: str = DEV_OWNER
    models: frozenset[str] | None = None
    capabilities: frozenset[str] = frozenset(DEFAULT_CAPABILITIES)
    limits: KeyLimits = field(default_factory=lambda: KeyLimits())
    image_budget: int | None = None
    webhook_url: str | None = None
    webhook_secret: str | None = None

    @property
    def admin(self) -> bool:
        return "admin" in self.capabilities

    def check_model(self, model: str) -> None:
        if self.models is not None and model not in self.models:
            raise PermissionDenied(f"This API key may not use model '{model}'.", param="model",
                                   code="model_not_allowed")

    def require(self, capability: str) -> None:
        if capability not in self.capabilities:
            raise PermissionDenied(f"This API key lacks the '{capability}' capability.",
                                   code="capability_not_allowed")


def owner_of(key_id: str) -> str:
    return OWNER_PREFIX + key_id


def key_id_of(owner: str) -> str:
    """The key a job owner stands for: the inverse of `owner_of` (dev and admin stand for themselves)."""
    return owner.removeprefix(OWNER_PREFIX)


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return header.strip() if " " not in header.strip() else None


def config_principal(key: KeyConfig, webhook_secret: str | None) -> Principal:
    return Principal(owner=owner_of(key.name), name=key.name, key_id=key.name,
                     models=frozenset(key.models) if key.models else None,
                     capabilities=frozenset(key.capabilities), limits=key.limits,
                     image_budget=key.image_budget, webhook_url=key.webhook_url, webhook_secret=webhook_secret)


def stored_principal(key: ApiKey) -> Principal:
    return Principal(owner=owner_of(key.id), name=key.name, key_id=key.id,
                     models=frozenset(key.models) if key.models is not None else None,
                     capabilities=frozenset(key.capabilities), limits=key.limits,
                     image_budget=key.image_budget, webhook_url=key.webhook_url, webhook_secret=key.webhook_secret)


class KeyRing:
    """Every way to authenticate. Config keys are held only as SHA-256 hashes."""

    def __init__(self, keys: list[KeyConfig], admin_token: SecretStr | None = None,
                 webhook_secret: SecretStr | None = None) -> None:
        self._admin_token = admin_token.get_secret_value() if admin_token else None
        secret = webhook_secret.get_secret_value() if webhook_secret else None
        self._dev = Principal(owner=DEV_OWNER, name=DEV_OWNER, key_id=DEV_OWNER,
                              capabilities=frozenset({*DEFAULT_CAPABILITIES, "admin"}), webhook_secret=secret)
        self._admin = Principal(owner=ADMIN_OWNER, name=ADMIN_OWNER, key_id=ADMIN_OWNER,
                                capabilities=frozenset({"admin"}))
        self._by_hash: dict[str, Principal] = {}
        for key in keys:
            value = key.secret()
            if not value:
                raise ValueError(f"key {key.name!r}: environment variable {key.key_env!r} is not set")
            if REDIS_KEY_ID.match(key.name):
                raise ValueError(f"key {key.name!r}: names like key_<16 hex digits> are reserved for created keys")
            self._by_hash[key_hash(value)] = config_principal(key, secret)
        self.store: KeyStore | None = None  # the Redis keys, attached once Redis is open
        self._keys_seen = False

    @property
    def dev_mode_possible(self) -> bool:
        """Nothing configured could authenticate anyone: dev mode, until a key is created in Redis."""
        return not self._by_hash and self._admin_token is None

    async def dev_mode(self) -> bool:
        if not self.dev_mode_possible or self._keys_seen:
            return False
        if self.store is not None and await self.store.in_use():
            self._keys_seen = True  # dev mode never reopens: no need to ask Redis again
            return False
        return True

    async def resolve(self, token: str | None) -> Principal:
        """The caller behind `token`, or AuthenticationFailed saying why not."""
        if await self.dev_mode():
            return self._dev
        if token is None:
            raise AuthenticationFailed(
                "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.", code="missing_api_key"
            )
        if self._admin_token is not None and hmac.compare_digest(token.encode(), self._admin_token.encode()):
            return self._admin
        found = self._by_hash.get(key_hash(token))
        if found is not None:
            return found
        key = await self.store.by_secret(token) if self.store is not None else None
        if key is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        if not key.enabled:
            raise AuthenticationFailed("This API key has been disabled.", code="api_key_disabled")
        if key.expired(time.time()):
            raise AuthenticationFailed("This API key has expired.", code="api_key_expired")
        return stored_principal(key)

    async def lookup(self, token: str | None) -> Principal | None:
        try:
            return await self.resolve(token)
        except AuthenticationFailed:
            return None

    async def authenticate(self, header: str | None) -> Principal:
        token = bearer_token(header)
        # a malformed header is a wrong key (refused unless in dev mode), not a missing one
        return await self.resolve("" if header and token is None else token)
