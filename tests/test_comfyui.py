"""The ComfyUI back end, driven the way users drive it (the openai SDK, a Socket.IO subscriber, the job API)
against fake ComfyUI servers speaking the recorded protocol, whose records show every outbound request."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from PIL import Image

from service.settings import GatewayConfig
from tests.conftest import ROOT, Gateway, GatewayFactory, free_port
from tests.fakes.comfyui import FakeComfyUI, RecordedCall, UploadedFile
from tests.pictures import decode, encode, mask_png, photo
from tests.test_jobs import Subscriber, assert_monotonic_then_completed
from workers.comfyui.farm import PROBE_BATCH

WORKFLOWS = ROOT / "deploy" / "workflows"
TXT2IMG = WORKFLOWS / "sd-txt2img.json"
INPAINT = WORKFLOWS / "sd-inpaint.json"
TXT2IMG_INPUTS = {"prompt": "6.text", "negative_prompt": "7.text", "width": "5.width", "height": "5.height",
                  "n": "5.batch_size", "seed": "3.seed", "steps": "3.steps"}
INPAINT_INPUTS = {"prompt": "6.text", "negative_prompt": "7.text", "seed": "3.seed", "steps": "3.steps",
                  "image": "10.image", "mask": "11.image"}
FAST_RETRY = {"attempts": 3, "backoff": 0.05, "max_backoff": 0.1, "cooldown": 0}
Events = list[tuple[str, dict[str, Any]]]


def comfy_config(*urls: str, workflow: Path = TXT2IMG, inputs: dict[str, str] | None = None,
                 deployment: dict[str, Any] | None = None, model: dict[str, Any] | None = None,
                 **farm: Any) -> GatewayConfig:
    """Model `sd` on a farm of the given ComfyUI URLs; previews unthrottled so tests can count them."""
    return GatewayConfig.model_validate({
        "default_model": "sd",
        "providers": {"comfy": {"type": "comfyui", "options": {"instances": list(urls), **farm}}},
        "models": {"sd": {"family": "generic", "timeout": 60, "retry": FAST_RETRY, **(model or {}),
                          "deployments": [{"provider": "comfy", "options": {
                              "workflow": str(workflow), "inputs": inputs or TXT2IMG_INPUTS,
                              "preview_interval": 0, **(deployment or {})}}]}},
    })


@pytest.fixture
async def fake() -> AsyncIterator[FakeComfyUI]:
    async with FakeComfyUI(step_delay=0.005) as server:
        yield server


@pytest.fixture
async def fake2() -> AsyncIterator[FakeComfyUI]:
    async with FakeComfyUI(step_delay=0.005) as server:
        yield server


@pytest.fixture
async def watch(gateway_factory: GatewayFactory) -> AsyncIterator[Any]:
    """`await watch(config, **settings)` -> (gateway, connected Socket.IO subscriber)."""
    subscribers: list[Subscriber] = []

    async def start(config: GatewayConfig, **settings: Any) -> tuple[Gateway, Subscriber]:
        gw = await gateway_factory(config=config, **settings)
        sub = Subscriber(gw.url, "sk-test")
        await sub.connect()
        subscribers.append(sub)
        return gw, sub

    yield start
    for sub in subscribers:
        await sub.client.disconnect()


async def submit(gw: Gateway, sub: Subscriber | None = None, **params: Any) -> str:
    """A respond-async generation through the SDK; the job id, subscribed to when a subscriber is given."""
    body = {"prompt": "a lighthouse", "model": "sd", "size": "96x64", **params}
    extra = {k: body.pop(k) for k in ("seed", "negative_prompt") if k in body}
    raw = await gw.client().images.with_raw_response.generate(
        **body, extra_body=extra or None, extra_headers={"Prefer": "respond-async"})
    assert raw.status_code == 202, raw.text
    job_id: str = raw.http_response.json()["id"]
    if sub is not None:
        await sub.subscribe(job_id)
    return job_id


def stages(events: Events) -> list[str]:
    return [data["stage"] for name, data in events if name == "progress" and data.get("stage")]


async def until(condition: Any, what: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def until_stage(sub: Subscriber, job_id: str, prefix: str) -> None:
    await until(lambda: any(s.startswith(prefix) for s in stages(sub.events.get(job_id, []))), what=prefix)


def calls(fake: FakeComfyUI, method: str, path: str) -> list[RecordedCall]:
    return [c for c in fake.calls if c.method == method and c.path == path]


def submitted(fake: FakeComfyUI) -> list[dict[str, Any]]:
    """The bodies of every POST /prompt the fake received."""
    return [c.json for c in calls(fake, "POST", "/prompt")]


async def test_progress_previews_and_result_over_socketio(watch: Any, fake: FakeComfyUI) -> None:
    gw, sub = await watch(comfy_config(fake.url))
    job_id = await submit(gw, sub, n=2, seed=7, negative_prompt="fog", quality="low")
    events = await sub.wait(job_id)

    assert_monotonic_then_completed(events)
    values = [data["progress"] for name, data in events if name == "progress"]
    assert len(set(values)) >= 10 and values[0] == 0 and values[-1] < 100
    partials = [data for name, data in events if name == "partial_image"]
    assert partials and [p["partial_image_index"] for p in partials] == list(range(len(partials)))
    assert decode(partials[0]["b64_json"]).format == "JPEG"  # the fake's sampler previews
    seen = stages(events)
    assert "loading" in seen and "encoding the prompt" in seen and "decoding" in seen and "saving" in seen
    assert [s for s in seen if s.startswith("sampling")][-1] == "sampling step 12/12"  # quality low: 12 steps
    assert len([s for s in seen if s.startswith("sampling step")]) >= 10
    order = [seen.index(s) for s in ("loading", "sampling step 1/12", "decoding", "saving")]
    assert order == sorted(order)

    # the result is the fake's saved PNGs, converted to nothing: same bytes
    completed = events[-1][1]
    assert completed["status"] == "succeeded"
    (prompt_call,) = calls(fake, "POST", "/prompt")
    pid = fake.executed_prompt_ids[0]
    saved = fake.history[pid]["outputs"]["9"]["images"]
    stored = [fake.files[(ref["type"], ref["subfolder"], ref["filename"])] for ref in saved]
    results = [base64.b64decode(item["b64_json"]) for item in completed["result"]["data"]]
    assert results == stored and len(results) == 2
    assert all(Image.open(io.BytesIO(data)).size == (96, 64) for data in results)

    # the exact outbound requests: socket first, feature flags announced, then the rendered workflow
    (ws_call,) = calls(fake, "GET", "/ws")
    assert fake.calls.index(ws_call) < fake.calls.index(prompt_call)
    client_id = ws_call.query["clientId"]
    flags = {"type": "feature_flags", "data": {"supports_preview_metadata": True}}
    assert fake.ws_received[0] == (client_id, flags)
    body = prompt_call.json
    assert body["client_id"] == client_id and set(body) == {"prompt", "client_id", "prompt_id"}
    assert fake.executed_prompt_ids == [body["prompt_id"]]  # the gateway's own id, as ComfyUI honours it
    graph = body["prompt"]
    template = json.loads(TXT2IMG.read_text())
    assert graph["6"]["inputs"]["text"] == "a lighthouse" and graph["7"]["inputs"]["text"] == "fog"
    assert graph["5"]["inputs"] == {"width": 96, "height": 64, "batch_size": 2}
    assert graph["3"]["inputs"] == {**template["3"]["inputs"], "seed": 7, "steps": 12}
    assert {nid: node for nid, node in graph.items() if nid not in ("3", "5", "6", "7")} == {
        nid: node for nid, node in template.items() if nid not in ("3", "5", "6", "7")}
    assert len(calls(fake, "GET", "/view")) == 2 and not calls(fake, "POST", "/interrupt")


async def test_sdk_sync_generation_and_fresh_seeds(gateway_factory: GatewayFactory,
                                                   fake: FakeComfyUI) -> None:
    gw = await gateway_factory(config=comfy_config(fake.url))
    client = gw.client()
    first = await client.images.generate(prompt="a harbour", model="sd", size="64x128", response_format="url")
    second = await client.images.generate(prompt="a harbour", model="sd", size="64x128")
    assert first.data and first.data[0].url
    assert second.data and decode(second.data[0].b64_json).size == (64, 128)
    seeds = [body["prompt"]["3"]["inputs"]["seed"] for body in submitted(fake)]
    assert len(set(seeds)) == 2  # no seed asked: each request draws a new one, not ComfyUI's cached images
    assert all(body["prompt"]["3"]["inputs"]["steps"] == 20 for body in submitted(fake))  # template's steps


async def test_stream_gets_the_requested_number_of_partial_images(gateway_factory: GatewayFactory,
                                                                  fake: FakeComfyUI) -> None:
    gw = await gateway_factory(config=comfy_config(fake.url))
    stream = await gw.client().images.generate(prompt="dunes", model="sd", size="64x64", stream=True,
                                               partial_images=2)
    events = [event async for event in stream]
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert decode(events[-1].b64_json).size == (64, 64)


async def occupy(fake: FakeComfyUI, http: aiohttp.ClientSession) -> str:
    """Another client's prompt that holds the instance until interrupted; its prompt id."""
    fake.hang = True
    blocker = json.loads(TXT2IMG.read_text())
    async with http.post(fake.url + "/prompt", json={"prompt": blocker, "client_id": "someone-else"}) as resp:
        prompt_id: str = (await resp.json())["prompt_id"]
    await until(lambda: fake.running is not None, "the blocker to run")
    return prompt_id


async def release(fake: FakeComfyUI, http: aiohttp.ClientSession) -> None:
    fake.hang = False
    async with http.post(fake.url + "/interrupt", json={}):
        pass


async def test_a_busy_instance_is_waited_for_in_the_gateway(watch: Any, fake: FakeComfyUI,
                                                             http: aiohttp.ClientSession) -> None:
    await occupy(fake, http)
    gw, sub = await watch(comfy_config(fake.url))  # one slot, taken by someone else's prompt
    job_id = await submit(gw, sub)
    await until_stage(sub, job_id, "waiting for a free ComfyUI instance")
    await asyncio.sleep(0.3)
    assert len(submitted(fake)) == 1 and not fake.pending  # only the blocker: ours waits in the gateway
    await release(fake, http)
    assert_monotonic_then_completed(await sub.wait(job_id))
    assert len(submitted(fake)) == 2


async def test_queued_at_comfyui_then_cancelled_leaves_its_queue(watch: Any, fake: FakeComfyUI,
                                                                 http: aiohttp.ClientSession) -> None:
    blocker_id = await occupy(fake, http)

    # two slots: one prompt may wait at ComfyUI, ready to start the moment the running one ends
    gw, sub = await watch(comfy_config(fake.url, instance_concurrency=2))
    job_id = await submit(gw, sub)
    await until_stage(sub, job_id, "queued at ComfyUI (position 2)")
    (ours,) = [item.prompt_id for item in fake.pending]
    async with http.delete(f"{gw.url}/v1/images/jobs/{job_id}") as resp:
        assert resp.status == 200 and (await resp.json())["status"] == "cancelled"
    await until(lambda: not fake.pending, "the queue delete")
    assert [c.json for c in calls(fake, "POST", "/queue")] == [{"delete": [ours]}]
    assert not calls(fake, "POST", "/interrupt")  # the running prompt is not ours: left alone
    assert fake.running is not None and fake.running.prompt_id == blocker_id
    events = await sub.wait(job_id)
    assert events[-1][0] == "failed" and events[-1][1]["status"] == "cancelled"
    await release(fake, http)
    await until(lambda: fake.running is None, "the blocker to stop")
    assert ours not in fake.executed_prompt_ids


async def test_cancel_mid_run_interrupts_the_prompt(watch: Any, fake: FakeComfyUI,
                                                    http: aiohttp.ClientSession) -> None:
    fake.step_delay = 0.1
    gw, sub = await watch(comfy_config(fake.url))
    job_id = await submit(gw, sub)
    await until_stage(sub, job_id, "sampling step 2/")
    pid = fake.executed_prompt_ids[0]
    async with http.delete(f"{gw.url}/v1/images/jobs/{job_id}") as resp:
        assert resp.status == 200 and (await resp.json())["status"] == "cancelled"
    await until(lambda: pid in fake.history, "the interrupted prompt to end")
    assert [c.json for c in calls(fake, "POST", "/interrupt")] == [{"prompt_id": pid}]
    assert not calls(fake, "POST", "/queue")
    assert fake.history[pid]["status"]["messages"][-1][0] == "execution_interrupted"
    events = await sub.wait(job_id)
    assert events[-1][0] == "failed" and events[-1][1]["status"] == "cancelled"
    async with http.get(f"{gw.url}/v1/images/jobs/{job_id}") as resp:
        assert (await resp.json())["status"] == "cancelled"
    # the instance is free for the next job at once
    assert (await gw.client().images.generate(prompt="next", model="sd", size="64x64")).data


@pytest.mark.parametrize("abrupt", [False, True], ids=["close", "reset"])
async def test_dropped_websocket_reconnects_and_completes(watch: Any, fake: FakeComfyUI,
                                                          abrupt: bool) -> None:
    fake.step_delay = 0.05
    gw, sub = await watch(comfy_config(fake.url))
    job_id = await submit(gw, sub, n=2)
    await until_stage(sub, job_id, "sampling step 3/")
    await fake.drop_websockets(abrupt=abrupt)
    events = await sub.wait(job_id)
    assert_monotonic_then_completed(events)
    assert len(events[-1][1]["result"]["data"]) == 2
    sockets = calls(fake, "GET", "/ws")
    assert len(sockets) == 2 and sockets[0].query == sockets[1].query  # same clientId: ComfyUI routes to it
    pid = fake.executed_prompt_ids[0]
    assert calls(fake, "GET", f"/history/{pid}")  # reconciled after the reconnect
    assert len(submitted(fake)) == 1  # the prompt was followed, not submitted again


async def test_two_instances_share_four_jobs_one_at_a_time(watch: Any, fake: FakeComfyUI,
                                                           fake2: FakeComfyUI) -> None:
    gw, sub = await watch(comfy_config(fake.url, fake2.url))
    held: list[int] = []  # the most prompts any one instance held (running or queued), sampled all along

    async def sample_queues() -> None:
        while True:
            held.append(max(len(f.pending) + (f.running is not None) for f in (fake, fake2)))
            await asyncio.sleep(0.002)

    sampler = asyncio.create_task(sample_queues())
    try:
        jobs = await asyncio.gather(*(submit(gw, sub, prompt=f"p{i}") for i in range(4)))
        runs = [await sub.wait(job_id) for job_id in jobs]
    finally:
        sampler.cancel()
    for events in runs:
        assert_monotonic_then_completed(events)
        assert decode(events[-1][1]["result"]["data"][0]["b64_json"]).size == (96, 64)
    # two jobs found both instances busy and said so while they waited
    assert sum("waiting for a free ComfyUI instance" in stages(events) for events in runs) >= 2
    counts = [len(submitted(f)) for f in (fake, fake2)]
    assert sum(counts) == 4 and min(counts) >= 1  # both instances served
    assert fake.max_concurrent == 1 and fake2.max_concurrent == 1
    assert max(held) == 1  # no prompt ever waited behind another in an instance's queue
    for f in (fake, fake2):
        # each prompt was collected (/view) before the next was submitted to the same instance
        sequence = [c.path for c in f.calls if (c.method, c.path) in (("POST", "/prompt"), ("GET", "/view"))]
        assert sequence == ["/prompt", "/view"] * len(submitted(f))


async def test_a_job_on_a_large_idle_farm_asks_a_few_instances_for_their_queue(watch: Any) -> None:
    async with contextlib.AsyncExitStack() as stack:
        farm = [await stack.enter_async_context(FakeComfyUI(step_delay=0.005)) for _ in range(3 * PROBE_BATCH)]
        gw, sub = await watch(comfy_config(*(f.url for f in farm)))
        assert_monotonic_then_completed(await sub.wait(await submit(gw, sub, prompt="one")))
        asked = [f for f in farm if any((c.method, c.path) == ("GET", "/queue") for c in f.calls)]
        assert asked == farm[:PROBE_BATCH]  # the first few idle ones: none left unasked could be less loaded
        assert [len(submitted(f)) for f in farm] == [1] + [0] * (len(farm) - 1)  # ties go in the farm's order


async def test_save_image_websocket_outputs_are_the_result(gateway_factory: GatewayFactory,
                                                           fake: FakeComfyUI, tmp_path: Path) -> None:
    # images streamed over the socket by a SaveImageWebsocket node, never written to disk (as ws_batch.json)
    workflow = tmp_path / "ws.json"
    workflow.write_text(json.dumps({
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 512, "height": 512, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["2", 0]}},
    }))
    inputs = {"prompt": "1.color", "width": "1.width", "height": "1.height", "n": "1.batch_size"}
    gw = await gateway_factory(config=comfy_config(fake.url, workflow=workflow, inputs=inputs))
    with pytest.raises(openai.BadRequestError):  # the prompt lands in an INT input: ComfyUI says so
        await gw.client().images.generate(prompt="not a number", model="sd", size="64x32")
    result = await gw.client().images.generate(prompt="7", model="sd", size="64x32", n=3)
    assert result.data and len(result.data) == 3
    assert {decode(item.b64_json).size for item in result.data} == {(64, 32)}
    assert not calls(fake, "GET", "/view") and not any(key[0] == "output" for key in fake.files)


async def test_validation_error_is_a_400_naming_the_node(gateway_factory: GatewayFactory) -> None:
    async with FakeComfyUI(checkpoints=("other.safetensors",)) as fake:
        gw = await gateway_factory(config=comfy_config(fake.url))
        with pytest.raises(openai.BadRequestError) as caught:
            await gw.client().images.generate(prompt="p", model="sd", size="64x64")
        error = caught.value.body
        assert isinstance(error, dict) and error["code"] == "workflow_invalid"
        assert "sd-txt2img.json" in error["message"] and "node 4 (CheckpointLoaderSimple)" in error["message"]
        assert "ckpt_name" in error["message"]
        assert len(submitted(fake)) == 1  # a rejected workflow is not retried


async def test_node_failure_names_the_node(gateway_factory: GatewayFactory) -> None:
    async with FakeComfyUI(step_delay=0.001, fail_node="8", fail_message="CUDA out of memory") as fake:
        gw = await gateway_factory(config=comfy_config(fake.url))
        with pytest.raises(openai.APIStatusError) as caught:
            await gw.client().images.generate(prompt="p", model="sd", size="64x64")
        assert caught.value.status_code == 502
        error = caught.value.body
        assert isinstance(error, dict) and error["code"] == "workflow_failed"
        assert "node 8 (VAEDecode)" in error["message"] and "CUDA out of memory" in error["message"]
        assert len(submitted(fake)) == 1  # the same workflow would fail again: not retried


async def test_identical_resubmission_is_served_from_comfyui_cache(watch: Any, fake: FakeComfyUI) -> None:
    gw, sub = await watch(comfy_config(fake.url))
    client = gw.client()
    first = await client.images.generate(prompt="same", model="sd", size="64x64", extra_body={"seed": 42})
    files = dict(fake.files)
    job_id = await submit(gw, sub, prompt="same", size="64x64", seed=42)
    events = await sub.wait(job_id)
    assert_monotonic_then_completed(events)
    second_pid = fake.executed_prompt_ids[1]
    cached = fake.history[second_pid]["status"]["messages"][1]
    assert cached[0] == "execution_cached" and set(cached[1]["nodes"]) == set(json.loads(TXT2IMG.read_text()))
    assert fake.files == files  # nothing new was written
    assert "reusing ComfyUI's cached results" in stages(events)
    assert events[-1][1]["result"]["data"][0]["b64_json"] == first.data[0].b64_json


async def test_other_prompts_messages_are_ignored(watch: Any, fake: FakeComfyUI) -> None:
    fake.step_delay = 0.05
    gw, sub = await watch(comfy_config(fake.url))
    job_id = await submit(gw, sub)
    await until_stage(sub, job_id, "sampling step 2/")
    assert fake.running is not None
    client_id, other = fake.running.client_id, "0f0f0f0f-other-prompt"
    foreign = [
        {"type": "progress", "data": {"value": 20, "max": 20, "prompt_id": other, "node": "3"}},
        {"type": "progress_state", "data": {"prompt_id": other, "nodes": {
            nid: {"value": 1, "max": 1, "state": "finished"} for nid in "3456789"}}},
        {"type": "executed", "data": {"node": "9", "output": {"images": [
            {"filename": "not-ours.png", "subfolder": "", "type": "output"}]}, "prompt_id": other}},
        {"type": "execution_error", "data": {"prompt_id": other, "node_id": "3", "node_type": "KSampler",
                                             "exception_message": "not ours"}},
        {"type": "execution_interrupted", "data": {"prompt_id": other, "node_id": "3"}},
        {"type": "execution_success", "data": {"prompt_id": other}},
        {"type": "executing", "data": {"node": None, "prompt_id": other}},
    ]
    for message in foreign:
        await fake.inject(message, client_id)
    metadata = json.dumps({"node_id": "3", "prompt_id": other, "image_type": "image/png"}).encode()
    await fake.inject(struct.pack(">II", 4, len(metadata)) + metadata + encode(photo((8, 8))), client_id)
    await fake.inject(b"\x00\x00\x00\x09unknown event type")
    events = await sub.wait(job_id)
    assert_monotonic_then_completed(events)
    # progress kept climbing step by step (a step is 4 %) instead of leaping with the foreign prompt's
    values = [d["progress"] for n, d in events if n == "progress"]
    assert max(b - a for a, b in zip(values, values[1:], strict=False)) <= 8
    assert len([1 for name, _ in events if name == "partial_image"]) == 20  # one per sampler step, ours only
    assert len(calls(fake, "GET", "/view")) == 1
    assert calls(fake, "GET", "/view")[0].query["filename"] != "not-ours.png"


async def test_legacy_server_without_prompt_ids(watch: Any) -> None:
    async with FakeComfyUI(step_delay=0.005, legacy=True) as fake:
        gw, sub = await watch(comfy_config(fake.url))
        job_id = await submit(gw, sub, quality="high")
        events = await sub.wait(job_id)
        assert_monotonic_then_completed(events)
        assert len({d["progress"] for n, d in events if n == "progress"}) >= 10
        assert "sampling step 30/30" in stages(events)
        # PREVIEW_IMAGE frames, without metadata
        assert len([1 for name, _ in events if name == "partial_image"]) == 30
        assert decode(events[-1][1]["result"]["data"][0]["b64_json"]).size == (96, 64)


async def test_edit_uploads_image_and_mask_then_binds_them(gateway_factory: GatewayFactory,
                                                           fake: FakeComfyUI) -> None:
    gw = await gateway_factory(config=comfy_config(fake.url, workflow=INPAINT, inputs=INPAINT_INPUTS))
    picture, mask = encode(photo((64, 48))), mask_png((64, 48), (8, 8, 23, 23))
    result = await gw.client().images.edit(image=("photo.png", picture, "image/png"), prompt="a red balloon",
                                           mask=("mask.png", mask, "image/png"), model="sd")
    assert result.data and decode(result.data[0].b64_json).size == (64, 48)  # inpainting keeps the input size

    (image_upload,) = calls(fake, "POST", "/upload/image")
    (mask_upload,) = calls(fake, "POST", "/upload/mask")
    uploaded = image_upload.form["image"]
    assert isinstance(uploaded, UploadedFile) and uploaded.data == picture
    assert uploaded.content_type == "image/png"
    assert image_upload.form["type"] == "input"
    mask_file = mask_upload.form["image"]
    assert isinstance(mask_file, UploadedFile) and mask_file.data == mask
    original_ref = json.loads(str(mask_upload.form["original_ref"]))
    assert original_ref == {"filename": uploaded.filename, "type": "input"}
    graph = submitted(fake)[0]["prompt"]
    assert graph["10"]["inputs"]["image"] == uploaded.filename
    assert graph["11"]["inputs"]["image"] == mask_file.filename
    assert graph["6"]["inputs"]["text"] == "a red balloon"
    # ComfyUI stored the photo with the mask as its alpha channel: LoadImageMask reads the hole from it
    masked = Image.open(io.BytesIO(fake.files[("input", "", mask_file.filename)]))
    assert masked.getchannel("A").getpixel((10, 10)) == 0 and masked.getchannel("A").getpixel((40, 40)) == 255

    # without a mask the photo's own transparency is the mask, as in OpenAI's edits; the same photo keeps
    # its name (ComfyUI cannot delete inputs: no pile of copies)
    await gw.client().images.edit(image=("photo.png", picture, "image/png"), prompt="fog", model="sd")
    graph = submitted(fake)[1]["prompt"]
    assert graph["11"]["inputs"]["image"] == graph["10"]["inputs"]["image"] == uploaded.filename
    assert len(calls(fake, "POST", "/upload/mask")) == 1 and len(calls(fake, "POST", "/upload/image")) == 2
    assert len([key for key in fake.files if key[0] == "input"]) == 2


async def test_requests_a_workflow_cannot_honour_are_refused(gateway_factory: GatewayFactory,
                                                              fake: FakeComfyUI) -> None:
    gw = await gateway_factory(config=comfy_config(fake.url))
    with pytest.raises(openai.BadRequestError) as caught:
        await gw.client().images.edit(image=("p.png", encode(photo()), "image/png"), prompt="x", model="sd")
    assert "no image input" in caught.value.message
    inpaint = await gateway_factory(config=comfy_config(fake.url, workflow=INPAINT, inputs=INPAINT_INPUTS))
    with pytest.raises(openai.BadRequestError) as caught:
        await inpaint.client().images.edit(image=("p.png", encode(photo()), "image/png"), prompt="x",
                                           model="sd", n=2)
    assert caught.value.body["param"] == "n"  # type: ignore[index]
    assert not fake.calls or not submitted(fake)


async def test_an_instance_that_is_down_is_skipped(gateway_factory: GatewayFactory,
                                                   fake: FakeComfyUI) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    gw = await gateway_factory(config=comfy_config(dead, fake.url))
    for i in range(3):
        assert (await gw.client().images.generate(prompt=f"p{i}", model="sd", size="64x64")).data
    assert len(submitted(fake)) == 3


async def test_comfyui_dying_mid_run_fails_the_job_clearly(watch: Any, http: aiohttp.ClientSession) -> None:
    fake = FakeComfyUI(step_delay=0.1)
    await fake.start()
    gw, sub = await watch(comfy_config(fake.url, reconnect_window=0.5))
    job_id = await submit(gw, sub)
    await until_stage(sub, job_id, "sampling step 2/")
    stopped = time.monotonic()
    await fake.stop()
    events = await sub.wait(job_id)
    assert time.monotonic() - stopped < 8
    assert events[-1][0] == "failed"
    async with http.get(f"{gw.url}/v1/images/jobs/{job_id}") as resp:
        job = await resp.json()
    assert job["status"] == "failed" and job["error"]["code"] == "upstream_unavailable"
    assert f"ComfyUI at {fake.url} was lost" in job["error"]["message"]


async def test_comfyui_dying_mid_run_is_retried_on_another_instance(watch: Any, fake2: FakeComfyUI) -> None:
    doomed = FakeComfyUI(step_delay=0.1)
    await doomed.start()
    # the doomed instance comes first: with equal load it is chosen
    gw, sub = await watch(comfy_config(doomed.url, fake2.url, reconnect_window=0.3))
    job_id = await submit(gw, sub)
    await until_stage(sub, job_id, "sampling step 2/")
    assert len(submitted(doomed)) == 1 and not submitted(fake2)
    await doomed.stop()
    events = await sub.wait(job_id)
    assert events[-1][0] == "completed"
    assert "retrying (2/3)" in stages(events)
    assert len(submitted(fake2)) == 1


async def test_progress_events_are_rate_limited(watch: Any, fake: FakeComfyUI) -> None:
    fake.step_delay = 0.03
    gw, sub = await watch(comfy_config(fake.url), progress_interval=0.25)
    started = time.monotonic()
    job_id = await submit(gw, sub, quality="medium")  # 20 steps: about 0.6 s of sampling
    events = await sub.wait(job_id)
    took = time.monotonic() - started
    assert_monotonic_then_completed(events)
    progress = [d for n, d in events if n == "progress"]
    assert 2 <= len(progress) <= took / 0.25 + 2  # unthrottled, this job sends over 30 updates


async def test_timeout_of_a_workflow_follows_the_model(gateway_factory: GatewayFactory,
                                                       fake: FakeComfyUI) -> None:
    fake.step_delay = 0.05
    config = comfy_config(fake.url, model={"timeout": 0.4, "retry": {"attempts": 1}})
    gw = await gateway_factory(config=config)
    with pytest.raises(openai.APIStatusError) as caught:
        await gw.client().images.generate(prompt="slow", model="sd", size="64x64")
    assert caught.value.status_code == 504
    await until(lambda: bool(calls(fake, "POST", "/interrupt")), "the timed-out prompt to be interrupted")
    # hours-long workflows: a deployment without a timeout of its own gets the model's, not the provider's
    from workers.router import Router

    async with aiohttp.ClientSession() as session:
        router = Router(comfy_config(fake.url, model={"timeout": 7200}), session)
        assert router.deployments["sd"][0].timeout == 7200
        bounded = comfy_config(fake.url, deployment={}, model={"timeout": 7200})
        bounded.models["sd"].deployments[0].timeout = 900
        assert Router(bounded, session).deployments["sd"][0].timeout == 900


def write_config(tmp_path: Path, workflow: dict[str, Any], inputs: dict[str, str]) -> Path:
    """A YAML config naming its workflow by a path relative to the config file."""
    (tmp_path / "workflows").mkdir(exist_ok=True)
    (tmp_path / "workflows" / "flow.json").write_text(json.dumps(workflow))
    config = {"providers": {"comfy": {"type": "comfyui", "options": {"instances": ["http://gpu1:8188"]}}},
              "models": {"sd": {"timeout": 7200, "deployments": [
                  {"provider": "comfy", "options": {"workflow": "workflows/flow.json", "inputs": inputs}}]}}}
    path = tmp_path / "gateway.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    env = {"IMAGEGW_CONFIG": str(path), "PATH": "/usr/bin:/bin", "GATEWAY_API_KEY": "sk-example"}
    return subprocess.run([sys.executable, "-m", "service.cli", "check-config"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def without(graph: dict[str, Any], node: str) -> dict[str, Any]:
    return {nid: n for nid, n in graph.items() if nid != node}


@pytest.mark.parametrize(("change", "expected"), [
    ("missing file", "cannot read"),
    ("unknown node", "inputs.seed names node '33'"),
    ("unknown input", "inputs.steps: node '3' (KSampler) has no input 'stepz'"),
    ("no output node", "no output node"),
    ("unknown output", "output node '12' is not in the workflow"),
    ("UI format", "not an API-format workflow"),
])
async def test_bad_templates_are_rejected_at_start_up(gateway_factory: GatewayFactory, tmp_path: Path,
                                                      change: str, expected: str) -> None:
    graph = json.loads(TXT2IMG.read_text())
    inputs = dict(TXT2IMG_INPUTS)
    deployment: dict[str, Any] = {}
    if change == "unknown node":
        inputs["seed"] = "33.seed"
    elif change == "unknown input":
        inputs["steps"] = "3.stepz"
    elif change == "no output node":
        graph = without(graph, "9")
    elif change == "unknown output":
        deployment["outputs"] = ["12"]
    elif change == "UI format":
        graph = {"nodes": [], "links": [], "version": 0.4}
    path = write_config(tmp_path, graph, inputs)
    workflow = tmp_path / "workflows" / "flow.json"
    if change == "missing file":
        workflow.unlink()
    config = comfy_config("http://gpu1:8188", workflow=workflow, inputs=inputs, deployment=deployment)
    with pytest.raises(ValueError) as caught:
        await gateway_factory(config=config)
    assert "models.sd.deployments.0" in str(caught.value) and str(workflow) in str(caught.value)
    assert expected in str(caught.value)
    if change == "unknown input":  # the CLI reads the same file through a relative path
        checked = await asyncio.to_thread(check_config, path)
        assert checked.returncode != 0
        output = checked.stdout + checked.stderr
        assert str(workflow) in output and expected in output


async def test_the_compose_example_config_passes_check_config(tmp_path: Path) -> None:
    # deploy/ is mounted at /etc/imagegw in the containers; here its workflow path is made relative to the
    # config file, which is how check-config and start-up resolve it
    text = (ROOT / "deploy" / "gateway.comfyui.yaml").read_text().replace("/etc/imagegw/", "")
    (tmp_path / "gateway.yaml").write_text(text)
    (tmp_path / "workflows").symlink_to(WORKFLOWS)
    checked = await asyncio.to_thread(check_config, tmp_path / "gateway.yaml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
