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
import hashlib
import json
import logging
import math
import random
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from pydantic import Field

from service.errors import UpstreamError, UpstreamRejected
from service.schemas import ImageSpec
from service.settings import ProviderConfig
from workers.comfyui import frames
from workers.comfyui.farm import Farm
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
    instances: list[str] = Field(default_factory=list, description="base URLs; default: the provider's URL")
    instance_concurrency: int = Field(1, ge=1, description="prompts one instance holds at once (running or "
                                      "queued, other clients' included); above 1, the next waits there")
    retry_down_after: float = Field(30.0, gt=0, description="seconds before a down instance is tried again")
    reconnect_window: float = Field(60.0, gt=0, description="how long a dropped WebSocket is retried")
    silence_check: float = Field(15.0, gt=0, description="seconds without a message before /history is asked")
    request_timeout: float = Field(60.0, gt=0, description="seconds one HTTP request to an instance may take")
    # deployment level: the workflow
    workflow: Path | None = None
    inputs: InputBindings | None = None
    outputs: list[str] | None = None
    quality_steps: dict[str, int] = Field(
        default_factory=lambda: {"low": 12, "medium": 20, "standard": 20, "high": 30, "hd": 30},
        description="sampler steps for each request `quality`, when the workflow binds `steps`")
    preview_interval: float = Field(0.5, ge=0, description="seconds between two previews sent to progress "
                                    "subscribers when the request asks for no number of partial images")


class InstanceLost(Exception):
    """The instance stopped answering, or forgot our prompt (restarted)."""


class ComfyUIProvider(Provider):
    type = "comfyui"
    Options = ComfyUIOptions
    long_running = True

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
        for name in ("instances", "instance_concurrency", "retry_down_after"):
            if name in deployment.options and deployment.options[name] != self.config.options.get(name):
                raise ValueError(f"option `{name}` describes the farm: set it on provider '{self.name}'")
        self.templates[deployment.name] = WorkflowTemplate(options.workflow, options.inputs, options.outputs)

    async def generate(self, request: ImageRequest, deployment: Deployment, progress: ProgressReporter
                       ) -> ProviderResult:
        options = self.options(deployment)
        assert isinstance(options, ComfyUIOptions)
        template = self.templates[deployment.name]
        self._check_request(request, template)

        async def waiting() -> None:
            await progress.update(0.0, "waiting for a free ComfyUI instance")

        async with self.farm.lease(waiting) as instance:
            try:
                return await Run(self.http, instance.url, template, options, request, progress).execute()
            except InstanceLost as exc:
                self.farm.mark_down(instance)
                raise UpstreamError(f"ComfyUI at {instance.url} was lost: {exc}",
                                    code="upstream_unavailable") from None

    @staticmethod
    def _check_request(request: ImageRequest, template: WorkflowTemplate) -> None:
        """Refuse what the workflow cannot honour instead of silently ignoring part of the request."""
        spec = request.spec
        name = template.path.name
        if request.images and not template.takes("image"):
            raise UpstreamRejected(f"Model '{spec.model}' cannot edit images: its workflow {name} has no "
                                   "image input.", param="model", code="unsupported_operation")
        if len(request.images) > 1:
            raise UpstreamRejected(f"Model '{spec.model}' takes one input image, not {len(request.images)}.",
                                   param="image")
        if request.mask is not None and not template.takes("mask"):
            raise UpstreamRejected(f"Model '{spec.model}' cannot use a mask: its workflow {name} has no mask "
                                   "input.", param="mask")
        if spec.n > 1 and not template.takes("n"):
            raise UpstreamRejected(f"Model '{spec.model}' makes one image per request: its workflow {name} "
                                   "binds no batch size.", param="n")


class Run:
    """One prompt on one instance: upload, submit, follow, collect; interrupt it if the job is cancelled."""

    def __init__(self, http: aiohttp.ClientSession, base: str, template: WorkflowTemplate,
                 options: ComfyUIOptions, request: ImageRequest, progress: ProgressReporter) -> None:
        self.http = http
        self.base = base
        self.template = template
        self.options = options
        self.request = request
        self.progress = progress
        self.client_id = uuid.uuid4().hex
        self.timeout = aiohttp.ClientTimeout(total=options.request_timeout)
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.tracker: PromptTracker | None = None
        self.previews = Previews(request.spec, options.preview_interval)

    async def execute(self) -> ProviderResult:
        try:
            self.ws = await self._connect()
            graph = self.template.render(await self._values())
            # our own prompt id, so that a cancel during the submission can still reach the prompt (servers
            # older than the prompt_id field answer with an id of their own, which replaces it)
            self.tracker = PromptTracker(str(uuid.uuid4()), graph, self.template.outputs)
            try:
                self.tracker.prompt_id = await self._submit(graph, self.tracker.prompt_id)
                await self._queue_position()
                await self.progress.update(0.0, self.tracker.stage)
                await self._follow()
                return await self._collect()
            except asyncio.CancelledError:
                await asyncio.shield(self._stop())
                raise
        finally:
            if self.ws is not None:
                await self.ws.close()

    # connection
    async def _connect(self) -> aiohttp.ClientWebSocketResponse:
        try:
            # a close handshake unanswered within a second is a dead instance: do not wait longer for it
            ws = await self.http.ws_connect(f"{self.base}/ws", params={"clientId": self.client_id},
                                            heartbeat=20, timeout=aiohttp.ClientWSTimeout(ws_close=1.0))
        except (aiohttp.ClientError, OSError) as exc:
            raise InstanceLost(f"cannot open its WebSocket ({exc})") from None
        try:
            # the first frame, before the prompt exists: previews then come with metadata naming their prompt
            await ws.send_str(json.dumps(FEATURE_FLAGS))
        except (aiohttp.ClientError, OSError) as exc:
            await ws.close()
            raise InstanceLost(f"its WebSocket closed at once ({exc})") from None
        return ws

    async def _reconnect(self) -> None:
        """Open the socket again under the same client id: the instance routes our prompt's messages to it."""
        assert self.ws is not None
        await self.ws.close()
        deadline = time.monotonic() + self.options.reconnect_window
        delay = 0.1
        while True:
            try:
                self.ws = await self._connect()
                return
            except InstanceLost:
                if time.monotonic() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _json(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        try:
            async with self.http.request(method, self.base + path, timeout=self.timeout, **kwargs) as resp:
                body = await resp.read()
                return resp.status, json.loads(body) if body else None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise InstanceLost(f"{method} {path} failed ({exc or type(exc).__name__})") from None
        except ValueError:
            raise UpstreamError(f"ComfyUI answered {method} {path} with invalid JSON") from None

    # before the run
    async def _upload(self, image: InputImage, filename: str, endpoint: str, extra: dict[str, str]) -> str:
        form = aiohttp.FormData()
        form.add_field("image", image.data, filename=filename, content_type=image.content_type)
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
            "steps": self.options.quality_steps.get(spec.quality or ""),
        }
        if self.request.images:
            # named by content: ComfyUI cannot delete inputs, so the same picture again reuses its file
            image = self.request.images[0]
            name = await self._upload(image, f"imagegw-{_digest(image.data)}.{image.format}", "/upload/image",
                                      {"type": "input"})
            # without a mask the image's own transparency marks what to repaint, as in OpenAI's edits
            values["image"] = values["mask"] = name
            if self.request.mask is not None:
                # ComfyUI stores the image with the mask as its alpha channel, as a file named like the upload
                # (a PNG, so the alpha survives)
                ref = json.dumps({"filename": name, "type": "input"})
                values["mask"] = await self._upload(
                    self.request.mask, f"imagegw-{_digest(image.data + self.request.mask.data)}.png",
                    "/upload/mask", {"type": "input", "original_ref": ref})
        return values

    async def _submit(self, graph: dict[str, Any], prompt_id: str) -> str:
        payload = {"prompt": graph, "client_id": self.client_id, "prompt_id": prompt_id}
        status, body = await self._json("POST", "/prompt", json=payload)
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
            reasons = "; ".join(f"{e.get('message')}: {e.get('details')}"
                                for e in node_error.get("errors", []))
            parts.append(f"node {nid} ({node_error.get('class_type')}): {reasons}")
        detail = ", ".join(parts) or f"{error.get('message')} {error.get('details', '')}".strip()
        return f"ComfyUI rejected the workflow {self.template.path.name}: {detail}"

    async def _queue(self) -> tuple[list[str], list[str]]:
        """Prompt ids running and pending at the instance, the pending ones in the order they will run."""
        status, queue = await self._json("GET", "/queue")
        if status != 200 or not isinstance(queue, dict):
            raise UpstreamError(f"ComfyUI answered GET /queue with HTTP {status}")
        running = [str(item[1]) for item in queue.get("queue_running", [])]
        pending = [str(item[1]) for item in sorted(queue.get("queue_pending", []), key=lambda item: item[0])]
        return running, pending

    async def _queue_position(self) -> None:
        tracker = self.tracker
        assert tracker is not None
        running, pending = await self._queue()
        if tracker.prompt_id in pending and not tracker.started:
            tracker.queue_position = len(running) + pending.index(tracker.prompt_id) + 1

    # during the run
    async def _follow(self) -> None:
        tracker = self.tracker
        assert tracker is not None and self.ws is not None
        while not tracker.finished:
            try:
                msg = await self.ws.receive(timeout=self.options.silence_check)
            except TimeoutError:
                await self._reconcile()  # quiet for long: ask the instance whether our prompt ended
                continue
            if msg.type == aiohttp.WSMsgType.TEXT:
                await self._on_text(msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                frame = frames.decode(msg.data)
                preview = tracker.on_binary(frame) if frame is not None else None
                if preview is not None and self.previews.wanted(tracker.fraction):
                    await self.progress.partial_image(*preview)
            elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING,
                              aiohttp.WSMsgType.ERROR):
                log.warning("ComfyUI WebSocket at %s dropped; reconnecting", self.base)
                await self._reconnect()
                await self._reconcile()

    async def _on_text(self, raw: str) -> None:
        tracker = self.tracker
        assert tracker is not None
        try:
            message = json.loads(raw)
        except ValueError:
            return
        if not isinstance(message, dict):
            return
        kind, data = message.get("type"), message.get("data") or {}
        if kind == "status" and not tracker.started:
            await self._queue_position()
        tracker.on_message(str(kind), data)
        await self.progress.update(tracker.fraction, tracker.stage)

    async def _reconcile(self) -> None:
        """Catch up from /history after a dropped socket or a long silence; a prompt the instance has
        neither run nor queued was lost (the instance restarted)."""
        tracker = self.tracker
        assert tracker is not None
        _, history = await self._json("GET", f"/history/{tracker.prompt_id}")
        entry = history.get(tracker.prompt_id) if isinstance(history, dict) else None
        if isinstance(entry, dict):  # ComfyUI writes the history entry once the prompt has ended
            for node, output in (entry.get("outputs") or {}).items():
                if node in tracker.outputs and output.get("images"):
                    tracker.output_images[node] = output["images"]
            state = entry.get("status") or {}
            messages = state.get("messages") or []
            if state.get("status_str", "success") == "success":
                tracker.outcome.success = True
            else:
                tracker.outcome.interrupted = any(m[0] == "execution_interrupted" for m in messages)
                error = next((m[1] for m in messages if m[0] == "execution_error"), None)
                if error is not None or not tracker.outcome.interrupted:
                    tracker.outcome.error = error or {"exception_message": "the prompt failed"}
            tracker.finished = True
            return
        running, pending = await self._queue()
        if tracker.prompt_id not in running + pending:
            raise InstanceLost("the instance no longer knows the prompt (it restarted?)")

    async def _stop(self) -> None:
        """Cancelled: take our prompt out of the queue if it waits, interrupt it if it runs. `/interrupt`
        names the prompt, but older servers ignore that and stop whatever runs: call it only for ours."""
        tracker = self.tracker
        if tracker is None or tracker.finished:
            return
        try:
            if not tracker.started:
                await self._json("POST", "/queue", json={"delete": [tracker.prompt_id]})
            running, _ = await self._queue()
            if tracker.prompt_id in running:
                await self._json("POST", "/interrupt", json={"prompt_id": tracker.prompt_id})
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
            raise UpstreamError("The ComfyUI prompt was interrupted on the instance.",
                                code="workflow_interrupted")
        await self.progress.update(0.97, "fetching images")
        images = [GeneratedImage(data=data, format=fmt) for data, fmt in tracker.ws_images]
        if not tracker.output_images and not tracker.ws_images:
            await self._reconcile()  # the socket may have missed the output nodes' `executed`
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
            async with self.http.get(self.base + "/view", params=params, timeout=self.timeout) as resp:
                if resp.status != 200:
                    raise UpstreamError(f"ComfyUI could not serve {params['filename']} (HTTP {resp.status})")
                data = await resp.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise InstanceLost(f"GET /view failed ({exc or type(exc).__name__})") from None
        return GeneratedImage(data=data, format=sniff_format(data))



def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


class Previews:
    """Which previews become partial images. A request that names a number of partial images gets that many,
    spread over the run; otherwise progress subscribers get live previews, at most one per `interval`."""

    def __init__(self, spec: ImageSpec, interval: float) -> None:
        self.count = spec.partial_images
        self.counted = spec.partial_images > 0 or spec.stream
        self.interval = interval
        self.sent = 0
        self.last = -math.inf

    def wanted(self, fraction: float) -> bool:
        if self.counted:
            # partial k is the first preview past (k + 1) / (count + 1) of the work
            due = self.sent < self.count and fraction >= (self.sent + 1) / (self.count + 1)
        else:
            due = time.monotonic() - self.last >= self.interval
        if due:
            self.sent += 1
            self.last = time.monotonic()
        return due
