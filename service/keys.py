"""API keys as data in Redis: a record per key under the SHA-256 of its secret, which itself is never stored.

Layout: `API_KEY.format(sha256)` holds the record as JSON (one GET per authenticated request), and the hash
`API_KEY_IDS` maps each key id to its SHA-256 for the admin operations, which address keys by id.
`API_KEYS_IN_USE` is set with the first key and never cleared: it ends dev mode (see service/auth.py).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Literal

from arq.connections import ArqRedis
from pydantic import BaseModel, ConfigDict, Field

from service.constants import API_KEY, API_KEY_IDS, API_KEYS_IN_USE
from service.settings import DEFAULT_CAPABILITIES, Capability, KeyLimits

SECRET_PREFIX = "igw-"


def key_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key_id() -> str:
    return "key_" + secrets.token_hex(8)


class KeyFields(BaseModel):
    """What an admin sets on a key: the body of `POST /admin/keys` (and, all optional, of PATCH)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    owner: str | None = Field(None, max_length=200, description="who the key is for: person, team, customer")
    models: list[str] | None = Field(None, description="models the key may use; unset = all")
    capabilities: list[Capability] = list(DEFAULT_CAPABILITIES)
    limits: KeyLimits = KeyLimits()
    image_budget: int | None = Field(None, ge=0, description="images the key may make in all; unset: no cap")
    webhook_url: str | None = Field(None, description="default completion webhook of the key's jobs")
    expires_at: float | None = Field(None, description="unix time after which the key is refused")
    enabled: bool = True


class KeyUpdate(BaseModel):
    """`PATCH /admin/keys/{id}`: only the fields sent change (send null to clear an optional one)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, min_length=1, max_length=200)
    owner: str | None = Field(None, max_length=200)
    models: list[str] | None = None
    capabilities: list[Capability] | None = None
    limits: KeyLimits | None = None
    image_budget: int | None = Field(None, ge=0)
    webhook_url: str | None = None
    expires_at: float | None = None
    enabled: bool | None = None


class ApiKey(KeyFields):
    """A stored key. `prefix` (the secret's first characters) lets people tell their keys apart; the
    webhook secret signs the key's completion webhooks and is not a credential for the API."""

    id: str
    prefix: str
    created_at: float
    webhook_secret: str

    def expired(self, now: float | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or time.time())


class KeyStore:
    """CRUD over the Redis key records."""

    def __init__(self, redis: ArqRedis) -> None:
        self.redis = redis

    async def create(self, fields: KeyFields) -> tuple[ApiKey, str]:
        """Store a new key; returns it with its secret, which exists nowhere else from now on."""
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        key = ApiKey(id=new_key_id(), prefix=secret[:10], created_at=time.time(),
                     webhook_secret="whsec_" + secrets.token_urlsafe(24), **fields.model_dump())
        digest = key_hash(secret)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(API_KEY.format(digest), key.model_dump_json())
            pipe.hset(API_KEY_IDS, key.id, digest)
            pipe.set(API_KEYS_IN_USE, "1")
            await pipe.execute()
        return key, secret

    async def in_use(self) -> bool:
        """Whether a key was ever created here (revoking every key does not reopen dev mode)."""
        return bool(await self.redis.exists(API_KEYS_IN_USE))

    async def by_secret(self, secret: str) -> ApiKey | None:
        raw = await self.redis.get(API_KEY.format(key_hash(secret)))
        return ApiKey.model_validate_json(raw) if raw else None

    async def get(self, key_id: str) -> ApiKey | None:
        digest = await self.redis.hget(API_KEY_IDS, key_id)  # type: ignore[misc]
        if digest is None:
            return None
        raw = await self.redis.get(API_KEY.format(digest.decode()))
        return ApiKey.model_validate_json(raw) if raw else None

    async def list(self) -> list[ApiKey]:
        digests = await self.redis.hvals(API_KEY_IDS)  # type: ignore[misc]
        if not digests:
            return []
        raws = await self.redis.mget([API_KEY.format(d.decode()) for d in digests])
        keys = [ApiKey.model_validate_json(raw) for raw in raws if raw]
        return sorted(keys, key=lambda k: k.created_at)

    async def update(self, key_id: str, update: KeyUpdate) -> ApiKey | None:
        """Apply the fields sent; last writer wins, and a key deleted meanwhile stays deleted (SET XX)."""
        digest = await self.redis.hget(API_KEY_IDS, key_id)  # type: ignore[misc]
        current = await self.get(key_id)
        if digest is None or current is None:
            return None
        changed = current.model_copy(update=update.model_dump(exclude_unset=True))
        key = ApiKey.model_validate(changed.model_dump())  # re-validate the merged record
        if not await self.redis.set(API_KEY.format(digest.decode()), key.model_dump_json(), xx=True):
            return None
        return key

    async def delete(self, key_id: str) -> bool:
        digest = await self.redis.hget(API_KEY_IDS, key_id)  # type: ignore[misc]
        if digest is None:
            return False
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(API_KEY.format(digest.decode()))
            pipe.hdel(API_KEY_IDS, key_id)
            await pipe.execute()
        return True


class KeyView(ApiKey):
    """A key as the admin API shows it: everything but the secret, plus the images charged to its budget."""

    object: Literal["api_key"] = "api_key"
    images_used: int = 0


class CreatedKey(KeyView):
    """The answer to creating a key: the only time its secret is shown."""

    key: str


class KeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[KeyView]


class DeletedKey(BaseModel):
    id: str
    object: Literal["api_key"] = "api_key"
    deleted: bool = True
