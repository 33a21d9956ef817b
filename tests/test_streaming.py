"""`stream: true`: OpenAI-shaped server-sent events from the job's partial images and its end."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from service.state import STORAGE
from tests.conftest import Gateway, GatewayFactory, Processes, local_config
from tests.pictures import decode, encode, mask_png, photo
from tests.test_redis_mode import start_cluster


async def read_events(resp: aiohttp.ClientResponse) -> list[tuple[str, dict[str, Any]]]:
    """The (event, data) pairs of a whole SSE body."""
    events = []
    for block in (await resp.text()).split("\n\n"):
        lines = [line for line in block.splitlines() if not line.startswith(":")]
        if lines:
            event = next(line[7:] for line in lines if line.startswith("event: "))
            data = next(line[6:] for line in lines if line.startswith("data: "))
            events.append((event, json.loads(data)))
    return events


async def test_sdk_streams_partial_images_then_the_image(gateway: Gateway) -> None:
    stream = await gateway.client().images.generate(prompt="a harbour", model="gpt-image-1", size="1024x1536",
                                                    stream=True, partial_images=2, output_format="webp")
    events = [event async for event in stream]
    assert [e.type for e in events] == ["image_generation.partial_image", "image_generation.partial_image",
                                        "image_generation.completed"]
    partials, final = events[:2], events[2]
    assert [p.partial_image_index for p in partials] == [0, 1]
    pictures = [decode(e.b64_json).convert("RGB") for e in events]
    assert all(p.size == (1024, 1536) for p in pictures)
    assert len({p.tobytes() for p in pictures}) == 3  # each rendering is a different, finer picture
    assert final.size == "1024x1536" and final.output_format == "webp" and final.background == "opaque"
    assert decode(final.b64_json).format == "WEBP"
    assert final.usage.total_tokens == 0 and final.created_at > 0


async def test_a_stream_answers_from_the_images_its_job_still_holds(gateway: Gateway,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A job run in the answering process hands its images to the stream, as to a synchronous answer: they
    are stored, but not read back to be sent."""
    storage = gateway.app[STORAGE]
    read, reads = storage.get, []

    async def counted_read(name: str) -> bytes | None:
        reads.append(name)
        return await read(name)

    monkeypatch.setattr(storage, "get", counted_read)
    stream = await gateway.client().images.generate(prompt="a lighthouse", model="gpt-image-1", size="1024x1024",
                                                    stream=True, partial_images=1, n=2)
    events = [event async for event in stream]
    assert [e.type for e in events].count("image_generation.completed") == 2
    assert all(decode(e.b64_json).size == (1024, 1024) for e in events if e.type.endswith("completed"))
    assert reads == []


async def test_sdk_streams_an_edit(gateway: Gateway) -> None:
    stream = await gateway.client().images.edit(
        image=("p.png", encode(photo((64, 64))), "image/png"),
        mask=("m.png", mask_png((64, 64), (0, 0, 9, 9)), "image/png"),
        prompt="a kite", stream=True, partial_images=1)
    events = [event async for event in stream]
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    assert decode(events[-1].b64_json).size == (64, 64) and events[-1].size == "64x64"


@pytest.mark.parametrize("partial_images", [0, 3])
async def test_partial_image_count_follows_the_request(gateway: Gateway, http: aiohttp.ClientSession,
                                                       partial_images: int) -> None:
    body = {"prompt": "dunes", "size": "64x64", "stream": True, "partial_images": partial_images, "n": 2}
    async with http.post(gateway.url + "/v1/images/generations", json=body) as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        job_id = resp.headers["x-imagegw-job-id"]
        events = await read_events(resp)
    names = [name for name, _ in events]
    assert names == ["image_generation.partial_image"] * partial_images + ["image_generation.completed"] * 2
    assert all(data["type"] == name for name, data in events)
    async with http.get(f"{gateway.url}/v1/images/jobs/{job_id}") as resp:
        assert (await resp.json())["status"] == "succeeded"


async def test_a_failed_job_ends_the_stream_with_an_error_event(gateway_factory: GatewayFactory,
                                                               http: aiohttp.ClientSession) -> None:
    gateway = await gateway_factory(config=local_config(steps=20, step_delay=0.05))
    body = {"prompt": "slow", "size": "64x64", "stream": True, "partial_images": 1}
    async with http.post(gateway.url + "/v1/images/generations", json=body) as resp:
        job_id = resp.headers["x-imagegw-job-id"]
        async with http.delete(f"{gateway.url}/v1/images/jobs/{job_id}") as cancel:
            assert cancel.status == 200
        events = await read_events(resp)
    assert events[-1] == ("error", {"type": "error", "error": {
        "message": "The job was cancelled.", "type": "invalid_request_error", "param": None,
        "code": "job_cancelled"}})
    assert all(name == "image_generation.partial_image" for name, _ in events[:-1])


async def test_sdk_raises_the_error_event(gateway_factory: GatewayFactory) -> None:
    gateway = await gateway_factory(config=local_config(steps=20, step_delay=0.05))
    client = gateway.client()
    stream = await client.images.generate(prompt="slow", size="64x64", stream=True, partial_images=1)
    job_id = stream.response.headers["x-imagegw-job-id"]
    async with aiohttp.ClientSession() as http:
        async with http.delete(f"{gateway.url}/v1/images/jobs/{job_id}") as cancel:
            assert cancel.status == 200
    with pytest.raises(openai.APIError, match="The job was cancelled"):
        async for _ in stream:
            pass


async def test_disconnecting_keeps_the_job(gateway_factory: GatewayFactory, http: aiohttp.ClientSession
                                           ) -> None:
    gateway = await gateway_factory(config=local_config(steps=10, step_delay=0.05))
    body = {"prompt": "patience", "size": "64x64", "stream": True, "partial_images": 2}
    async with aiohttp.ClientSession() as impatient:
        async with impatient.post(gateway.url + "/v1/images/generations", json=body) as resp:
            job_id = resp.headers["x-imagegw-job-id"]
    for _ in range(100):
        async with http.get(f"{gateway.url}/v1/images/jobs/{job_id}") as resp:
            job = await resp.json()
        if job["status"] != "queued" and job["status"] != "running":
            break
        await asyncio.sleep(0.05)
    assert job["status"] == "succeeded"
    assert decode(job["result"]["data"][0]["b64_json"]).size == (64, 64)


async def test_families_without_streaming_refuse_it(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    body = {"prompt": "x", "model": "dall-e-3", "stream": True}
    async with http.post(gateway.url + "/v1/images/generations", json=body) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["param"] == "stream" and error["code"] == "unsupported_parameter"


async def test_redis_mode_streams_an_edit_run_by_a_worker_process(processes: Processes, tmp_path: Path,
                                                                   redis_url: str) -> None:
    """Inputs stored by the front end, read by a separate worker; its partial images relayed through Redis."""
    url = await start_cluster(processes, tmp_path, redis_url, workers=1)
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="sk-alice", max_retries=0)
    stream = await client.images.edit(image=("p.png", encode(photo((48, 48))), "image/png"), prompt="rain",
                                      stream=True, partial_images=2)
    events = [event async for event in stream]
    assert [e.type for e in events] == ["image_edit.partial_image"] * 2 + ["image_edit.completed"]
    assert decode(events[-1].b64_json).size == (48, 48)
