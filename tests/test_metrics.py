"""Observability: /metrics parses and moves with the traffic (HTTP series per front end, job series from the
workers through Redis), and the JSON logs carry request and job ids but never a key or an image."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.settings import GatewayConfig
from tests.conftest import GatewayFactory, Processes, free_port, local_config, wait_http
from tests.fakes.openai import API_KEY, FakeOpenAI
from tests.test_jobs import Subscriber

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(http: aiohttp.ClientSession, url: str) -> Samples:
    async with http.get(url + "/metrics") as resp:
        assert resp.status == 200 and resp.content_type == "text/plain"
        text = await resp.text()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def keyed(config: GatewayConfig) -> GatewayConfig:
    return GatewayConfig.model_validate({**config.model_dump(), "keys": [
        {"name": "alice", "key": "sk-alice"},
        {"name": "once", "key": "sk-once", "limits": {"requests_per_minute": 1}}]})


async def post(http: aiohttp.ClientSession, url: str, key: str, **body: Any) -> int:
    async with http.post(url + "/v1/images/generations", json={"prompt": "m", "size": "64x64", **body},
                         headers={"Authorization": f"Bearer {key}"}) as resp:
        await resp.read()
        return resp.status


async def test_metrics_parse_and_count_the_traffic(gateway_factory: GatewayFactory,
                                                   http: aiohttp.ClientSession) -> None:
    gw = await gateway_factory(config=keyed(local_config(steps=20, step_delay=0.05)))
    before = await scrape(http, gw.url)
    assert value(before, "imagegw_socketio_subscribers") == 0
    statuses = [await post(http, gw.url, "sk-alice") for _ in range(3)]
    statuses += [await post(http, gw.url, "sk-alice", size="7x7x7"), await post(http, gw.url, "sk-once"),
                 await post(http, gw.url, "sk-once")]
    assert statuses == [200, 200, 200, 400, 200, 429]
    async with http.get(gw.url + "/no/such/route", headers={"Authorization": "Bearer sk-alice"}) as resp:
        assert resp.status == 404

    # a live subscription shows while it lasts
    async with http.post(gw.url + "/v1/images/generations", json={"prompt": "slow", "size": "64x64"},
                         headers={"Authorization": "Bearer sk-alice", "Prefer": "respond-async"}) as resp:
        job_id = (await resp.json())["id"]
    sub = Subscriber(gw.url, "sk-alice")
    await sub.connect()
    try:
        await sub.subscribe(job_id)
        during = await scrape(http, gw.url)
        await sub.wait(job_id)
    finally:
        await sub.client.disconnect()
    assert value(during, "imagegw_socketio_subscribers") == 1
    after = await scrape(http, gw.url)

    route = {"route": "/v1/images/generations", "method": "POST"}
    for status, count in (("200", 4), ("400", 1), ("429", 1), ("202", 1)):
        grew = value(after, "imagegw_http_requests_total", **route, status=status) - value(
            before, "imagegw_http_requests_total", **route, status=status)
        assert grew == count, status
    assert value(after, "imagegw_http_request_duration_seconds_count", **route) == 7
    assert value(after, "imagegw_http_requests_total", route="unmatched", method="GET", status="404") == 1
    assert value(after, "imagegw_http_requests_total", route="/metrics", method="GET", status="200") == 2
    job = {"model": "imagegw-local", "provider": "local"}
    assert value(after, "imagegw_jobs_total", **job, status="succeeded") == 5
    assert value(after, "imagegw_job_duration_seconds_count", **job) == 5
    assert value(after, "imagegw_job_duration_seconds_bucket", **job, le="+Inf") == 5
    assert value(after, "imagegw_job_duration_seconds_sum", **job) >= 4 * 20 * 0.05  # four 1-second jobs at least
    assert value(after, "imagegw_socketio_subscribers") == 0
    await gw.idle()


async def test_queue_depth_shows_waiting_jobs(gateway_factory: GatewayFactory, redis_url: str,
                                              http: aiohttp.ClientSession) -> None:
    gw = await gateway_factory(redis_url=redis_url)  # Redis mode without a worker: jobs wait
    for _ in range(3):
        async with http.post(gw.url + "/v1/images/generations", json={"prompt": "w", "size": "64x64"},
                             headers={"Prefer": "respond-async"}) as resp:
            assert resp.status == 202
    assert value(await scrape(http, gw.url), "imagegw_queue_depth") == 3


@pytest.fixture
async def fake() -> Any:
    async with FakeOpenAI() as server:
        yield server


async def test_worker_metrics_reach_every_front_end(processes: Processes, tmp_path: Path, redis_url: str,
                                                    http: aiohttp.ClientSession, fake: FakeOpenAI) -> None:
    config = tmp_path / "metrics.yaml"
    config.write_text(json.dumps({
        "providers": {"oa": {"type": "openai", "base_url": fake.base_url, "api_key_env": "METRICS_OPENAI_KEY"},
                      "local": {"type": "local"}},
        "models": {"gpt-image-1": {"family": "gpt-image", "deployments": [{"provider": "oa"}],
                                   "retry": {"attempts": 3, "backoff": 0.01}},
                   "imagegw-local": {"deployments": [{"provider": "local"}]}},
    }))
    processes.env.update({"IMAGEGW_REDIS_URL": redis_url, "IMAGEGW_CONFIG": str(config),
                          "METRICS_OPENAI_KEY": API_KEY, "IMAGEGW_SYNC_TIMEOUT": "30"})
    urls = []
    for _ in range(2):
        port = free_port()
        processes.start("serve", "--port", str(port))
        urls.append(f"http://127.0.0.1:{port}")
    processes.start("worker")
    for url in urls:
        await wait_http(url + "/healthz")
    fake.fail(500, times=2)  # two failed calls, then the third attempt succeeds
    assert await post(http, urls[0], "k", model="gpt-image-1", size="1024x1024") == 200
    assert await post(http, urls[0], "k", model="imagegw-local") == 200
    assert await post(http, urls[0], "k", model="gpt-image-1", size="7x7") == 400  # never a job

    for url in urls:  # the same cluster-wide counts, whichever front end is scraped
        samples = await scrape(http, url)
        assert value(samples, "imagegw_jobs_total", model="gpt-image-1", provider="oa", status="succeeded") == 1
        assert value(samples, "imagegw_jobs_total", model="imagegw-local", provider="local",
                     status="succeeded") == 1
        errors = {dict(labels)["kind"]: v for (name, labels), v in samples.items()
                  if name == "imagegw_upstream_errors_total" and dict(labels)["provider"] == "oa"}
        assert sum(errors.values()) == 2, errors
        assert value(samples, "imagegw_job_duration_seconds_count", model="gpt-image-1", provider="oa") == 1
    assert len(fake.image_calls) == 3


async def test_json_logs_carry_request_and_job_ids_never_keys_or_images(
        processes: Processes, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    config = tmp_path / "logs.yaml"
    secret = "sk-log-test-secret-0123456789"
    config.write_text(json.dumps({**local_config().model_dump(mode="json"),
                                  "keys": [{"name": "logger", "key": secret}]}))
    port = free_port()
    proc = processes.start("serve", "--port", str(port), extra_env={"IMAGEGW_CONFIG": str(config)})
    url = f"http://127.0.0.1:{port}"
    await wait_http(url + "/healthz")
    headers = {"Authorization": f"Bearer {secret}", "X-Request-ID": "trace-42"}
    async with http.post(url + "/v1/images/generations", json={"prompt": "a secret prompt", "size": "64x64"},
                         headers=headers) as resp:
        assert resp.status == 200 and resp.headers["X-Request-ID"] == "trace-42"
        image = (await resp.json())["data"][0]["b64_json"]
    async with http.get(url + "/v1/models", headers={"Authorization": "Bearer wrong",
                                                     "X-Request-ID": "bad id with spaces"}) as resp:
        assert resp.status == 401
        generated = resp.headers["X-Request-ID"]
        assert generated != "bad id with spaces" and len(generated) == 32

    await asyncio.sleep(0.3)
    text = processes.log(proc)
    entries = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert entries and len(entries) == len(text.splitlines())  # every line is one JSON object
    traced = [e for e in entries if e.get("request_id") == "trace-42"]
    access = [e for e in traced if e["logger"] == "imagegw.access"]
    assert len(access) == 1 and access[0]["status"] == 200 and access[0]["key_id"] == "logger"
    assert access[0]["route"] == "/v1/images/generations" and access[0]["duration_ms"] > 0
    created = [e for e in traced if e["message"] == "job created"]
    assert len(created) == 1 and len(created[0]["job_id"]) == 32 and created[0]["model"] == "imagegw-local"
    assert any(e.get("request_id") == generated and e.get("status") == 401 for e in entries)
    assert secret not in text and "Bearer" not in text and image[:40] not in text
    assert "a secret prompt" not in text
