"""Completion webhooks: signed, retried with backoff until a 2xx, attempts on the job, the URL rules."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from service.settings import GatewayConfig
from tests.conftest import Gateway, GatewayFactory, local_config

ADMIN = {"Authorization": "Bearer webhook-admin"}


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    answered: int


@dataclass
class Receiver:
    """A webhook receiver answering with the statuses scripted in `answers` (then 200), recording every call."""

    answers: list[int] = field(default_factory=list)
    calls: list[Delivery] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def handle(self, request: web.Request) -> web.Response:
        status = self.answers.pop(0) if self.answers else 200
        self.calls.append(Delivery(dict(request.headers), await request.read(), status))
        return web.Response(status=status, text="ok" if status == 200 else "nope")

    async def wait_for(self, count: int) -> None:
        deadline = time.monotonic() + 20.0
        while len(self.calls) < count:
            assert time.monotonic() < deadline, f"{len(self.calls)} deliveries, expected {count}"
            await asyncio.sleep(0.02)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()
    app = web.Application()
    app.router.add_post("/hook", found.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    found.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield found
    await runner.cleanup()


async def webhook_gateway(gateway_factory: GatewayFactory, config: GatewayConfig | None = None,
                          **settings: Any) -> Gateway:
    values = {"admin_token": "webhook-admin", "webhook_backoff": 0.2, "fetch_allowed_networks": ["127.0.0.0/8"],
              **settings}
    return await gateway_factory(config=config, **values)


async def new_key(http: aiohttp.ClientSession, gw: Gateway, **fields: Any) -> dict[str, Any]:
    async with http.post(gw.url + "/admin/keys", json={"name": "hooked", **fields}, headers=ADMIN) as resp:
        assert resp.status == 201
        key: dict[str, Any] = await resp.json()
        return key


async def job_when(http: aiohttp.ClientSession, gw: Gateway, key: str, job_id: str, status: str) -> dict[str, Any]:
    for _ in range(500):
        async with http.get(gw.url + f"/v1/images/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"}) as r:
            job: dict[str, Any] = await r.json()
        if job.get("webhook", {}).get("status") == status:
            return job
        await asyncio.sleep(0.02)
    raise AssertionError(f"webhook never {status}: {job}")


def verify(secret: str, delivery: Delivery) -> bool:
    timestamp = delivery.headers["X-Imagegw-Timestamp"]
    expected = hmac.new(secret.encode(), timestamp.encode() + b"." + delivery.body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(delivery.headers["X-Imagegw-Signature"], "v1=" + expected)


async def test_receiver_failing_twice_gets_exactly_one_signed_accepted_delivery(
        gateway_factory: GatewayFactory, http: aiohttp.ClientSession, receiver: Receiver) -> None:
    gw = await webhook_gateway(gateway_factory)
    key = await new_key(http, gw)
    receiver.answers = [500, 503]
    body = {"prompt": "a bell", "size": "64x64", "webhook_url": receiver.url}
    async with http.post(gw.url + "/v1/images/generations", json=body,
                         headers={"Authorization": f"Bearer {key['key']}", "Prefer": "respond-async"}) as resp:
        accepted = await resp.json()
        assert resp.status == 202 and accepted["webhook"] == {"url": receiver.url, "status": "pending",
                                                              "attempts": []}
    job = await job_when(http, gw, key["key"], accepted["id"], "delivered")
    await asyncio.sleep(0.6)  # longer than the next backoff: nothing more may arrive

    assert [c.answered for c in receiver.calls] == [500, 503, 200]
    assert [a["status"] for a in job["webhook"]["attempts"]] == [500, 503, 200]
    assert job["webhook"]["attempts"][0]["error"] == "not a 2xx answer" and "error" not in job["webhook"]["attempts"][2]
    attempts = job["webhook"]["attempts"]
    gaps = [b["at"] - a["at"] for a, b in zip(attempts, attempts[1:], strict=False)]
    assert gaps[0] >= 0.19 and gaps[1] >= 0.39, gaps  # backoff 0.2 s, doubled
    accepted_delivery = receiver.calls[-1]
    assert verify(key["webhook_secret"], accepted_delivery)
    assert not verify("whsec_someone-else", accepted_delivery)
    assert accepted_delivery.headers["X-Imagegw-Event"] == "job.succeeded"
    assert accepted_delivery.headers["Content-Type"] == "application/json"
    assert abs(int(accepted_delivery.headers["X-Imagegw-Timestamp"]) - time.time()) < 30
    sent = json.loads(accepted_delivery.body)
    assert sent["id"] == accepted["id"] and sent["status"] == "succeeded" and sent["object"] == "image.job"
    # results go as signed links, whatever the request asked for
    assert sent["result"]["data"][0]["url"].startswith(gw.url + f"/v1/files/{accepted['id']}/0.png?")
    async with http.get(sent["result"]["data"][0]["url"]) as resp:
        assert resp.status == 200 and resp.content_type == "image/png"
    # a tampered body does not verify
    assert not verify(key["webhook_secret"], Delivery(accepted_delivery.headers,
                                                      accepted_delivery.body.replace(b"succeeded", b"failed"), 200))
    await gw.idle()


async def test_key_default_webhook_and_cancelled_jobs(gateway_factory: GatewayFactory, http: aiohttp.ClientSession,
                                                      receiver: Receiver) -> None:
    gw = await webhook_gateway(gateway_factory, config=local_config(steps=50, step_delay=0.05))
    key = await new_key(http, gw, webhook_url=receiver.url)
    auth = {"Authorization": f"Bearer {key['key']}", "Prefer": "respond-async"}
    async with http.post(gw.url + "/v1/images/generations", json={"prompt": "slow", "size": "64x64"},
                         headers=auth) as resp:
        job_id = (await resp.json())["id"]
    async with http.delete(gw.url + f"/v1/images/jobs/{job_id}", headers=auth) as resp:
        assert resp.status == 200 and (await resp.json())["status"] == "cancelled"
    job = await job_when(http, gw, key["key"], job_id, "delivered")
    assert len(receiver.calls) == 1 and receiver.calls[0].headers["X-Imagegw-Event"] == "job.cancelled"
    assert json.loads(receiver.calls[0].body)["error"]["code"] == "job_cancelled"
    assert job["webhook"]["url"] == receiver.url and verify(key["webhook_secret"], receiver.calls[0])
    await gw.idle()


async def test_webhook_urls_follow_the_fetch_rules(gateway_factory: GatewayFactory, http: aiohttp.ClientSession,
                                                   receiver: Receiver) -> None:
    gw = await webhook_gateway(gateway_factory, fetch_allowed_networks=[], webhook_retry_for=0.5)
    key = await new_key(http, gw)
    auth = {"Authorization": f"Bearer {key['key']}", "Prefer": "respond-async"}

    async def submit(url: str) -> tuple[int, dict[str, Any]]:
        body = {"prompt": "p", "size": "64x64", "webhook_url": url}
        async with http.post(gw.url + "/v1/images/generations", json=body, headers=auth) as resp:
            return resp.status, await resp.json()

    for url, code in ((receiver.url, "webhook_url_forbidden"), ("http://10.1.2.3/x", "webhook_url_forbidden"),
                      ("http://[::1]:9/x", "webhook_url_forbidden"), ("ftp://example.com/x", "invalid_webhook_url"),
                      ("not a url", "invalid_webhook_url")):
        status, body = await submit(url)
        assert status == 400 and body["error"]["code"] == code and body["error"]["param"] == "webhook_url", url
    # a name is checked on the addresses it resolves to when delivering: refused, nothing reaches the receiver
    status, body = await submit(f"http://localhost:{receiver.port}/hook")
    assert status == 202
    job = await job_when(http, gw, key["key"], body["id"], "failed")
    assert receiver.calls == []
    assert all("forbidden address" in a["error"] and "status" not in a for a in job["webhook"]["attempts"])

    # config-file keys sign with IMAGEGW_WEBHOOK_SECRET; without one, webhooks are refused up front
    config = GatewayConfig.model_validate({**local_config().model_dump(), "keys": [{"name": "s", "key": "sk-s"}]})
    plain = await webhook_gateway(gateway_factory, config=config)
    async with http.post(plain.url + "/v1/images/generations", headers={"Authorization": "Bearer sk-s"},
                         json={"prompt": "p", "size": "64x64", "webhook_url": receiver.url}) as resp:
        assert resp.status == 400 and (await resp.json())["error"]["code"] == "webhooks_not_enabled"
    signed = await webhook_gateway(gateway_factory, config=config, webhook_secret="global-secret")
    async with http.post(signed.url + "/v1/images/generations", headers={"Authorization": "Bearer sk-s"},
                         json={"prompt": "p", "size": "64x64", "webhook_url": receiver.url}) as resp:
        assert resp.status == 200
    await receiver.wait_for(1)
    assert verify("global-secret", receiver.calls[0])
    await gw.idle()
    await signed.idle()
