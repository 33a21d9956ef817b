"""Upstream faults under a real cluster: slow, rate-limiting, failing, resetting, corrupting, dying and silent
upstreams each end in a clear failure or a successful fallback, within the configured time, with every
accepted job accounted for once. One cluster serves the module; each scenario has models and fakes of its
own, so a cooldown or a script of one scenario never reaches another."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from PIL import Image

from tests.fakes.comfyui import FakeComfyUI
from tests.fakes.gemini import API_KEY as GEMINI_KEY
from tests.fakes.gemini import FakeGemini
from tests.fakes.openai import API_KEY as OPENAI_KEY
from tests.fakes.openai import FakeOpenAI
from tests.faults.harness import AUTH, CLIENT_TIMEOUT, Cluster, LoopThread, running_cluster
from tests.test_comfyui import TXT2IMG, TXT2IMG_INPUTS

FAST_RETRY = {"attempts": 3, "backoff": 0.05, "max_backoff": 0.1, "cooldown": 30}
OPENAI_FAKES = ("slow", "slow_fallback", "slow_alone", "storm", "storm_alone", "flaky", "broken", "resets",
                "resets_alone", "corrupt", "corrupt_fallback", "corrupt_alone")


class Upstreams:
    """Every fake of the module, by scenario, served from the loop thread."""

    def __init__(self, loop: LoopThread) -> None:
        self.loop = loop
        self.openai = {name: loop.run(FakeOpenAI().__aenter__()) for name in OPENAI_FAKES}
        self.gemini = loop.run(FakeGemini().__aenter__())
        self.comfy_dies = FakeComfyUI(step_delay=0.1)
        self.comfy_hangs = FakeComfyUI(hang=True)
        for comfy in (self.comfy_dies, self.comfy_hangs):
            loop.run(comfy.start())
        self.silent: asyncio.Server = loop.run(asyncio.start_server(_never_answer, "127.0.0.1", 0))
        self.silent_url = f"http://127.0.0.1:{self.silent.sockets[0].getsockname()[1]}"

    def close(self) -> None:
        for fake in self.openai.values():
            self.loop.run(fake.__aexit__(None, None, None))
        self.loop.run(self.gemini.__aexit__(None, None, None))
        for comfy in (self.comfy_dies, self.comfy_hangs):
            self.loop.run(comfy.stop())  # stopping a stopped one is harmless
        self.silent.close()


async def _never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A server that accepts connections and reads requests but never says a word."""
    while await reader.read(65536):
        pass
    writer.close()


def openai_model(*fakes: str, timeout: float = 10, retry: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"family": "gpt-image", "timeout": timeout, "retry": retry or FAST_RETRY,
            "deployments": [{"provider": name, "model": "gpt-image-1"} for name in fakes]}


def comfy_model(provider: str, timeout: float) -> dict[str, Any]:
    return {"family": "generic", "timeout": timeout, "retry": {"attempts": 1},
            "deployments": [{"provider": provider, "options": {"workflow": str(TXT2IMG),
                                                                "inputs": TXT2IMG_INPUTS}}]}


def cluster_config(up: Upstreams) -> dict[str, Any]:
    providers: dict[str, Any] = {name: {"type": "openai", "base_url": fake.base_url,
                                        "api_key_env": "FAKE_OPENAI_KEY"}
                                 for name, fake in up.openai.items()}
    providers["slow"]["timeout"] = providers["slow_alone"]["timeout"] = 0.8
    providers["gemini"] = {"type": "gemini", "base_url": up.gemini.url, "api_key_env": "FAKE_GEMINI_KEY"}
    providers["local"] = {"type": "local", "options": {"steps": 1}}
    for name, url in (("comfy_dies", up.comfy_dies.url), ("comfy_hangs", up.comfy_hangs.url),
                      ("comfy_silent", up.silent_url)):
        providers[name] = {"type": "comfyui", "options": {"instances": [url], "reconnect_window": 0.5,
                                                          "request_timeout": 1.0}}
    return {
        "providers": providers,
        "models": {
            "local": {"family": "generic", "deployments": [{"provider": "local"}]},
            "slow": openai_model("slow", "slow_fallback"),
            "slow-alone": openai_model("slow_alone", timeout=2),
            "storm": {**openai_model("storm"), "deployments": [{"provider": "storm", "model": "gpt-image-1"},
                                                               {"provider": "gemini",
                                                                "model": "gemini-2.5-flash-image"}]},
            "storm-alone": openai_model("storm_alone", timeout=5),
            "flaky": openai_model("flaky", retry={**FAST_RETRY, "cooldown": 0}),
            "broken": openai_model("broken"),
            "resets": openai_model("resets", retry={**FAST_RETRY, "cooldown": 0}),
            "resets-alone": openai_model("resets_alone"),
            "corrupt": openai_model("corrupt", "corrupt_fallback"),
            "corrupt-alone": openai_model("corrupt_alone", retry={**FAST_RETRY, "attempts": 2}),
            "comfy-dies": comfy_model("comfy_dies", timeout=30),
            "comfy-hangs": comfy_model("comfy_hangs", timeout=2),
            "comfy-silent": comfy_model("comfy_silent", timeout=2),
        },
    }


@pytest.fixture(scope="module")
def upstreams() -> Iterator[Upstreams]:
    loop = LoopThread()
    up = Upstreams(loop)
    yield up
    up.close()
    loop.close()


@pytest.fixture(scope="module")
def cluster(upstreams: Upstreams, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    env = {"FAKE_OPENAI_KEY": OPENAI_KEY, "FAKE_GEMINI_KEY": GEMINI_KEY}
    with running_cluster(tmp_path_factory.mktemp("upstream"), cluster_config(upstreams), env=env) as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        yield session


Answer = tuple[int, dict[str, Any], float]


async def generate(http: aiohttp.ClientSession, cluster: Cluster, model: str) -> Answer:
    """A synchronous generation: (status, body, seconds it took)."""
    started = time.monotonic()
    async with http.post(cluster.url + "/v1/images/generations", headers=AUTH,
                         json={"prompt": f"fault {model}", "model": model, "size": "1024x1024"}) as resp:
        return resp.status, await resp.json(), time.monotonic() - started


async def burst(http: aiohttp.ClientSession, cluster: Cluster, model: str, count: int) -> list[Answer]:
    return list(await asyncio.gather(*(generate(http, cluster, model) for _ in range(count))))


def png_bytes(size: tuple[int, int] = (64, 48)) -> bytes:
    out = io.BytesIO()
    # noise: the pixel data does not compress away, so damage lands inside it
    Image.effect_noise(size, 64).convert("RGB").save(out, "PNG")
    return out.getvalue()


def images_answer(data: bytes) -> dict[str, Any]:
    return {"created": 1, "data": [{"b64_json": base64.b64encode(data).decode()}]}


async def test_slow_upstream_falls_back_within_its_deployment_timeout(
        cluster: Cluster, upstreams: Upstreams, http: aiohttp.ClientSession) -> None:
    slow, fallback = upstreams.openai["slow"], upstreams.openai["slow_fallback"]
    await upstreams.loop.call(_script(slow.delay, 30, times=50))
    before = cluster.job_ids()
    first = await burst(http, cluster, "slow", 6)
    assert [status for status, _, _ in first] == [200] * 6
    assert max(took for _, _, took in first) < 0.8 + 2.5  # one deployment timeout, then the fallback
    # the requests that met the slow deployment put it in cooldown: later ones go straight to the fallback
    slow_calls = len(slow.image_calls)
    assert 1 <= slow_calls <= 6 and len(fallback.image_calls) == 6
    second = await burst(http, cluster, "slow", 4)
    assert [status for status, _, _ in second] == [200] * 4 and max(took for _, _, took in second) < 0.8
    assert len(slow.image_calls) == slow_calls and len(fallback.image_calls) == 10
    ledger = await cluster.settled(before, 10)
    assert set(ledger.statuses.values()) == {"succeeded"}
    returned = sorted(base64.b64decode(body["data"][0]["b64_json"]) for _, body, _ in first + second)
    assert returned == sorted(fallback.images)  # every answer is the fallback's image, none lost or doubled
    await cluster.still_serves(http, "local")


async def test_slow_upstream_alone_fails_with_504_within_the_model_timeout(
        cluster: Cluster, upstreams: Upstreams, http: aiohttp.ClientSession) -> None:
    slow = upstreams.openai["slow_alone"]
    await upstreams.loop.call(_script(slow.delay, 30, times=50))
    before = cluster.job_ids()
    answers = await burst(http, cluster, "slow-alone", 3)
    for status, body, took in answers:
        assert status == 504, body
        assert body["error"]["code"] == "upstream_timeout"
        assert 1.6 <= took < 2 + 1.5  # it did wait for two deployment timeouts, and not past the model's
    assert 6 <= len(slow.image_calls) <= 9  # 2 or 3 calls per request within the 2 s budget
    ledger = await cluster.settled(before, 3)
    assert set(ledger.statuses.values()) == {"failed"}
    await cluster.still_serves(http, "local")


async def test_429_storm_is_avoided_through_the_fallback_and_its_cooldown(
        cluster: Cluster, upstreams: Upstreams, http: aiohttp.ClientSession) -> None:
    storm = upstreams.openai["storm"]
    await upstreams.loop.call(_script(storm.fail, 429, times=1000, headers={"Retry-After": "60"}))
    gemini_calls = len(upstreams.gemini.calls)
    before = cluster.job_ids()
    first = await burst(http, cluster, "storm", 8)
    assert [status for status, _, _ in first] == [200] * 8
    assert max(took for _, _, took in first) < 3  # Retry-After: 60 is honoured by going elsewhere
    storm_calls = len(storm.image_calls)
    assert 1 <= storm_calls <= 8
    second = await burst(http, cluster, "storm", 8)
    assert [status for status, _, _ in second] == [200] * 8
    assert len(storm.image_calls) == storm_calls  # in cooldown: the storm is not fed
    assert len(upstreams.gemini.calls) - gemini_calls == 16
    ledger = await cluster.settled(before, 16)
    assert set(ledger.statuses.values()) == {"succeeded"}
    await cluster.still_serves(http, "local")


async def test_429_storm_without_fallback_fails_fast_instead_of_waiting_out_retry_after(
        cluster: Cluster, upstreams: Upstreams, http: aiohttp.ClientSession) -> None:
    storm = upstreams.openai["storm_alone"]
    await upstreams.loop.call(_script(storm.fail, 429, times=1000, headers={"Retry-After": "60"}))
    before = cluster.job_ids()
    answers = await burst(http, cluster, "storm-alone", 5)
    for status, body, took in answers:
        assert status == 502, body
        assert body["error"]["code"] == "upstream_rate_limited"
        assert "Rate limit reached" in body["error"]["message"]  # the upstream's own words
        assert took < 2  # a retry 60 s later cannot fit the model's 5 s: no waiting for it
    assert len(storm.image_calls) == 5
    ledger = await cluster.settled(before, 5)
    assert set(ledger.statuses.values()) == {"failed"}
    await cluster.still_serves(http, "local")


async def test_5xx_transient_ones_are_retried_persistent_ones_end_in_502(
        cluster: Cluster, upstreams: Upstreams, http: aiohttp.ClientSession) -> None:
    flaky, broken = upstreams.openai["flaky"], upstreams.openai["broken"]
    await upstreams.loop.call(_script(flaky.fail, 500, times=2))
    await upstreams.loop.call(_script(broken.fail, 503, times=1000))
    before = cluster.job_ids()
    status, body, took = await generate(http, cluster, "flaky")
    assert status == 200 and took < 2, body
    assert base64.b64decode(body["data"][0]["b64_json"]) == flaky.images[0]
    assert len(flaky.image_calls) == 3  # two failures, then the answer
    answers = await burst(http, cluster, "broken", 3)
    for status, body, took in answers:
        assert status == 502 and took < 2, body
        assert "after 3 attempts" in body["error"]["message"] and "HTTP 503" in body["error"]["message"]
    assert len(broken.image_calls) == 9
    ledger = await cluster.settled(before, 4)
    assert sorted(ledger.statuses.values()) == ["failed"] * 3 + ["succeeded"]
    await cluster.still_serves(http, "local")


async def test_connection_resets_are_retried_or_end_in_a_clear_502(
        cluster: Cluster, upstreams: Upstreams, http: aiohttp.ClientSession) -> None:
    resets, hopeless = upstreams.openai["resets"], upstreams.openai["resets_alone"]
    await upstreams.loop.call(_script(resets.reset, times=2))
    await upstreams.loop.call(_script(hopeless.reset, times=1000))
    before = cluster.job_ids()
    status, body, _ = await generate(http, cluster, "resets")
    assert status == 200, body
    assert len(resets.image_calls) == 3
    answers = await burst(http, cluster, "resets-alone", 2)
    for status, body, took in answers:
        assert status == 502 and took < 2, body
        assert body["error"]["code"] == "upstream_unreachable"
    assert len(hopeless.image_calls) == 6
    ledger = await cluster.settled(before, 3)
    assert sorted(ledger.statuses.values()) == ["failed", "failed", "succeeded"]
    await cluster.still_serves(http, "local")


def corruptions() -> list[bytes]:
    """Image answers that look like PNGs by their first bytes, but are not whole pictures."""
    good = png_bytes()
    damaged = bytearray(good)
    middle = len(good) // 2
    damaged[middle:middle + 64] = bytes(64)  # zeros inside the compressed pixel data: bad checksums
    return [good[: len(good) // 2], bytes(damaged), good[:40]]


async def test_truncated_or_corrupt_images_are_502_and_never_stored(
        cluster: Cluster, upstreams: Upstreams, http: aiohttp.ClientSession) -> None:
    corrupt, fallback = upstreams.openai["corrupt"], upstreams.openai["corrupt_fallback"]
    alone = upstreams.openai["corrupt_alone"]
    bad = corruptions()
    for data in bad:
        await upstreams.loop.call(_script(corrupt.fail, 200, images_answer(data)))
        await upstreams.loop.call(_script(alone.fail, 200, images_answer(data), times=2))
    before = cluster.job_ids()
    for _ in bad:
        status, body, _ = await generate(http, cluster, "corrupt-alone")
        assert status == 502, body
        assert body["error"]["code"] == "bad_upstream_image"
        assert "truncated or corrupt" in body["error"]["message"]
    assert len(alone.image_calls) == 2 * len(bad)
    # with a fallback, the corrupt answer costs one call and the client still gets a whole image
    status, body, _ = await generate(http, cluster, "corrupt")
    assert status == 200, body
    assert base64.b64decode(body["data"][0]["b64_json"]) == fallback.images[0]
    assert len(corrupt.image_calls) == 1
    ledger = await cluster.settled(before, len(bad) + 1)
    assert sorted(ledger.statuses.values()) == ["failed"] * len(bad) + ["succeeded"]
    await cluster.still_serves(http, "local")


async def test_comfyui_dying_mid_run_fails_the_job_clearly_and_promptly(
        cluster: Cluster, upstreams: Upstreams, http: aiohttp.ClientSession) -> None:
    comfy = upstreams.comfy_dies
    before = cluster.job_ids()
    job_id = await cluster.submit_async(http, "comfy-dies")
    deadline = time.monotonic() + 20
    while comfy.running is None:  # the prompt is sampling on the instance
        assert time.monotonic() < deadline, "the prompt never started"
        await asyncio.sleep(0.02)
    await upstreams.loop.call(comfy.stop())
    stopped = time.monotonic()
    job = await cluster.wait_status(http, job_id, {"succeeded", "failed", "cancelled"}, timeout=30)
    assert time.monotonic() - stopped < 5  # the reconnect window is 0.5 s
    assert job["status"] == "failed" and job["error"]["code"] == "upstream_unavailable", job
    assert f"ComfyUI at {comfy.url} was lost" in job["error"]["message"]
    ledger = await cluster.settled(before, 1)
    assert ledger.statuses == {job_id: "failed"}
    await cluster.still_serves(http, "local")


async def test_comfyui_hanging_mid_run_is_interrupted_at_the_model_timeout(
        cluster: Cluster, upstreams: Upstreams, http: aiohttp.ClientSession) -> None:
    comfy = upstreams.comfy_hangs
    before = cluster.job_ids()
    started = time.monotonic()
    async with http.post(cluster.url + "/v1/images/generations", headers=AUTH,
                         json={"prompt": "hang", "model": "comfy-hangs", "size": "64x64"}) as resp:
        assert resp.status == 504, await resp.text()
        assert (await resp.json())["error"]["code"] == "upstream_timeout"
    assert 2 <= time.monotonic() - started < 2 + 2
    deadline = time.monotonic() + 10
    while not any(c.method == "POST" and c.path == "/interrupt" for c in comfy.calls):
        assert time.monotonic() < deadline, "the hung prompt was never interrupted"
        await asyncio.sleep(0.02)
    ledger = await cluster.settled(before, 1)
    assert set(ledger.statuses.values()) == {"failed"}
    await cluster.still_serves(http, "local")


async def test_comfyui_that_never_answers_fails_at_the_model_timeout(
        cluster: Cluster, http: aiohttp.ClientSession) -> None:
    before = cluster.job_ids()
    answers = await asyncio.gather(*(generate(http, cluster, "comfy-silent") for _ in range(2)))
    for status, body, took in answers:
        assert status in (502, 504), body
        assert body["error"]["type"] == "upstream_error"
        assert took < 2 + 2
    ledger = await cluster.settled(before, 2)
    assert set(ledger.statuses.values()) == {"failed"}
    await cluster.still_serves(http, "local")


async def _script(method: Any, *args: Any, **kwargs: Any) -> None:
    """Call a fake's scripting method on the fakes' own loop, where its handlers read the script."""
    method(*args, **kwargs)

