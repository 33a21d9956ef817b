"""ComfyUI back end: a public model is a workflow template run on the least busy instance of a farm.

Follows ComfyUI's server protocol as recorded from ComfyUI 0.3.64 (`shared/comfyui-protocol/`):
`/ws?clientId=` opened before `POST /prompt` (with `client_id`); `status`, `execution_start`,
`execution_cached`, `executing`, `progress`, `progress_state`, `executed`, `execution_success`,
`execution_error`, `execution_interrupted` text frames; binary frames (1 preview, 3 text, 4 preview with
metadata once `feature_flags` announced `supports_preview_metadata`); outputs from `/history/{id}` and
`/view`; inputs through `/upload/image` and `/upload/mask`; `/interrupt` and `POST /queue {"delete"}` to
cancel. Older servers omit `prompt_id` from some messages; other prompts' messages are ignored.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from pydantic import Field

from service.errors import UpstreamError, UpstreamRejected
from service.settings import ProviderConfig
from workers.comfyui import frames
from workers.comfyui.farm import Farm, Instance
from workers.comfyui.template import InputBindings, WorkflowTemplate
from workers.comfyui.tracker import PromptTracker
from workers.providers.base import (
    Deployment,
    GeneratedImage,
    ImageRequest,
    InputImage,
    ProgressReporter,
    Provider,
    ProviderOptions,
    ProviderResult,
    sniff_format,
)

log = logging.getLogger(__name__)

FEATURE_FLAGS = {"type": "feature_flags", "data": {"supports_preview_metadata": True}}


class ComfyUIOptions(ProviderOptions):
    # provider level: the farm
    instances: list[str] = Field(default_factory=list, description="base URLs; default: the provider's base_url")
    instance_concurrency: int = Field(1, ge=1, description="prompts one instance runs at once")
    retry_down_after: float = Field(30.0, gt=0, description="seconds before an unreachable instance is tried again")
    reconnect_window: float = Field(60.0, gt=0, description="how long a dropped WebSocket is retried before failing")
    silence_check: float = Field(15.0, gt=0, description="seconds without a message before /history is consulted")
    # deployment level: the workflow
    workflow: Path | None = None
    inputs: InputBindings | None = None
    outputs: list[str] | None = None


class InstanceLost(Exception):
    """The instance stopped answering, or forgot our prompt (restarted)."""


class ComfyUIProvider(Provider):
    type = "comfyui"
    Options = ComfyUIOptions

    def __init__(self, name: str, config: ProviderConfig, http: aiohttp.ClientSession) -> None:
        super().__init__(name, config, http)
        farm_options = ComfyUIOptions.model_validate(config.options)
        urls = farm_options.instances or ([config.base_url] if config.base_url else [])
        if not urls:
            raise ValueError(f"providers.{name}: a comfyui provider needs `base_url` or `options.instances`")
        self.farm = Farm(urls, farm_options.instance_concurrency, farm_options.retry_down_after, http)
        self.templates: dict[str, WorkflowTemplate] = {}

    def check_deployment(self, deployment: Deployment) -> None:
        options = self.options(deployment)
        assert isinstance(options, ComfyUIOptions)
        if options.workflow is None or options.inputs is None:
            raise ValueError("a comfyui deployment needs options `workflow` and `inputs`")
        self.templates[deployment.name] = WorkflowTemplate(options.workflow, options.inputs, options.outputs)

    async def generate(self, request: ImageRequest, deployment: Deployment, progress: ProgressReporter
                       ) -> ProviderResult:
        options = self.options(deployment)
        assert isinstance(options, ComfyUIOptions)
        template = self.templates[deployment.name]
        if request.images and not template.takes("image"):
            raise UpstreamRejected(f"Model '{request.spec.model}' cannot edit images: its workflow has no image "
                                   "input.", param="model", code="unsupported_operation")
        async with self.farm.lease() as instance:
            try:
                return await Run(self, instance, template, options, request, progress).execute()
            except InstanceLost as exc:
                self.farm.mark_down(instance)
                raise UpstreamError(f"ComfyUI at {instance.url} was lost mid-job: {exc}",
                                    code="upstream_unavailable") from None


class Run:
    """One prompt on one instance: upload, submit, follow, collect; interrupt it if the job is cancelled."""

    def __init__(self, provider: ComfyUIProvider, instance: Instance, template: WorkflowTemplate,
                 options: ComfyUIOptions, request: ImageRequest, progress: ProgressReporter) -> None:
        self.http = provider.http
        self.base = instance.url
        self.template = template
        self.options = options
        self.request = request
        self.progress = progress
        self.client_id = uuid.uuid4().hex
        self.tracker: PromptTracker | None = None

    async def execute(self) -> ProviderResult:
        ws = await self._connect()
        try:
            graph = self.template.render(await self._values())
            prompt_id = await self._submit(graph)
            self.tracker = PromptTracker(prompt_id, graph, self.template.outputs)
            await self._queue_position()
            await self.progress.update(0.0, self.tracker.stage)
            try:
                await self._follow(ws)
                return await self._collect()
            except asyncio.CancelledError:
                await asyncio.shield(self._stop())
                raise
        finally:
            if not ws.closed:
                await ws.close()

    # connection
    async def _connect(self) -> aiohttp.ClientWebSocketResponse:
        try:
            ws = await self.http.ws_connect(f"{self.base}/ws", params={"clientId": self.client_id}, heartbeat=20)
        except (aiohttp.ClientError, OSError) as exc:
            raise InstanceLost(f"cannot open its WebSocket ({exc})") from None
        await ws.send_str(json.dumps(FEATURE_FLAGS))
        return ws

    async def _reconnect(self) -> aiohttp.ClientWebSocketResponse:
        deadline = time.monotonic() + self.options.reconnect_window
        delay = 0.2
        while True:
            try:
                return await self._connect()
            except InstanceLost:
                if time.monotonic() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _json(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        try:
            async with self.http.request(method, self.base + path, **kwargs) as resp:
                body = await resp.read()
                return resp.status, json.loads(body) if body else None
        except (aiohttp.ClientError, OSError) as exc:
            raise InstanceLost(f"{method} {path} failed ({exc})") from None
        except ValueError:
            raise UpstreamError(f"ComfyUI answered {method} {path} with invalid JSON") from None

    # before the run
    async def _upload(self, image: InputImage, endpoint: str, extra: dict[str, str]) -> str:
        form = aiohttp.FormData()
        form.add_field("image", image.data, filename=f"imagegw-{uuid.uuid4().hex}.{image.format}",
                       content_type=image.content_type)
        form.add_field("overwrite", "true")
        for key, value in extra.items():
            form.add_field(key, value)
        status, body = await self._json("POST", endpoint, data=form)
        if status != 200 or not isinstance(body, dict) or "name" not in body:
            raise UpstreamError(f"ComfyUI refused the upload to {endpoint} (HTTP {status})")
        return str(body["name"]) if not body.get("subfolder") else f"{body['subfolder']}/{body['name']}"

    async def _values(self) -> dict[str, Any]:
        spec = self.request.spec
        dims = spec.dimensions()
        values: dict[str, Any] = {
            "prompt": spec.prompt,
            "negative_prompt": spec.negative_prompt,
            "width": dims[0] if dims else None,
            "height": dims[1] if dims else None,
            "n": spec.n,
            # no seed given: a fresh one, so a repeated prompt draws new images instead of ComfyUI's cache
            "seed": spec.seed if spec.seed is not None else random.randrange(2**48),
        }
        if self.request.images:
            name = await self._upload(self.request.images[0], "/upload/image", {"type": "input"})
            values["image"] = name
            if self.request.mask is not None:
                values["mask"] = await self._upload(
                    self.request.mask, "/upload/mask",
                    {"type": "input", "original_ref": json.dumps({"filename": name, "type": "input"})})
        return values

    async def _submit(self, graph: dict[str, Any]) -> str:
        status, body = await self._json("POST", "/prompt", json={"prompt": graph, "client_id": self.client_id})
        if status == 200 and isinstance(body, dict) and "prompt_id" in body:
            return str(body["prompt_id"])
        if status == 400 and isinstance(body, dict):
            raise UpstreamRejected(self._validation_message(body), param="model", code="workflow_invalid")
        raise UpstreamError(f"ComfyUI refused the prompt (HTTP {status})")

    def _validation_message(self, body: dict[str, Any]) -> str:
        """The failing node(s) by id and class, and what ComfyUI said of each input."""
        error = body.get("error") or {}
        parts = []
        for nid, node_error in (body.get("node_errors") or {}).items():
            reasons = "; ".join(f"{e.get('message')}: {e.get('details')}" for e in node_error.get("errors", []))
            parts.append(f"node {nid} ({node_error.get('class_type')}): {reasons}")
        detail = ", ".join(parts) or f"{error.get('message')} {error.get('details', '')}".strip()
        return f"ComfyUI rejected the workflow {self.template.path.name}: {detail}"

    async def _queue_position(self) -> None:
        assert self.tracker is not None
        status, queue = await self._json("GET", "/queue")
        if status != 200 or not isinstance(queue, dict):
            return
        running = [item[1] for item in queue.get("queue_running", [])]
        pending = sorted(queue.get("queue_pending", []), key=lambda item: item[0])
        ids = running + [item[1] for item in pending]
        if self.tracker.prompt_id in ids and not self.tracker.started:
            self.tracker.queue_position = ids.index(self.tracker.prompt_id) + 1

    # during the run
    async def _follow(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        tracker = self.tracker
        assert tracker is not None
        while not tracker.finished:
            try:
                msg = await ws.receive(timeout=self.options.silence_check)
            except TimeoutError:
                await self._reconcile()  # quiet for long: ask the instance whether our prompt ended
                continue
            if msg.type == aiohttp.WSMsgType.TEXT:
                await self._on_text(msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                frame = frames.decode(msg.data)
                preview = tracker.on_binary(frame) if frame is not None else None
                if preview is not None:
                    await self.progress.partial_image(*preview)
            elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING,
                              aiohttp.WSMsgType.ERROR):
                log.warning("ComfyUI WebSocket at %s dropped; reconnecting", self.base)
                ws = await self._reconnect()
                await self._reconcile()
        await ws.close()

    async def _on_text(self, raw: str) -> None:
        tracker = self.tracker
        assert tracker is not None
        try:
            message = json.loads(raw)
        except ValueError:
            return
        kind, data = message.get("type"), message.get("data") or {}
        if kind == "status" and not tracker.started:
            await self._queue_position()
        tracker.on_message(kind, data)
        await self.progress.update(tracker.fraction, tracker.stage)

    async def _reconcile(self) -> None:
        """Catch up from /history after a dropped socket or a long silence; a prompt the instance has
        neither run nor queued was lost (the instance restarted)."""
        tracker = self.tracker
        assert tracker is not None
        status, history = await self._json("GET", f"/history/{tracker.prompt_id}")
        entry = history.get(tracker.prompt_id) if isinstance(history, dict) else None
        if entry is not None and entry.get("status", {}).get("completed") is not None:
            state = entry["status"]
            for node, output in (entry.get("outputs") or {}).items():
                if node in tracker.outputs and output.get("images"):
                    tracker.output_images[node] = output["images"]
            if state.get("status_str") == "success":
                tracker.outcome.success, tracker.finished = True, True
            else:
                error = next((m[1] for m in state.get("messages", []) if m[0] == "execution_error"), None)
                interrupted = any(m[0] == "execution_interrupted" for m in state.get("messages", []))
                tracker.outcome.error = error if error else (None if interrupted else {"exception_message": "failed"})
                tracker.outcome.interrupted = interrupted
                tracker.finished = True
            return
        status, queue = await self._json("GET", "/queue")
        queued = [item[1] for key in ("queue_running", "queue_pending") for item in (queue or {}).get(key, [])]
        if tracker.prompt_id not in queued:
            raise InstanceLost("the instance no longer knows the prompt (it restarted?)")

    async def _stop(self) -> None:
        """Cancelled: interrupt our prompt if it runs, take it out of the queue if it waits."""
        tracker = self.tracker
        if tracker is None or tracker.finished:
            return
        try:
            if tracker.started:
                await self._json("POST", "/interrupt", json={"prompt_id": tracker.prompt_id})
            else:
                await self._json("POST", "/queue", json={"delete": [tracker.prompt_id]})
        except (InstanceLost, UpstreamError) as exc:
            log.warning("could not stop ComfyUI prompt %s: %s", tracker.prompt_id, exc)

    # after the run
    async def _collect(self) -> ProviderResult:
        tracker = self.tracker
        assert tracker is not None
        outcome = tracker.outcome
        if outcome.error is not None:
            node = outcome.error.get("node_id")
            raise UpstreamError(
                f"ComfyUI failed in node {node} ({outcome.error.get('node_type')}): "
                f"{str(outcome.error.get('exception_message', '')).strip()[:500]}", code="workflow_failed")
        if outcome.interrupted:
            raise UpstreamError("The ComfyUI prompt was interrupted on the instance.", code="workflow_interrupted")
        await self.progress.update(0.97, "fetching images")
        images = [GeneratedImage(data=data, format=fmt) for data, fmt in tracker.ws_images]
        if not tracker.output_images:
            await self._reconcile()
        for node in sorted(tracker.output_images):
            for ref in tracker.output_images[node]:
                images.append(await self._view(ref))
        if not images:
            raise UpstreamError("The ComfyUI workflow finished without producing an image.", code="no_images")
        return ProviderResult(images=images, size=None, quality=None, background=None)

    async def _view(self, ref: dict[str, Any]) -> GeneratedImage:
        params = {"filename": ref.get("filename", ""), "subfolder": ref.get("subfolder", ""),
                  "type": ref.get("type", "output")}
        try:
            async with self.http.get(self.base + "/view", params=params) as resp:
                if resp.status != 200:
                    raise UpstreamError(f"ComfyUI could not serve {params['filename']} (HTTP {resp.status})")
                data = await resp.read()
        except (aiohttp.ClientError, OSError) as exc:
            raise InstanceLost(f"GET /view failed ({exc})") from None
        return GeneratedImage(data=data, format=sniff_format(data))

