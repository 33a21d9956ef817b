"""API keys as data: the admin API, the `imagegw keys` command against a real Redis, and how each key is
honoured (or refused) by the API."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import aiohttp
import redis as redis_sync

from service.constants import API_KEY, API_KEY_IDS
from service.keys import key_hash
from service.settings import GatewayConfig
from tests.conftest import ROOT, GatewayFactory, local_config

ADMIN = "admin-token-for-tests"
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}
PROMPT = {"prompt": "a lighthouse", "size": "64x64"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def create_key(http: aiohttp.ClientSession, url: str, auth: dict[str, str] = ADMIN_AUTH,
                     **fields: Any) -> dict[str, Any]:
    async with http.post(url + "/admin/keys", json={"name": "test", **fields}, headers=auth) as resp:
        body: dict[str, Any] = await resp.json()
        assert resp.status == 201, body
        return body


async def generate(http: aiohttp.ClientSession, url: str, key: str, **body: Any) -> tuple[int, dict[str, Any]]:
    async with http.post(url + "/v1/images/generations", json={**PROMPT, **body}, headers=bearer(key)) as resp:
        return resp.status, await resp.json()


async def test_admin_api_creates_lists_changes_and_revokes_keys(gateway_factory: GatewayFactory,
                                                                 http: aiohttp.ClientSession) -> None:
    gw = await gateway_factory(admin_token=ADMIN)
    created = await create_key(http, gw.url, name="alice", owner="team-a", models=["imagegw-local"],
                               limits={"requests_per_minute": 50, "concurrent_jobs": 3}, image_budget=100)
    secret, key_id = created["key"], created["id"]
    assert secret.startswith("igw-") and created["prefix"] == secret[:10] and key_id.startswith("key_")
    assert created["owner"] == "team-a" and created["limits"]["requests_per_minute"] == 50
    assert created["capabilities"] == ["generate", "edit", "stream"] and created["enabled"] is True

    # the secret is never shown again
    async with http.get(gw.url + f"/admin/keys/{key_id}", headers=ADMIN_AUTH) as resp:
        shown = await resp.json()
        assert resp.status == 200 and "key" not in shown and secret not in json.dumps(shown)
        assert shown["images_used"] == 0
    async with http.get(gw.url + "/admin/keys", headers=ADMIN_AUTH) as resp:
        listed = await resp.json()
        assert [k["id"] for k in listed["data"]] == [key_id] and secret not in json.dumps(listed)

    status, body = await generate(http, gw.url, secret, n=2)
    assert status == 200 and len(body["data"]) == 2, body
    async with http.get(gw.url + f"/admin/keys/{key_id}", headers=ADMIN_AUTH) as resp:
        assert (await resp.json())["images_used"] == 2
    status, body = await generate(http, gw.url, secret, model="dall-e-3", size="1024x1024")
    assert status == 403 and body["error"]["code"] == "model_not_allowed"

    async with http.patch(gw.url + f"/admin/keys/{key_id}", json={"enabled": False}, headers=ADMIN_AUTH) as resp:
        assert resp.status == 200 and (await resp.json())["enabled"] is False
    status, body = await generate(http, gw.url, secret)
    assert status == 401 and body["error"]["code"] == "api_key_disabled"
    async with http.patch(gw.url + f"/admin/keys/{key_id}", json={"enabled": True, "expires_at": time.time() - 1},
                          headers=ADMIN_AUTH) as resp:
        assert resp.status == 200
    status, body = await generate(http, gw.url, secret)
    assert status == 401 and body["error"]["code"] == "api_key_expired"
    async with http.patch(gw.url + f"/admin/keys/{key_id}", json={"expires_at": None, "name": None},
                          headers=ADMIN_AUTH) as resp:
        assert resp.status == 400 and (await resp.json())["error"]["param"] == "name"
    async with http.patch(gw.url + f"/admin/keys/{key_id}", json={"expires_at": None}, headers=ADMIN_AUTH) as resp:
        assert resp.status == 200 and (await resp.json())["name"] == "alice"
    assert (await generate(http, gw.url, secret))[0] == 200

    async with http.delete(gw.url + f"/admin/keys/{key_id}", headers=ADMIN_AUTH) as resp:
        assert resp.status == 200 and await resp.json() == {"id": key_id, "object": "api_key", "deleted": True}
    status, body = await generate(http, gw.url, secret)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    for method in ("GET", "DELETE"):
        async with http.request(method, gw.url + f"/admin/keys/{key_id}", headers=ADMIN_AUTH) as resp:
            assert resp.status == 404 and (await resp.json())["error"]["code"] == "key_not_found"
    await gw.idle()


async def test_admin_api_needs_the_admin_token_or_capability(gateway_factory: GatewayFactory,
                                                             http: aiohttp.ClientSession) -> None:
    gw = await gateway_factory(admin_token=ADMIN)
    async with http.get(gw.url + "/admin/keys") as resp:
        assert resp.status == 401
    async with http.get(gw.url + "/admin/keys", headers=bearer("wrong")) as resp:
        assert resp.status == 401 and (await resp.json())["error"]["code"] == "invalid_api_key"
    user = await create_key(http, gw.url, name="user")
    async with http.post(gw.url + "/admin/keys", json={"name": "x"}, headers=bearer(user["key"])) as resp:
        assert resp.status == 403 and (await resp.json())["error"]["code"] == "admin_required"
    operator = await create_key(http, gw.url, name="operator", capabilities=["admin"])
    made = await create_key(http, gw.url, auth=bearer(operator["key"]), name="by-operator",
                            capabilities=["edit"])
    # an admin-only key cannot generate, an edit-only key cannot generate either
    for key in (operator["key"], made["key"]):
        status, body = await generate(http, gw.url, key)
        assert status == 403 and body["error"]["code"] == "capability_not_allowed", body
    # the admin token is not an image key
    status, body = await generate(http, gw.url, ADMIN)
    assert status == 403 and body["error"]["code"] == "capability_not_allowed"
    async with http.post(gw.url + "/admin/keys", json={"name": "x", "models": ["nope"]}, headers=ADMIN_AUTH) as resp:
        assert resp.status == 400 and (await resp.json())["error"]["param"] == "models"
    async with http.post(gw.url + "/admin/keys", json={"name": "x", "limits": {"requests_per_minute": 0}},
                         headers=ADMIN_AUTH) as resp:
        assert resp.status == 400 and (await resp.json())["error"]["param"] == "limits.requests_per_minute"


async def test_dev_mode_ends_with_the_first_key_and_config_keys_keep_working(
        gateway_factory: GatewayFactory, http: aiohttp.ClientSession) -> None:
    dev = await gateway_factory()
    assert (await generate(http, dev.url, "anything"))[0] == 200  # dev mode: no keys anywhere
    made = await create_key(http, dev.url, auth={})  # the dev caller may create the first key...
    status, body = await generate(http, dev.url, "anything")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"  # ...which ends dev mode at once
    assert (await generate(http, dev.url, made["key"]))[0] == 200

    config = local_config()
    config = GatewayConfig.model_validate({**config.model_dump(), "keys": [{"name": "static", "key": "sk-static"}]})
    gw = await gateway_factory(config=config, admin_token=ADMIN)
    stored = await create_key(http, gw.url, name="stored")
    assert (await generate(http, gw.url, "sk-static"))[0] == 200
    assert (await generate(http, gw.url, stored["key"]))[0] == 200
    async with http.get(gw.url + "/v1/models") as resp:
        assert resp.status == 401 and (await resp.json())["error"]["code"] == "missing_api_key"
    await dev.idle()
    await gw.idle()


def imagegw(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"IMAGEGW_REDIS_URL": redis_url, "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "service.cli", "keys", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


async def test_keys_command_creates_lists_and_revokes_in_redis(redis_url: str, gateway_factory: GatewayFactory,
                                                               http: aiohttp.ClientSession) -> None:
    made = imagegw(redis_url, "create", "--name", "cli", "--owner", "ops", "--model", "imagegw-local",
                   "--requests-per-minute", "7", "--capability", "generate", "--expires-in", "3600")
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)
    assert key["name"] == "cli" and key["limits"]["requests_per_minute"] == 7 and key["models"] == ["imagegw-local"]
    assert key["capabilities"] == ["generate"] and key["expires_at"] > time.time() + 3500
    assert "not kept" in made.stderr

    # in Redis: the record under the hash of the secret, never the secret
    raw = redis_sync.Redis.from_url(redis_url)
    digest = key_hash(key["key"])
    assert raw.hget(API_KEY_IDS, key["id"]) == digest.encode()
    stored = json.loads(raw.get(API_KEY.format(digest)) or b"{}")
    assert stored["id"] == key["id"] and key["key"] not in json.dumps(stored)
    assert all(key["key"].encode() not in (raw.get(k) or b"") for k in raw.keys() if raw.type(k) == b"string")

    listed = imagegw(redis_url, "list")
    assert listed.returncode == 0 and key["id"] in listed.stdout and "enabled" in listed.stdout
    assert key["key"] not in listed.stdout
    as_json = json.loads(imagegw(redis_url, "list", "--json").stdout)
    assert [k["id"] for k in as_json] == [key["id"]] and "webhook_secret" not in as_json[0]

    # a front end on the same Redis honours the key at once, and stops at once when it is revoked
    gw = await gateway_factory(redis_url=redis_url)
    async with http.get(gw.url + "/v1/models", headers=bearer(key["key"])) as resp:
        assert resp.status == 200
    revoked = imagegw(redis_url, "revoke", key["id"])
    assert revoked.returncode == 0 and f"revoked {key['id']}" in revoked.stdout
    async with http.get(gw.url + "/v1/models", headers=bearer(key["key"])) as resp:
        assert resp.status == 401
    again = imagegw(redis_url, "revoke", key["id"])
    assert again.returncode == 1 and "no key" in again.stderr
    assert imagegw(redis_url, "list").stdout == ""
    bad = imagegw(redis_url, "create", "--name", "x", "--queued-jobs", "0")
    assert bad.returncode == 2 and "queued_jobs" in bad.stderr
