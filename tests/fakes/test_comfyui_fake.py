"""The fake ComfyUI against the frames and answers recorded from a real ComfyUI 0.3.64.

Each test drives the fake like a client would (WebSocket, ``POST /prompt``, frames until the
end of the prompt, ``/history``, ``/view``) and compares with ``shared/comfyui-protocol``.
"""

from __future__ import annotations

import asyncio
import copy
import io
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image

from tests.fakes.comfyui import PREVIEW_IMAGE, PREVIEW_IMAGE_WITH_METADATA, TEXT, FakeComfyUI, UploadedFile

pytestmark = pytest.mark.asyncio

PROTOCOL = Path(__file__).resolve().parents[3] / "shared" / "comfyui-protocol"
PNG_MAGIC = bytes.fromhex("89504e470d0a1a0a")
JPEG_MAGIC = b"\xff\xd8\xff"


def recording(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((PROTOCOL / name).read_text())
    return data


def recorded_prompt(rec: dict[str, Any]) -> dict[str, Any]:
    """The workflow the recording submitted, as the history echoes it."""
    entry = next(iter(rec["history"].values()))
    prompt: dict[str, Any] = copy.deepcopy(entry["prompt"][2])
    return prompt


@dataclass
class Frame:
    """A WebSocket frame: JSON (``type`` is the message type) or binary (``type`` is "binary:<event>")."""

    type: str
    data: Any  # the message's data, or the whole binary payload

    @property
    def label(self) -> str:
        """The type, plus the node for executing/executed: what the order comparisons look at."""
        if self.type in ("executing", "executed"):
            return f"{self.type}:{self.data['node']}"
        return self.type


def recorded_frames(rec: dict[str, Any]) -> list[Frame]:
    frames = []
    for entry in rec["messages"]:
        msg = entry["msg"]
        if msg.get("binary"):
            frames.append(Frame(f"binary:{msg['event']}", msg))
        else:
            frames.append(Frame(msg["type"], msg["data"]))
    return frames


def key_shapes(frames: list[Frame]) -> dict[str, set[frozenset[str]]]:
    """Message type -> the key sets its data came with (progress_state node entries included)."""
    shapes: dict[str, set[frozenset[str]]] = {}
    for frame in frames:
        if frame.type.startswith("binary:"):
            continue
        shapes.setdefault(frame.type, set()).add(frozenset(frame.data))
        if frame.type == "progress_state":
            for node in frame.data["nodes"].values():
                shapes.setdefault("progress_state.node", set()).add(frozenset(node))
    return shapes


def node_states(frames: list[Frame]) -> list[dict[str, tuple[str, float, float]]]:
    return [
        {
            node_id: (node["state"], node["value"], node["max"])
            for node_id, node in frame.data["nodes"].items()
        }
        for frame in frames
        if frame.type == "progress_state"
    ]


@dataclass
class Client:
    """A ComfyUI client: one WebSocket plus the HTTP calls, as an adapter would make them."""

    session: aiohttp.ClientSession
    fake: FakeComfyUI
    client_id: str
    ws: aiohttp.ClientWebSocketResponse
    greeting: dict[str, Any]

    async def submit(self, prompt: dict[str, Any], **extra: Any) -> str:
        body = {"prompt": prompt, "client_id": self.client_id, **extra}
        async with self.session.post(self.fake.url + "/prompt", json=body) as resp:
            answer = await resp.json()
            assert resp.status == 200, answer
        assert set(answer) == {"prompt_id", "number", "node_errors"}
        prompt_id: str = answer["prompt_id"]
        return prompt_id

    async def frame(self, within: float = 10.0) -> Frame:
        msg = await self.ws.receive(timeout=within)
        if msg.type is aiohttp.WSMsgType.BINARY:
            return Frame(f"binary:{struct.unpack('>I', msg.data[:4])[0]}", msg.data)
        assert msg.type is aiohttp.WSMsgType.TEXT, msg
        data = json.loads(msg.data)
        return Frame(data["type"], data["data"])

    async def frames_until(self, label: str) -> list[Frame]:
        frames = [await self.frame()]
        while frames[-1].label != label:
            frames.append(await self.frame())
        return frames

    async def frames_until_done(self, prompt_id: str) -> list[Frame]:
        """Every frame up to the prompt's end: ``executing`` with ``node: null``."""
        frames = [await self.frame()]
        while not (
            frames[-1].type == "executing" and frames[-1].data == {"node": None, "prompt_id": prompt_id}
        ):
            frames.append(await self.frame())
        return frames

    async def get_json(self, path: str) -> Any:
        async with self.session.get(self.fake.url + path) as resp:
            assert resp.status == 200
            return await resp.json()

    async def post_json(self, path: str, body: Any) -> int:
        async with self.session.post(self.fake.url + path, json=body) as resp:
            return resp.status


async def connect(
    session: aiohttp.ClientSession,
    fake: FakeComfyUI,
    client_id: str | None = None,
    *,
    feature_flags: bool = False,
) -> Client:
    client_id = client_id or str(uuid.uuid4())
    ws = await session.ws_connect(f"{fake.ws_url}?clientId={client_id}")
    client = Client(session, fake, client_id, ws, {})
    greeting = await client.frame()
    assert greeting.type == "status"
    client.greeting = greeting.data
    if feature_flags:
        await ws.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
        answer = await client.frame()
        assert answer.type == "feature_flags"
    return client


def _image(width: Any = 64) -> dict[str, Any]:
    return {"class_type": "EmptyImage", "inputs": {"width": width, "height": 64, "batch_size": 1, "color": 0}}


def _node(class_type: str, **inputs: Any) -> dict[str, Any]:
    return {"class_type": class_type, "inputs": inputs}


def sd_prompt(
    steps: int = 4, width: int = 256, height: int = 192, batch_size: int = 2, seed: int = 1
) -> dict[str, Any]:
    """A text-to-image workflow in API format, as the ComfyUI front end exports it."""
    links = {"model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}
    return {
        "3": _node(
            "KSampler",
            seed=seed,
            steps=steps,
            cfg=7.0,
            sampler_name="euler",
            scheduler="normal",
            denoise=1.0,
            **links,
        ),
        "4": _node("CheckpointLoaderSimple", ckpt_name="v1-5-pruned-emaonly.safetensors"),
        "5": _node("EmptyLatentImage", width=width, height=height, batch_size=batch_size),
        "6": _node("CLIPTextEncode", text="a lighthouse at dusk", clip=["4", 1]),
        "7": _node("CLIPTextEncode", text="blurry", clip=["4", 1]),
        "8": _node("VAEDecode", samples=["3", 0], vae=["4", 2]),
        "9": _node("SaveImage", filename_prefix="gateway", images=["8", 0]),
    }


def png_bytes(size: tuple[int, int], mode: str = "RGB", color: Any = (10, 20, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
async def fake() -> AsyncIterator[FakeComfyUI]:
    async with FakeComfyUI() as server:
        yield server


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


async def test_first_run_matches_main_recording(fake: FakeComfyUI, session: aiohttp.ClientSession) -> None:
    rec = recording("main.json")
    client = await connect(session, fake)
    assert client.greeting == {"status": {"exec_info": {"queue_remaining": 0}}, "sid": client.client_id}
    prompt_id = await client.submit(recorded_prompt(rec))
    frames = await client.frames_until_done(prompt_id)

    expected = recorded_frames(rec)[1:]  # after the greeting
    assert [f.label for f in frames] == [f.label for f in expected]
    assert key_shapes(frames) == key_shapes(expected)
    assert node_states(frames) == node_states(expected)
    for mine, theirs in zip(frames, expected, strict=True):
        if mine.type.startswith("binary:"):
            assert mine.data[:16].hex() == theirs.data["head_hex"]
        if mine.type == f"binary:{TEXT}":
            assert len(mine.data) == theirs.data["len"]

    history = await client.get_json(f"/history/{prompt_id}")
    entry, recorded_entry = history[prompt_id], next(iter(rec["history"].values()))
    assert list(entry) == list(recorded_entry) == ["prompt", "outputs", "status", "meta"]
    assert [entry["prompt"][i] for i in (2, 4)] == [recorded_entry["prompt"][i] for i in (2, 4)]
    assert entry["prompt"][:2] == [0, prompt_id] and entry["prompt"][3] == {"client_id": client.client_id}
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
    assert [m[0] for m in entry["status"]["messages"]] == [m[0] for m in recorded_entry["status"]["messages"]]
    assert entry["meta"].keys() == recorded_entry["meta"].keys() == entry["outputs"].keys()
    sizes = {"8": (512, 256), "9": (512, 512)}  # ImageScale: width from GetImageSize, height 256
    for node_id, output in entry["outputs"].items():
        (image,) = output["images"]
        assert image.keys() == recorded_entry["outputs"][node_id]["images"][0].keys()
        assert image["type"] == recorded_entry["outputs"][node_id]["images"][0]["type"]
        async with session.get(fake.url + "/view", params=image) as resp:
            assert resp.status == 200 and resp.content_type == "image/png"
            body = await resp.read()
        assert body[:8] == PNG_MAGIC
        assert Image.open(io.BytesIO(body)).size == sizes[node_id]
    assert await client.get_json("/queue") == rec["queue_after"]
    await client.ws.close()


async def test_resubmission_is_cached_like_main_ff(fake: FakeComfyUI, session: aiohttp.ClientSession) -> None:
    rec = recording("main_ff.json")
    client = await connect(session, fake, feature_flags=True)
    first_id = await client.submit(recorded_prompt(rec))
    first = await client.frames_until_done(first_id)
    second_id = await client.submit(recorded_prompt(rec))
    frames = await client.frames_until_done(second_id)

    expected = recorded_frames(rec)[2:]  # after the greeting and the feature_flags answer
    assert [f.label for f in frames] == [f.label for f in expected]
    assert key_shapes(frames) == key_shapes(expected)
    assert node_states(frames) == node_states(expected)
    cached = next(f for f in frames if f.type == "execution_cached")
    assert cached.data["nodes"] == next(f for f in expected if f.type == "execution_cached").data["nodes"]
    replayed = {f.data["node"]: f.data["output"] for f in frames if f.type == "executed"}
    assert replayed == {f.data["node"]: f.data["output"] for f in first if f.type == "executed"}

    (preview,) = [f for f in frames if f.type == f"binary:{PREVIEW_IMAGE_WITH_METADATA}"]
    recorded_preview = next(f for f in expected if f.type == f"binary:{PREVIEW_IMAGE_WITH_METADATA}")
    assert preview.data[:16].hex() == recorded_preview.data["head_hex"]
    (length,) = struct.unpack(">I", preview.data[4:8])
    metadata = json.loads(preview.data[8 : 8 + length])
    assert metadata.keys() == recorded_preview.data["metadata"].keys()
    assert metadata["prompt_id"] == second_id and metadata["image_type"] == "image/png"
    assert preview.data[8 + length :][:8] == PNG_MAGIC

    history = await client.get_json(f"/history/{second_id}")
    assert history[second_id]["outputs"] == replayed
    await client.ws.close()


async def test_websocket_batch_matches_ws_batch(fake: FakeComfyUI, session: aiohttp.ClientSession) -> None:
    rec = recording("ws_batch.json")
    client = await connect(session, fake)
    prompt_id = await client.submit(recorded_prompt(rec))
    frames = await client.frames_until_done(prompt_id)

    expected = recorded_frames(rec)[1:]
    assert [f.label for f in frames] == [f.label for f in expected]
    assert key_shapes(frames) == key_shapes(expected)
    assert node_states(frames) == node_states(expected)
    progress = [(f.data["value"], f.data["max"]) for f in frames if f.type == "progress"]
    assert progress == [(i, 4) for i in range(4)]
    images = [f.data for f in frames if f.type == f"binary:{PREVIEW_IMAGE}"]
    recorded_images = [f.data for f in expected if f.type == f"binary:{PREVIEW_IMAGE}"]
    assert [image[:16].hex() for image in images] == [image["head_hex"] for image in recorded_images]
    assert {Image.open(io.BytesIO(image[8:])).size for image in images} == {(128, 128)}
    history = await client.get_json(f"/history/{prompt_id}")
    assert history[prompt_id]["outputs"] == {} and history[prompt_id]["meta"] == {}
    await client.ws.close()


SCALE = {"width": 32, "height": 32, "crop": "disabled"}
REJECTED_PROMPTS: dict[str, Any] = {
    "invalid_node_type": {"1": _image(), "2": _node("NoSuchNode"), "3": _node("SaveImage", images=["1", 0])},
    "value_out_of_range": {
        "1": _image(-5),
        "2": _node("ImageInvert", image=["1", 0]),
        "3": _node("SaveImage", images=["2", 0], filename_prefix="x"),
    },
    "missing_required_input": {
        "1": _image(),
        "2": _node("ImageInvert", image=["1", 0]),
        "3": _node("ImageBlur", image=["2", 0]),
        "4": _node("PreviewImage", images=["3", 0]),
    },
    "bad_combo_value": {
        "1": _image(),
        "2": _node("ImageScale", image=["1", 0], upscale_method="magic", **SCALE),
        "3": _node("ImageInvert", image=["2", 0]),
        "4": _node("SaveImage", images=["3", 0], filename_prefix="x"),
    },
    "link_to_missing_node": {"1": _image(), "3": _node("SaveImage", images=["77", 0], filename_prefix="x")},
    "no_output_node": {"1": _image()},
    "missing_class_type": {"1": {"inputs": {}}, "2": _node("PreviewImage", images=["1", 0])},
}


def _normalized(body: Any) -> Any:
    """Tracebacks blanked (they name files) and each node's errors sorted (ComfyUI walks a set)."""
    if isinstance(body, dict):
        if isinstance(body.get("traceback"), list):
            assert all(isinstance(line, str) for line in body["traceback"])
            body = {**body, "traceback": "<traceback>"}
        if isinstance(body.get("errors"), list):
            body = {**body, "errors": sorted(body["errors"], key=json.dumps)}
        return {key: _normalized(value) for key, value in body.items()}
    if isinstance(body, list):
        return [_normalized(value) for value in body]
    return body


@pytest.mark.parametrize("case", sorted(recording("errors.json")))
async def test_rejections_match_errors_json(
    fake: FakeComfyUI, session: aiohttp.ClientSession, case: str
) -> None:
    expected = recording("errors.json")[case]
    if case == "malformed_json_body":
        request: dict[str, Any] = {"data": b"{not json", "headers": {"Content-Type": "application/json"}}
    elif case == "no_prompt_key":
        request = {"json": {"client_id": "someone"}}
    else:
        request = {"json": {"prompt": REJECTED_PROMPTS[case], "client_id": "someone"}}
    async with session.post(fake.url + "/prompt", **request) as resp:
        assert resp.status == expected["status"]
        if isinstance(expected["body"], str):
            assert await resp.text() == expected["body"]
        else:
            assert _normalized(await resp.json()) == _normalized(expected["body"])
    assert fake.executed_prompt_ids == []


async def test_runtime_error_matches_recording(fake: FakeComfyUI, session: aiohttp.ClientSession) -> None:
    rec = recording("runtime_error.json")
    client = await connect(session, fake)
    prompt_id = await client.submit(recorded_prompt(rec))
    frames = await client.frames_until_done(prompt_id)

    expected = recorded_frames(rec)[1:]
    assert [f.label for f in frames] == [f.label for f in expected]
    assert key_shapes(frames) == key_shapes(expected)
    error = next(f.data for f in frames if f.type == "execution_error")
    recorded_error = next(f.data for f in expected if f.type == "execution_error")
    for key in ("node_id", "node_type", "executed", "exception_type"):
        assert error[key] == recorded_error[key]
    assert error["exception_message"].splitlines()[0] == recorded_error["exception_message"].splitlines()[0]
    assert error["current_inputs"].keys() <= recorded_error["current_inputs"].keys()
    assert sorted(error["current_outputs"]) == sorted(recorded_error["current_outputs"])

    entry = (await client.get_json(f"/history/{prompt_id}"))[prompt_id]
    recorded_entry = next(iter(rec["history"].values()))
    assert (entry["status"]["status_str"], entry["status"]["completed"]) == ("error", False)
    assert [m[0] for m in entry["status"]["messages"]] == [m[0] for m in recorded_entry["status"]["messages"]]
    assert entry["outputs"] == recorded_entry["outputs"] == {}
    await client.ws.close()


async def test_fail_node_reports_execution_error(fake: FakeComfyUI, session: aiohttp.ClientSession) -> None:
    recorded = recorded_frames(recording("runtime_error.json"))
    recorded_error = next(f.data for f in recorded if f.type == "execution_error")
    prompt = {
        "1": _image(),
        "2": _node("ImageInvert", image=["1", 0]),
        "3": _node("PreviewImage", images=["2", 0]),
    }
    fake.fail_node = "2"
    client = await connect(session, fake)
    prompt_id = await client.submit(prompt)
    frames = await client.frames_until_done(prompt_id)
    assert [f.label for f in frames][-4:] == ["executing:2", "execution_error", "status", "executing:None"]
    error = frames[-3].data
    assert error.keys() == recorded_error.keys()
    assert (error["node_id"], error["node_type"], error["executed"]) == ("2", "ImageInvert", ["1"])
    assert error["exception_message"] == "fake failure\n"

    fake.fail_node = None  # the server carries on, and node 1 was cached by the failed run
    prompt_id = await client.submit(prompt)
    frames = await client.frames_until_done(prompt_id)
    assert next(f.data["nodes"] for f in frames if f.type == "execution_cached") == ["1"]
    assert "execution_success" in [f.type for f in frames]
    await client.ws.close()


async def test_interrupt_matches_interrupt_stock(fake: FakeComfyUI, session: aiohttp.ClientSession) -> None:
    rec = recording("interrupt_stock.json")
    fake.node_delay = 0.3  # stock nodes do not look at the interrupt flag while they work
    client = await connect(session, fake)
    prompt_id = await client.submit(recorded_prompt(rec))
    frames = await client.frames_until("executing:11")
    async with session.post(fake.url + "/interrupt") as resp:
        assert resp.status == rec["interrupt_status"]
        assert await resp.text() == rec["interrupt_body"]
    frames += await client.frames_until_done(prompt_id)

    expected = recorded_frames(rec)[1:]
    assert [f.label for f in frames] == [f.label for f in expected]
    assert key_shapes(frames) == key_shapes(expected)
    assert node_states(frames) == node_states(expected)
    interrupted = next(f.data for f in frames if f.type == "execution_interrupted")
    recorded_interrupted = next(f.data for f in expected if f.type == "execution_interrupted")
    assert {k: v for k, v in interrupted.items() if k not in ("prompt_id", "timestamp")} == {
        k: v for k, v in recorded_interrupted.items() if k not in ("prompt_id", "timestamp")
    }
    entry = (await client.get_json(f"/history/{prompt_id}"))[prompt_id]
    recorded_entry = next(iter(rec["history"].values()))
    assert entry["status"]["status_str"] == recorded_entry["status"]["status_str"] == "error"
    assert entry["status"]["completed"] is False
    assert [m[0] for m in entry["status"]["messages"]] == [m[0] for m in recorded_entry["status"]["messages"]]
    assert entry["outputs"] == entry["meta"] == {}
    assert await client.get_json("/queue") == rec["queue_after"]
    await client.ws.close()


async def test_targeted_interrupt_stops_a_sampler_between_steps(
    fake: FakeComfyUI, session: aiohttp.ClientSession
) -> None:
    fake.step_delay = 0.02
    client = await connect(session, fake)
    prompt_id = await client.submit(sd_prompt(steps=50))
    frames = await client.frames_until("progress")
    assert await client.post_json("/interrupt", {"prompt_id": "not-running"}) == 200
    while frames[-1].type != "progress" or frames[-1].data["value"] < 5:  # still going
        frames.append(await client.frame())
    assert await client.post_json("/interrupt", {"prompt_id": prompt_id}) == 200
    frames += await client.frames_until_done(prompt_id)

    interrupted = next(f.data for f in frames if f.type == "execution_interrupted")
    assert (interrupted["node_id"], interrupted["node_type"]) == ("3", "KSampler")
    assert 5 <= max(f.data["value"] for f in frames if f.type == "progress") < 50
    assert [f.type for f in frames][-3:] == ["execution_interrupted", "status", "executing"]
    await client.ws.close()


async def test_queue_runs_one_prompt_at_a_time(fake: FakeComfyUI, session: aiohttp.ClientSession) -> None:
    misc = recording("queue_misc.json")
    fake.step_delay = 0.02
    client = await connect(session, fake)
    first, second, third = [await client.submit(sd_prompt(steps=8, seed=seed)) for seed in (1, 2, 3)]
    assert await client.get_json("/prompt") == {"exec_info": {"queue_remaining": 3}}
    frames = await client.frames_until("execution_start")
    queue = await client.get_json("/queue")
    assert [item[1] for item in queue["queue_running"]] == [first]
    assert [item[1] for item in queue["queue_pending"]] == [second, third]
    example = misc["queue_with_pending"]["example_item_minus_prompt"]
    for item in queue["queue_running"] + queue["queue_pending"]:
        assert [type(value) for value in item] == [type(value) for value in example[:2]] + [dict, dict, list]
        assert item[3] == {"client_id": client.client_id} and item[4] == ["9"]

    assert await client.post_json("/queue", {"delete": [second]}) == misc["delete_status"]
    front = await client.submit(sd_prompt(steps=8, seed=4), front=True)  # jumps ahead of `third`
    frames += await client.frames_until_done(first)
    frames += await client.frames_until_done(front)
    frames += await client.frames_until_done(third)

    assert fake.executed_prompt_ids == [first, front, third]
    assert fake.max_concurrent == 1
    starts = [f.data["prompt_id"] for f in frames if f.type == "execution_start"]
    ends = [f.data["prompt_id"] for f in frames if f.type == "execution_success"]
    assert starts == ends == [first, front, third]
    remaining = {f.data["status"]["exec_info"]["queue_remaining"] for f in frames if f.type == "status"}
    assert remaining <= {0, 1, 2, 3}
    assert await client.get_json(f"/history/{second}") == misc["history_of_deleted"]["body"]
    assert list(await client.get_json("/history?max_items=2")) == [front, third]
    assert await client.get_json("/queue") == misc["queue_final"]
    await client.ws.close()


async def test_hold_keeps_prompts_queued_until_released(session: aiohttp.ClientSession) -> None:
    async with FakeComfyUI(hold=True, step_delay=0.001) as fake:
        client = await connect(session, fake)
        first, second = [await client.submit(sd_prompt(steps=2, seed=seed)) for seed in (1, 2)]
        await asyncio.sleep(0.05)
        queue = await client.get_json("/queue")
        assert queue["queue_running"] == [] and [item[1] for item in queue["queue_pending"]] == [first, second]
        assert fake.executed_prompt_ids == []
        fake.release()
        await client.frames_until_done(first)
        await client.frames_until_done(second)
        assert fake.executed_prompt_ids == [first, second]
        await client.ws.close()


async def test_sampler_progress_and_previews(fake: FakeComfyUI, session: aiohttp.ClientSession) -> None:
    plain = await connect(session, fake)
    prompt_id = await plain.submit(sd_prompt(steps=4))
    frames = await plain.frames_until_done(prompt_id)
    progress = [f.data for f in frames if f.type == "progress"]
    assert progress == [{"value": i, "max": 4, "prompt_id": prompt_id, "node": "3"} for i in range(1, 5)]
    previews = [f.data for f in frames if f.type == f"binary:{PREVIEW_IMAGE}"]
    assert len(previews) == 4 and all(
        p[4:8] == b"\x00\x00\x00\x01" and p[8:11] == JPEG_MAGIC for p in previews
    )
    labels = [f.label for f in frames]
    assert labels[labels.index("executing:3") + 1 : labels.index("executing:3") + 4] == [
        "progress_state", "progress", f"binary:{PREVIEW_IMAGE}"
    ]  # fmt: skip
    assert node_states(frames)[-1]["3"] == ("finished", 4, 4)
    (saved,) = [f.data for f in frames if f.type == "executed"]
    names = [image["filename"] for image in saved["output"]["images"]]
    assert names == ["gateway_00001_.png", "gateway_00002_.png"]
    for image in saved["output"]["images"]:
        async with session.get(fake.url + "/view", params=image) as resp:
            assert Image.open(io.BytesIO(await resp.read())).size == (256, 192)

    modern = await connect(session, fake, feature_flags=True)
    prompt_id = await modern.submit(sd_prompt(steps=3, seed=2))
    frames = await modern.frames_until_done(prompt_id)
    previews = [f.data for f in frames if f.type == f"binary:{PREVIEW_IMAGE_WITH_METADATA}"]
    assert len(previews) == 3 and not [f for f in frames if f.type == f"binary:{PREVIEW_IMAGE}"]
    (length,) = struct.unpack(">I", previews[0][4:8])
    assert json.loads(previews[0][8 : 8 + length])["image_type"] == "image/jpeg"
    assert previews[0][8 + length :][:3] == JPEG_MAGIC
    await plain.ws.close()
    await modern.ws.close()


async def test_record_sent_stamps_every_text_frame_written(session: aiohttp.ClientSession) -> None:
    async with FakeComfyUI(record_sent=True, previews=False) as fake:
        client = await connect(session, fake)
        other = await connect(session, fake)
        before = time.monotonic()
        prompt_id = await client.submit(sd_prompt(steps=2))
        frames = await client.frames_until_done(prompt_id)
        received = time.monotonic()
        mine = [sent for sent in fake.sent_frames if sent.client_id == client.client_id]
        # the greeting, then each frame the client read, in order, stamped while the prompt ran
        assert [json.loads(sent.text)["type"] for sent in mine] == ["status"] + [f.type for f in frames]
        assert [sent.at for sent in mine] == sorted(sent.at for sent in mine)
        assert before <= mine[1].at and mine[-1].at <= received
        assert {sent.client_id for sent in fake.sent_frames} == {client.client_id, other.client_id}
        await client.ws.close()
        await other.ws.close()
    async with FakeComfyUI() as quiet:
        await connect(session, quiet)
        assert quiet.sent_frames == []  # recording is opt-in


async def test_legacy_server_shapes(session: aiohttp.ClientSession) -> None:
    async with FakeComfyUI(legacy=True) as fake:
        client = await connect(session, fake)
        await client.ws.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
        prompt_id = await client.submit(sd_prompt(steps=2))
        frames = await client.frames_until_done(prompt_id)
        types = {f.type for f in frames}
        assert "progress_state" not in types and "feature_flags" not in types
        assert {frozenset(f.data) for f in frames if f.type == "progress"} == {frozenset({"value", "max"})}
        assert all("display_node" not in f.data for f in frames if f.type in ("executing", "executed"))
        assert len([f for f in frames if f.type == f"binary:{PREVIEW_IMAGE}"]) == 2
        async with session.get(fake.url + "/features") as resp:
            assert resp.status == 404
        await client.ws.close()


async def test_messages_are_routed_like_comfyui(fake: FakeComfyUI, session: aiohttp.ClientSession) -> None:
    owner = await connect(session, fake)
    other = await connect(session, fake)
    prompt = {
        "1": _image(),
        "2": _node("GetImageSize", image=["1", 0]),
        "3": _node(
            "ImageScale", image=["1", 0], upscale_method="area", width=["2", 0], height=32, crop="disabled"
        ),
        "4": _node("PreviewImage", images=["3", 0]),
    }
    prompt_id = await owner.submit(prompt)
    owned = await owner.frames_until_done(prompt_id)
    await fake.inject({"type": "marker", "data": {}}, client_id=other.client_id)
    seen = await other.frames_until("marker")

    # status and progress_state go to everyone (as ComfyUI's WebUIProgressHandler), TEXT frames too
    assert {f.type for f in seen} == {"status", "progress_state", f"binary:{TEXT}", "marker"}
    assert [f for f in seen if f.type == "progress_state"] == [f for f in owned if f.type == "progress_state"]
    text = next(f.data for f in seen if f.type == f"binary:{TEXT}")
    assert text[8:9] == b"2" and text[9:] == b"width: 64, height: 64\n batch size: 1"

    foreign = {"type": "progress", "data": {"value": 1, "max": 9, "prompt_id": "someone-else", "node": "3"}}
    await fake.inject(foreign, client_id=owner.client_id)
    assert await owner.frame() == Frame("progress", foreign["data"])
    await owner.ws.close()
    await other.ws.close()


@pytest.mark.parametrize("abrupt", [False, True])
async def test_reconnect_after_dropped_websockets(
    fake: FakeComfyUI, session: aiohttp.ClientSession, abrupt: bool
) -> None:
    fake.step_delay = 0.02
    client = await connect(session, fake)
    prompt_id = await client.submit(sd_prompt(steps=40))
    await client.frames_until("progress")
    await fake.drop_websockets(abrupt=abrupt)
    ends = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
    while (await client.ws.receive(timeout=5)).type not in ends:  # frames sent before the drop
        pass
    assert fake.running is not None and fake.running.prompt_id == prompt_id  # the run goes on

    again = await connect(session, fake, client.client_id)
    assert again.greeting == {"status": {"exec_info": {"queue_remaining": 1}}, "sid": client.client_id}
    assert await again.frame() == Frame("executing", {"node": "3"})  # ComfyUI's reconnect hint, no prompt_id
    frames = await again.frames_until_done(prompt_id)
    assert "execution_success" in [f.type for f in frames]
    assert (await again.get_json(f"/history/{prompt_id}"))[prompt_id]["status"]["status_str"] == "success"
    await client.ws.close()
    await again.ws.close()


async def test_hang_never_finishes_until_interrupted(
    fake: FakeComfyUI, session: aiohttp.ClientSession
) -> None:
    fake.hang = True
    client = await connect(session, fake)
    prompt_id = await client.submit(sd_prompt())
    await client.frames_until("executing:4")
    with pytest.raises(TimeoutError):
        await client.frame(within=0.3)
    assert [item[1] for item in (await client.get_json("/queue"))["queue_running"]] == [prompt_id]
    assert await client.get_json(f"/history/{prompt_id}") == {}

    assert await client.post_json("/interrupt", {}) == 200
    frames = await client.frames_until_done(prompt_id)
    assert [f.type for f in frames] == ["execution_interrupted", "status", "executing"]
    assert frames[0].data["node_id"] == "4"
    await client.ws.close()


async def test_uploads_view_and_load_image(fake: FakeComfyUI, session: aiohttp.ClientSession) -> None:
    async def upload(path: str, data: bytes, name: str = "photo.png", **fields: str) -> Any:
        form = aiohttp.FormData(fields)
        form.add_field("image", data, filename=name, content_type="image/png")
        async with session.post(fake.url + path, data=form) as resp:
            assert resp.status == 200
            return await resp.json()

    photo = png_bytes((40, 30))
    assert await upload("/upload/image", photo) == {"name": "photo.png", "subfolder": "", "type": "input"}
    assert (await upload("/upload/image", photo))["name"] == "photo.png"  # same bytes: same file
    assert (await upload("/upload/image", png_bytes((40, 30), color=(1, 2, 3))))["name"] == "photo (1).png"
    assert (await upload("/upload/image", photo, overwrite="true"))["name"] == "photo.png"
    assert await upload("/upload/image", photo, subfolder="edits", type="temp") == {
        "name": "photo.png", "subfolder": "edits", "type": "temp"
    }  # fmt: skip

    mask = png_bytes((40, 30), "RGBA", (0, 0, 0, 7))
    ref = json.dumps({"filename": "photo.png", "subfolder": "", "type": "input"})
    answer = await upload("/upload/mask", mask, "clipspace-mask.png", subfolder="clipspace", original_ref=ref)
    assert answer == {"name": "clipspace-mask.png", "subfolder": "clipspace", "type": "input"}
    async with session.get(fake.url + "/view", params=answer | {"filename": answer["name"]}) as resp:
        masked = Image.open(io.BytesIO(await resp.read()))
    assert masked.mode == "RGBA" and masked.getpixel((0, 0)) == (10, 20, 30, 7)

    upload_call = next(call for call in fake.calls if call.path == "/upload/mask")
    assert upload_call.form["original_ref"] == ref and upload_call.form["subfolder"] == "clipspace"
    image_field = upload_call.form["image"]
    assert isinstance(image_field, UploadedFile) and image_field.data == mask

    client = await connect(session, fake)
    preview = _node("PreviewImage", images=["1", 0])
    prompt_id = await client.submit({"1": _node("LoadImage", image="photo.png"), "2": preview})
    (executed,) = [f.data for f in await client.frames_until_done(prompt_id) if f.type == "executed"]
    async with session.get(fake.url + "/view", params=executed["output"]["images"][0]) as resp:
        assert Image.open(io.BytesIO(await resp.read())).size == (40, 30)
    rejected = {"prompt": {"1": _node("LoadImage", image="missing.png"), "2": preview}}
    async with session.post(fake.url + "/prompt", json=rejected) as resp:
        assert resp.status == 400
        (error,) = (await resp.json())["node_errors"]["1"]["errors"]
    assert error["type"] == "custom_validation_failed"
    assert error["details"] == "image - Invalid image file: missing.png"
    await client.ws.close()


async def test_misc_endpoints_match_queue_misc(fake: FakeComfyUI, session: aiohttp.ClientSession) -> None:
    misc = recording("queue_misc.json")
    async with session.get(fake.url + "/system_stats") as resp:
        stats = await resp.json()
    assert stats.keys() == misc["system_stats"].keys()
    assert stats["system"].keys() == misc["system_stats"]["system"].keys()
    assert stats["devices"][0].keys() == misc["system_stats"]["devices"][0].keys()
    async with session.get(fake.url + "/api/features") as resp:
        assert resp.status == misc["features"]["status"]
        assert await resp.json() == json.loads(misc["features"]["body"])
    async with session.get(fake.url + "/history/not-a-prompt") as resp:
        assert (resp.status, await resp.json()) == (200, {})
    for case, params in (("view_missing", {"filename": "nope.png", "type": "output"}),
                         ("view_traversal", {"filename": "../secret.png", "type": "output"})):  # fmt: skip
        async with session.get(fake.url + "/view", params=params) as resp:
            assert (resp.status, await resp.text()) == (misc[case]["status"], misc[case]["body"])
    async with session.get(fake.url + "/view", params={"filename": "a.png", "subfolder": "../.."}) as resp:
        assert resp.status == 403
    async with session.get(fake.url + "/object_info/KSampler") as resp:
        info = await resp.json()
    assert info["KSampler"]["input"]["required"]["steps"][0] == "INT"
    assert info["KSampler"]["output"] == ["LATENT"] and info["KSampler"]["output_node"] is False

    call = next(call for call in fake.calls if call.path == "/view")
    assert call.method == "GET" and call.query == {"filename": "nope.png", "type": "output"}
    assert call.headers["host"] == fake.url.removeprefix("http://")
