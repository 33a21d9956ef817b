"""The progress baseline: a plain aiohttp WebSocket server fed by one Redis pub/sub channel.

`GET /ws/{job_id}` holds a connection for that job (answering "ok" once registered); every message published
on `PLAIN_CHANNEL` is sent as is to the connections of its job. It is what the gateway's Socket.IO path
does, minus Socket.IO, authentication and the job record: the floor for delivery latency and memory.

Run as `python -m bench.plain_ws PORT REDIS_URL`; prints "ready" once listening.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import defaultdict

from aiohttp import web
from redis.asyncio import Redis

from bench.subscribers import PLAIN_CHANNEL

SOCKETS = web.AppKey("sockets", defaultdict)


async def websocket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(heartbeat=25)
    await ws.prepare(request)
    job_sockets = request.app[SOCKETS][request.match_info["job_id"]]
    job_sockets.add(ws)
    await ws.send_str("ok")
    try:
        async for _ in ws:
            pass
    finally:
        job_sockets.discard(ws)
    return ws


async def relay(app: web.Application, redis_url: str, subscribed: asyncio.Event) -> None:
    redis = Redis.from_url(redis_url)
    async with redis.pubsub(ignore_subscribe_messages=True) as pubsub:
        await pubsub.subscribe(PLAIN_CHANNEL)
        subscribed.set()
        async for message in pubsub.listen():
            raw = message["data"].decode()
            for ws in list(app[SOCKETS].get(json.loads(raw)["job_id"], ())):
                await ws.send_str(raw)


async def serve(port: int, redis_url: str) -> None:
    app = web.Application()
    app[SOCKETS] = defaultdict(set)
    app.router.add_get("/ws/{job_id}", websocket)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    subscribed = asyncio.Event()
    task = asyncio.create_task(relay(app, redis_url, subscribed))
    await subscribed.wait()
    print("ready", flush=True)
    await task


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), sys.argv[2]))
