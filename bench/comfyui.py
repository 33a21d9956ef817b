"""A farm of fake ComfyUI servers, the far end of the progress scenario, and the send time of their frames.

Each instance is `tests/fakes/comfyui.py`'s `FakeComfyUI` (ComfyUI 0.3.64's protocol, one prompt at a time,
like a real instance) on its own port, with previews off and STEP_DELAY seconds per sampler step. Every text
frame an instance writes is stamped with `time.monotonic()` (one clock for every process on the machine) just
before the write.

Prompts are held in the instances' queues until `POST /release`, which starts instance i at i/n of a step
delay: the jobs' steps then interleave evenly, as independent jobs' would, instead of all coming at once.
`GET /held` counts the prompts held. `GET /steps` answers, for every prompt the farm ran, its prompt text (the
input the bench config binds to `prompt`) and, for each sampler step k, the send time of the first frame that
told it (ComfyUI sends a step's `progress_state` before its `progress`).

Run as `python -m bench.comfyui PORT COUNT STEP_DELAY`; prints "ready" and the instances' URLs once all listen.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from aiohttp import web

from bench.servers import COMFYUI_INPUTS
from tests.fakes.comfyui import FakeComfyUI

FARM = web.AppKey("farm", list[FakeComfyUI])
STEP_DELAY = web.AppKey("step_delay", float)


def prompt_steps(fake: FakeComfyUI) -> list[dict[str, Any]]:
    """Each prompt `fake` ran: its prompt text and {step: send time of the step's first frame}."""
    node, _, field = COMFYUI_INPUTS["prompt"].partition(".")
    samplers: dict[str, set[str]] = {}  # prompt id -> its sampler nodes
    texts: dict[str, str] = {}
    for prompt_id, entry in fake.history.items():
        graph = entry["prompt"][2]
        texts[prompt_id] = graph[node]["inputs"][field]
        samplers[prompt_id] = {nid for nid, n in graph.items() if n["class_type"] in fake.sampler_types}
    steps: dict[str, dict[int, float]] = {prompt_id: {} for prompt_id in texts}
    for sent in fake.sent_frames:
        message = json.loads(sent.text)  # every text frame of the fake: {"type": ..., "data": {...}}
        kind, data = message["type"], message["data"]
        prompt_id = str(data.get("prompt_id"))
        if prompt_id not in steps:
            continue
        if kind == "progress_state":
            told = [int(state["value"]) for nid, state in data["nodes"].items()
                    if nid in samplers[prompt_id] and state["state"] == "running"]
        elif kind == "progress" and data.get("node") in samplers[prompt_id]:
            told = [int(data["value"])]
        else:
            continue
        for step in told:
            if step >= 1:  # a node's start reports 0 of 1: no step
                steps[prompt_id].setdefault(step, sent.at)
    return [{"prompt": texts[prompt_id], "steps": steps[prompt_id]} for prompt_id in texts]


async def report(request: web.Request) -> web.Response:
    return web.json_response([prompt for fake in request.app[FARM] for prompt in prompt_steps(fake)])


async def held(request: web.Request) -> web.Response:
    return web.json_response({"held": sum(len(fake.pending) for fake in request.app[FARM] if fake.hold)})


async def release(request: web.Request) -> web.Response:
    farm = request.app[FARM]
    loop = asyncio.get_running_loop()
    for i, fake in enumerate(farm):
        loop.call_later(i * request.app[STEP_DELAY] / len(farm), fake.release)
    return web.json_response({"released": len(farm)})


async def serve(port: int, count: int, step_delay: float) -> None:
    farm = [FakeComfyUI(step_delay=step_delay, previews=False, record_sent=True, hold=True) for _ in range(count)]
    for fake in farm:
        await fake.start()
    app = web.Application()
    app[FARM] = farm
    app[STEP_DELAY] = step_delay
    app.router.add_get("/steps", report)
    app.router.add_get("/held", held)
    app.router.add_post("/release", release)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", *(fake.url for fake in farm), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])))
