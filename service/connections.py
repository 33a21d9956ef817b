"""Redis connections for both modes, and the shared secrets kept in Redis."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from arq.connections import ArqRedis
from fakeredis import FakeServer
from fakeredis.aioredis import FakeAsyncRedisMixin
from redis.asyncio.connection import AbstractConnection, Connection, SSLConnection, UnixDomainSocketConnection
from redis.connection import HiredisRespSerializer

from service.constants import SIGNING_SECRET_KEY
from service.settings import Settings
from service.storage import LocalStorage, Storage, UrlSigner, sweep_forever


class EmbeddedRedis(FakeAsyncRedisMixin, ArqRedis):  # type: ignore[misc]
    """arq's Redis client on an in-memory server: embedded mode runs the same code as Redis mode."""


class _HiredisPacking:
    """redis-py's asyncio connections pack commands in Python, its sync ones with hiredis's C packer: the same
    bytes, several times faster for the many-argument scripts every job move sends (73 -> 10 us here)."""

    _packer = HiredisRespSerializer()

    def pack_command(self, *args: Any) -> list[bytes]:
        packed: list[bytes] = self._packer.pack(*args)
        return packed


class _PackedConnection(_HiredisPacking, Connection):
    pass


class _PackedSSLConnection(_HiredisPacking, SSLConnection):
    pass


class _PackedUnixConnection(_HiredisPacking, UnixDomainSocketConnection):
    pass


_PACKED: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: _PackedConnection, SSLConnection: _PackedSSLConnection,
    UnixDomainSocketConnection: _PackedUnixConnection,
}


class RedisFactory:
    """Makes Redis clients for one process: on `IMAGEGW_REDIS_URL`, or on one in-memory server."""

    def __init__(self, settings: Settings) -> None:
        self.url = settings.redis_url
        self.server = FakeServer() if self.url is None else None

    def __call__(self) -> ArqRedis:
        if self.server is not None:
            return EmbeddedRedis(server=self.server, lua_modules=set())
        assert self.url is not None
        redis: ArqRedis = ArqRedis.from_url(self.url, socket_connect_timeout=2, health_check_interval=10)
        pool = redis.connection_pool  # the URL's scheme chose the connection class: keep it, packing faster
        pool.connection_class = _PACKED.get(pool.connection_class, pool.connection_class)
        return redis


async def signing_secret(settings: Settings, redis: ArqRedis) -> bytes:
    """The URL-signing secret: from settings, or generated once and shared by every process through Redis."""
    if settings.signing_secret is not None:
        return settings.signing_secret.get_secret_value().encode()
    await redis.set(SIGNING_SECRET_KEY, secrets.token_hex(32), nx=True)
    value = await redis.get(SIGNING_SECRET_KEY)
    assert value is not None
    return bytes(value)


@asynccontextmanager
async def open_storage(settings: Settings, redis: ArqRedis) -> AsyncIterator[Storage]:
    """The storage back end `settings.storage` names, open for the life of the block."""
    async with AsyncExitStack() as stack:
        storage: Storage
        if settings.storage == "s3":
            from service.storage_s3 import open_s3_storage  # botocore is slow to import; only S3 users pay

            storage = await stack.enter_async_context(open_s3_storage(settings, redis))
        else:
            storage = LocalStorage(settings.data_dir / "files",
                                   UrlSigner(await signing_secret(settings, redis), settings.url_ttl))
        sweeper = asyncio.create_task(sweep_forever(storage, redis, settings))
        try:
            yield storage
        finally:
            sweeper.cancel()
            await asyncio.gather(sweeper, return_exceptions=True)
