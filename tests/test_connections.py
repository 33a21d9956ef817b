"""Redis clients of Redis mode: the URL's scheme picks the connection class, commands are packed by hiredis."""

from __future__ import annotations

import pytest
from redis.asyncio.connection import Connection

from service.connections import RedisFactory
from service.settings import Settings

ARGS = [
    ("EVALSHA", "a" * 40, 2, "imagegw:job:1", "arq:queue", 3600, 1.5, -7, 10**20, 1e-7, "ké", b"\x00\xff"),
    ("CONFIG GET", "maxmemory"),  # a two-word command name is sent as two arguments
    (b"CLIENT SETNAME", b"imagegw"),
    ("SET", "key", memoryview(b"payload")),
]


@pytest.mark.parametrize("url, scheme_class", [
    ("redis://127.0.0.1:6379/0", "Connection"),
    ("rediss://127.0.0.1:6379/0", "SSLConnection"),
    ("unix:///run/redis.sock", "UnixDomainSocketConnection"),
])
async def test_clients_keep_the_url_scheme_and_pack_like_redis_py(url: str, scheme_class: str) -> None:
    redis = RedisFactory(Settings(_env_file=None, redis_url=url))()
    connection = redis.connection_pool.make_connection()  # type: ignore[no-untyped-call]
    assert scheme_class in [cls.__name__ for cls in type(connection).__mro__]
    reference = Connection()  # redis-py's own asyncio packer
    for args in ARGS:
        assert b"".join(connection.pack_command(*args)) == b"".join(reference.pack_command(*args))
    await redis.aclose()


async def test_scripts_round_trip_through_the_packed_connection(redis_url: str) -> None:
    redis = RedisFactory(Settings(_env_file=None, redis_url=redis_url))()
    try:
        echo = redis.register_script("return {KEYS[1], ARGV[1], ARGV[2], ARGV[3]}")
        assert await echo(keys=["imagegw:job:x"], args=["ké", 1.5, 42]) == [
            b"imagegw:job:x", "ké".encode(), b"1.5", b"42"]
    finally:
        await redis.aclose()
