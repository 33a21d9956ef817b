"""Isolation between keys: another key's job, files, events and usage look exactly like missing ones."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
import socketio

from service.state import HUB
from tests.conftest import Gateway, GatewayFactory, local_config
from tests.test_jobs import Subscriber

ADMIN = {"Authorization": "Bearer isolation-admin"}


async def new_key(http: aiohttp.ClientSession, gw: Gateway, name: str) -> tuple[str, str]:
    """(secret, id) of a new key."""
    async with http.post(gw.url + "/admin/keys", json={"name": name}, headers=ADMIN) as resp:
        assert resp.status == 201
        key = await resp.json()
        return key["key"], key["id"]


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def answer(resp: aiohttp.ClientResponse) -> tuple[int, Any]:
    return resp.status, await resp.json() if resp.content_type == "application/json" else await resp.read()


async def test_a_key_cannot_reach_another_keys_jobs_files_events_or_usage(gateway_factory: GatewayFactory,
                                                                          http: aiohttp.ClientSession) -> None:
    gw = await gateway_factory(config=local_config(steps=40, step_delay=0.1), admin_token="isolation-admin")
    (alice, _), (bob, bob_id) = await new_key(http, gw, "alice"), await new_key(http, gw, "bob")
    body = {"prompt": "bob's secret", "size": "64x64", "response_format": "url"}
    async with http.post(gw.url + "/v1/images/generations", json=body, headers=auth(bob)) as resp:
        done = await resp.json()
        assert resp.status == 200
    job_id, file_name = done["data"][0]["url"].split("/v1/files/")[1].split("?")[0].split("/")
    async with http.post(gw.url + "/v1/images/generations", json={"prompt": "slow", "size": "64x64"},
                         headers={**auth(bob), "Prefer": "respond-async"}) as resp:
        running_id = (await resp.json())["id"]

    missing = "0" * 32
    for target in (job_id, running_id):
        # reading and cancelling: the same 404 as for a job that does not exist
        async with http.get(gw.url + f"/v1/images/jobs/{target}", headers=auth(alice)) as resp:
            status, theirs = await answer(resp)
        async with http.get(gw.url + f"/v1/images/jobs/{missing}", headers=auth(alice)) as resp:
            _, nothing = await answer(resp)
        assert status == 404 and theirs["error"] == {**nothing["error"],
                                                      "message": nothing["error"]["message"].replace(missing, target)}
        async with http.delete(gw.url + f"/v1/images/jobs/{target}", headers=auth(alice)) as resp:
            status, body = await answer(resp)
            assert status == 404 and body["error"]["code"] == "job_not_found"
    async with http.get(gw.url + f"/v1/images/jobs/{running_id}", headers=auth(bob)) as resp:
        assert resp.status == 200 and (await resp.json())["status"] in ("queued", "running")  # not cancelled

    # files: without a signature only the owner's key opens them
    file_url = gw.url + f"/v1/files/{job_id}/{file_name}"
    async with http.get(file_url, headers=auth(alice)) as resp:
        status, body = await answer(resp)
        assert status == 404 and body["error"]["code"] == "job_not_found"
    async with http.get(file_url) as resp:
        assert resp.status == 401
    async with http.get(file_url, headers=auth(bob)) as resp:
        assert resp.status == 200 and resp.content_type == "image/png"

    # events: alice's subscription to bob's job is refused like one to a missing job, and nothing arrives
    sub = Subscriber(gw.url, alice)
    await sub.connect()
    try:
        for target in (running_id, job_id):
            ack = await sub.subscribe(target)
            assert ack["error"]["code"] == "not_found" and ack["error"]["param"] == "job_id"
        await asyncio.sleep(0.3)
        assert sub.events == {}
        assert gw.app[HUB].subscriber_count == 0
    finally:
        await sub.client.disconnect()

    async with http.delete(gw.url + f"/v1/images/jobs/{running_id}", headers=auth(bob)) as resp:
        assert resp.status == 200 and (await resp.json())["status"] == "cancelled"

    # usage: alice sees her own (nothing), never bob's
    async with http.get(gw.url + "/v1/usage", headers=auth(alice)) as resp:
        mine = await resp.json()
        assert resp.status == 200 and mine["totals"]["jobs"] == 0
    async with http.get(gw.url + "/v1/usage", params={"key": bob_id}, headers=auth(alice)) as resp:
        assert resp.status == 404
    async with http.get(gw.url + "/v1/usage", params={"key": bob_id}, headers=ADMIN) as resp:
        totals = (await resp.json())["totals"]
        assert resp.status == 200 and (totals["jobs"], totals["images"]) == (2, 1)
    await gw.idle()


@pytest.mark.parametrize("credentials", [None, {"api_key": "igw-not-a-key"}, {"api_key": "revoked"}])
async def test_socketio_refuses_connections_without_a_valid_key(gateway_factory: GatewayFactory,
                                                                http: aiohttp.ClientSession,
                                                                credentials: dict[str, str] | None) -> None:
    gw = await gateway_factory(admin_token="isolation-admin")
    if credentials == {"api_key": "revoked"}:
        key, key_id = await new_key(http, gw, "soon-gone")
        async with http.delete(gw.url + f"/admin/keys/{key_id}", headers=ADMIN) as resp:
            assert resp.status == 200
        credentials = {"api_key": key}
    client = socketio.AsyncClient()
    with pytest.raises(socketio.exceptions.ConnectionError):
        await client.connect(gw.url, namespaces=["/image-progress"], auth=credentials, transports=["websocket"],
                             wait_timeout=5)
    await client.disconnect()
