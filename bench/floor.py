"""The floor under the inline path: the same round trips, made with the same libraries, with none of the
gateway's own work.

An aiohttp handler on uvloop that reads the JSON body, runs one small Lua script (a job hash, a counter), calls
the upstream with aiohttp's client, decodes the image, writes it to a file (written, then renamed), runs a second
small script (the hash updated, the counter back, an event published) and answers `b64_json`. Nothing is
authenticated, validated, checked, accounted or logged: whatever the gateway costs above this is its own code.

Run as `python -m bench.floor PORT UPSTREAM_URL REDIS_URL FOLDER`; prints "ready" once listening.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
import time

import pybase64
import uvloop
from aiohttp import ClientSession, web
from redis.asyncio import Redis

ADMIT = """
redis.call('HSET', KEYS[1], 'status', 'running', 'model', ARGV[1], 'created_at', ARGV[2])
redis.call('PEXPIRE', KEYS[1], 3600000)
return redis.call('INCR', KEYS[2])
"""
FINISH = """
redis.call('HSET', KEYS[1], 'status', 'succeeded', 'image', ARGV[1])
redis.call('DECR', KEYS[2])
return redis.call('PUBLISH', KEYS[3], ARGV[2])
"""


async def serve(port: int, upstream: str, redis_url: str, folder: str) -> None:
    redis = Redis.from_url(redis_url)
    admit, finish = redis.register_script(ADMIT), redis.register_script(FINISH)
    http = ClientSession()

    async def generate(request: web.Request) -> web.Response:
        body = await request.json()
        job = secrets.token_hex(16)
        keys = [f"bench:floor:{job}", "bench:floor:running"]
        await admit(keys=keys, args=[body["model"], time.time()])
        async with http.post(upstream + "/v1/images/generations", json={**body, "model": "gpt-image-1"},
                             headers={"Authorization": "Bearer sk-bench-upstream"}) as resp:
            answer = await resp.json()
        image = pybase64.b64decode(answer["data"][0]["b64_json"])
        path = os.path.join(folder, job + ".png")
        fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            os.write(fd, image)
        finally:
            os.close(fd)
        os.replace(path + ".tmp", path)
        await finish(keys=[*keys, "bench:floor:events"], args=[path, job])
        return web.json_response({"created": int(time.time()),
                                  "data": [{"b64_json": pybase64.b64encode_as_string(image)}]})

    app = web.Application()
    app.router.add_post("/v1/images/generations", generate)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    port, upstream, redis_url, folder = sys.argv[1:5]
    uvloop.run(serve(int(port), upstream, redis_url, folder))
