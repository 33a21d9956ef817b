"""A fake ComfyUI: an in-process aiohttp server speaking the protocol of a real ComfyUI 0.3.64.

Every frame, answer and ordering here was checked against the recordings in
``shared/comfyui-protocol`` and against ComfyUI's ``server.py``, ``execution.py``,
``comfy_execution/graph.py`` and ``comfy_execution/progress.py``:

* ``GET /ws?clientId=`` sends ``status`` (with ``sid``) on connect and, when that client's
  prompt is running, ``executing`` with the current node (no ``prompt_id``, as the real server).
  A first text frame ``{"type": "feature_flags", ...}`` is answered with the server's flags and
  switches that client's previews to ``PREVIEW_IMAGE_WITH_METADATA`` frames.
* One worker runs one prompt at a time from a priority queue; ``status`` goes to every client
  when the queue changes (put, get, done, delete). Like the real server, ``progress_state``
  frames go to every client, while ``execution_*``, ``executing``, ``executed``, ``progress``
  and preview frames go to the submitting client only; ``TEXT`` frames go to everyone.
* Nodes run in the order of ComfyUI's ``ExecutionList`` and outputs are cached by input
  signature, so an identical resubmission reports every node in ``execution_cached`` and
  replays the old ``executed`` outputs.

Nodes are not really executed: samplers emit ``progress`` per step, ``SaveImage`` and
``PreviewImage`` write real PNGs sized from the graph, ``SaveImageWebsocket`` streams PNGs as
preview frames, ``GetImageSize`` sends a ``TEXT`` frame; every other node is a no-op.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import io
import itertools
import json
import mimetypes
import posixpath
import random
import struct
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.typedefs import Handler
from PIL import Image
from PIL.PngImagePlugin import PngInfo

# Binary frame event types (ComfyUI protocol.py BinaryEventTypes).
PREVIEW_IMAGE = 1
TEXT = 3
PREVIEW_IMAGE_WITH_METADATA = 4
IMAGE_FORMAT_NUMBERS = {"JPEG": 1, "PNG": 2}

MAX_RESOLUTION = 16384
SERVER_FEATURES = {"supports_preview_metadata": True, "max_upload_size": 104857600}
DEFAULT_SAMPLER_TYPES = frozenset({"KSampler", "KSamplerAdvanced", "SamplerCustom"})
DEFAULT_CHECKPOINTS = ("v1-5-pruned-emaonly.safetensors", "sd_xl_base_1.0.safetensors")
SYSTEM_STATS: dict[str, Any] = {
    "system": {
        "os": "posix",
        "ram_total": 25276502016,
        "ram_free": 24304586752,
        "comfyui_version": "0.3.64",
        "required_frontend_version": "1.27.10",
        "installed_templates_version": "0.1.95",
        "required_templates_version": "0.1.95",
        "python_version": sys.version,
        "pytorch_version": "2.13.0+cpu",
        "embedded_python": False,
    },
    "devices": [
        {
            "name": "cpu",
            "type": "cpu",
            "index": None,
            "vram_total": 25276502016,
            "vram_free": 24304586752,
            "torch_vram_total": 25276502016,
            "torch_vram_free": 24304586752,
        }
    ],
}

# Virtual folders: paths only matter for ComfyUI's traversal checks and error messages.
FOLDERS = {"input": "/comfyui/input", "output": "/comfyui/output", "temp": "/comfyui/temp"}
FileKey = tuple[str, str, str]  # (type, subfolder, filename), as in /view
InputSpec = tuple[Any, ...]  # ComfyUI INPUT_TYPES entry: (type,) or (type, options)
CONVERTERS: dict[str, Callable[[Any], Any]] = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}


@dataclass(frozen=True)
class NodeType:
    """A node class as the fake knows it: ComfyUI-style input specs, return types and flags."""

    required: Mapping[str, InputSpec] = field(default_factory=dict)
    optional: Mapping[str, InputSpec] = field(default_factory=dict)
    return_types: tuple[str, ...] = ()
    output_node: bool = False
    always_changed: bool = False  # IS_CHANGED differs on every run, so the node is never cached
    file_input: str | None = None  # input naming an uploaded file (LoadImage's VALIDATE_INPUTS)
    category: str = "fake"

    def inputs(self) -> Iterator[tuple[str, str, InputSpec]]:
        """(name, "required" | "optional", spec) in declaration order."""
        for name, spec in self.required.items():
            yield name, "required", spec
        for name, spec in self.optional.items():
            yield name, "optional", spec


SAMPLERS = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
    "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
    "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm", "ipndm_v", "deis", "res_multistep",
    "res_multistep_cfg_pp", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp",
    "gradient_estimation", "er_sde", "seeds_2", "seeds_3", "ddim", "uni_pc", "uni_pc_bh2",
]  # fmt: skip
SCHEDULERS = [
    "simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
    "linear_quadratic", "kl_optimal",
]  # fmt: skip


def core_node_types(checkpoints: Sequence[str] = DEFAULT_CHECKPOINTS) -> dict[str, NodeType]:
    """The core nodes the fake accepts; the recorded ones carry their exact ComfyUI input specs."""
    image = ("IMAGE",)
    seed = ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True})
    steps = ("INT", {"default": 20, "min": 1, "max": 10000})
    cfg = ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01})
    denoise = ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01})
    side = ("INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8})
    batch = ("INT", {"default": 1, "min": 1, "max": 4096})
    sampling = {
        "sampler_name": (SAMPLERS,),
        "scheduler": (SCHEDULERS,),
        "positive": ("CONDITIONING",),
        "negative": ("CONDITIONING",),
        "latent_image": ("LATENT",),
    }
    return {
        "CheckpointLoaderSimple": NodeType(
            required={"ckpt_name": (list(checkpoints),)}, return_types=("MODEL", "CLIP", "VAE")
        ),
        "CLIPTextEncode": NodeType(
            required={"text": ("STRING", {"multiline": True, "dynamicPrompts": True}), "clip": ("CLIP",)},
            return_types=("CONDITIONING",),
        ),
        "EmptyLatentImage": NodeType(
            required={"width": side, "height": side, "batch_size": batch}, return_types=("LATENT",)
        ),
        "EmptySD3LatentImage": NodeType(
            required={
                "width": ("INT", {"default": 1024, "min": 16, "max": MAX_RESOLUTION, "step": 16}),
                "height": ("INT", {"default": 1024, "min": 16, "max": MAX_RESOLUTION, "step": 16}),
                "batch_size": batch,
            },
            return_types=("LATENT",),
        ),
        "KSampler": NodeType(
            required={
                "model": ("MODEL",),
                "seed": seed,
                "steps": steps,
                "cfg": cfg,
                **sampling,
                "denoise": denoise,
            },
            return_types=("LATENT",),
        ),
        "KSamplerAdvanced": NodeType(
            required={
                "model": ("MODEL",),
                "add_noise": (["enable", "disable"],),
                "noise_seed": seed,
                "steps": steps,
                "cfg": cfg,
                **sampling,
                "start_at_step": ("INT", {"default": 0, "min": 0, "max": 10000}),
                "end_at_step": ("INT", {"default": 10000, "min": 0, "max": 10000}),
                "return_with_leftover_noise": (["disable", "enable"],),
            },
            return_types=("LATENT",),
        ),
        "KSamplerSelect": NodeType(required={"sampler_name": (SAMPLERS,)}, return_types=("SAMPLER",)),
        "BasicScheduler": NodeType(
            required={"model": ("MODEL",), "scheduler": (SCHEDULERS,), "steps": steps, "denoise": denoise},
            return_types=("SIGMAS",),
        ),
        "SamplerCustom": NodeType(
            required={
                "model": ("MODEL",),
                "add_noise": ("BOOLEAN", {"default": True}),
                "noise_seed": seed,
                "cfg": cfg,
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "sampler": ("SAMPLER",),
                "sigmas": ("SIGMAS",),
                "latent_image": ("LATENT",),
            },
            return_types=("LATENT", "LATENT"),
        ),
        "VAEDecode": NodeType(required={"samples": ("LATENT",), "vae": ("VAE",)}, return_types=("IMAGE",)),
        "VAEEncode": NodeType(required={"pixels": image, "vae": ("VAE",)}, return_types=("LATENT",)),
        "VAEEncodeForInpaint": NodeType(
            required={
                "pixels": image,
                "vae": ("VAE",),
                "mask": ("MASK",),
                "grow_mask_by": ("INT", {"default": 6, "min": 0, "max": 64, "step": 1}),
            },
            return_types=("LATENT",),
        ),
        "SetLatentNoiseMask": NodeType(
            required={"samples": ("LATENT",), "mask": ("MASK",)}, return_types=("LATENT",)
        ),
        "LoadImage": NodeType(
            required={"image": ([], {"image_upload": True})},
            return_types=("IMAGE", "MASK"),
            file_input="image",
        ),
        "LoadImageMask": NodeType(
            required={"image": ([], {"image_upload": True}), "channel": (["alpha", "red", "green", "blue"],)},
            return_types=("MASK",),
            file_input="image",
        ),
        "EmptyImage": NodeType(
            required={
                "width": ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
                "height": ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
                "batch_size": batch,
                "color": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFF, "step": 1, "display": "color"}),
            },
            return_types=("IMAGE",),
        ),
        "ImageBlend": NodeType(
            required={
                "image1": image,
                "image2": image,
                "blend_factor": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01}),
                "blend_mode": (["normal", "multiply", "screen", "overlay", "soft_light", "difference"],),
            },
            return_types=("IMAGE",),
        ),
        "ImageBlur": NodeType(
            required={
                "image": image,
                "blur_radius": ("INT", {"default": 1, "min": 1, "max": 31, "step": 1}),
                "sigma": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.1}),
            },
            return_types=("IMAGE",),
        ),
        "ImageInvert": NodeType(required={"image": image}, return_types=("IMAGE",)),
        "GetImageSize": NodeType(required={"image": image}, return_types=("INT", "INT", "INT")),
        "ImageScale": NodeType(
            required={
                "image": image,
                "upscale_method": (["nearest-exact", "bilinear", "area", "bicubic", "lanczos"],),
                "width": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
                "height": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
                "crop": (["disabled", "center"],),
            },
            return_types=("IMAGE",),
        ),
        "SaveImage": NodeType(
            required={"images": image, "filename_prefix": ("STRING", {"default": "ComfyUI"})},
            output_node=True,
        ),
        "PreviewImage": NodeType(required={"images": image}, output_node=True),
        "SaveImageWebsocket": NodeType(required={"images": image}, output_node=True, always_changed=True),
    }


@dataclass
class UploadedFile:
    """A file field of a recorded multipart request."""

    filename: str
    content_type: str
    data: bytes


@dataclass
class RecordedCall:
    """One HTTP request the fake received (WebSocket upgrades included)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: bytes = b""
    json: Any = None  # the parsed body when it was JSON
    form: dict[str, str | UploadedFile] = field(default_factory=dict)


@dataclass
class QueueItem:
    """A queued prompt: ComfyUI's (number, prompt_id, prompt, extra_data, outputs_to_execute)."""

    number: float
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs: list[str]

    @property
    def client_id(self) -> str | None:
        client_id = self.extra_data.get("client_id")
        return client_id if isinstance(client_id, str) else None

    def as_json(self) -> list[Any]:
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]


@dataclass(frozen=True)
class SentFrame:
    """A text frame written to a client: when (``time.monotonic()``, stamped just before the write), to
    which client id, and the frame."""

    at: float
    client_id: str
    text: str


@dataclass
class _Client:
    ws: web.WebSocketResponse
    request: web.Request
    sid: str
    writing: Callable[[str, str], None]  # told (client id, frame) just before a text frame is written
    feature_flags: dict[str, Any] = field(default_factory=dict)

    async def send(self, payload: str | bytes) -> None:
        if self.ws.closed:
            return
        try:
            if isinstance(payload, str):
                self.writing(self.sid, payload)
                await self.ws.send_str(payload)
            else:
                await self.ws.send_bytes(payload)
        except ConnectionError:  # the client went away; ComfyUI logs and carries on
            pass


@dataclass
class _Outbound:
    payload: str | bytes
    sid: str | None  # None: every connected client


@dataclass
class _CacheEntry:
    ui: dict[str, Any] | None


@dataclass
class _Run:
    """What one prompt execution accumulates: history messages, progress registry, executed nodes."""

    item: QueueItem
    signatures: dict[str, Hashable]
    messages: list[list[Any]] = field(default_factory=list)
    progress: dict[str, dict[str, Any]] = field(default_factory=dict)
    executed: list[str] = field(default_factory=list)
    shapes: dict[str, tuple[int, int, int] | None] = field(default_factory=dict)
    success: bool = True


class _Interrupted(Exception):
    """Where ComfyUI raises InterruptProcessingException."""

    def __init__(self, node_id: str) -> None:
        super().__init__(node_id)
        self.node_id = node_id


class _NodeFailure(Exception):
    """A node raising while it runs."""

    def __init__(self, node_id: str, message: str, exception_type: str = "Exception") -> None:
        super().__init__(message)
        self.node_id = node_id
        self.message = message
        self.exception_type = exception_type


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)


def _timestamp() -> int:
    return int(time.time() * 1000)


def _encode(image: Image.Image, image_format: str, pnginfo: PngInfo | None = None) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, quality=95, compress_level=1, pnginfo=pnginfo)
    return buffer.getvalue()


def _solid_image(width: int, height: int, seed: str) -> Image.Image:
    color = tuple(hashlib.sha256(seed.encode()).digest()[:3])
    return Image.new("RGB", (width, height), color)


def _types_match(received: str, expected: Any) -> bool:
    """ComfyUI's non-strict validate_node_input: any shared type, "*" or a combo fed by a link."""
    if isinstance(expected, list) or "*" in (received, expected):
        return True
    return bool(set(received.split(",")) & set(str(expected).split(",")))


class _ExecutionList:
    """ComfyUI's ExecutionList order: a topological dissolve that favours output nodes."""

    def __init__(
        self, prompt: dict[str, Any], is_cached: Callable[[str], bool], is_output: Callable[[str], bool]
    ):
        self._prompt = prompt
        self._is_cached = is_cached
        self._is_output = is_output
        self._pending: dict[str, None] = {}
        self._blockers: dict[str, set[str]] = {}
        self._blocking: dict[str, set[str]] = {}

    def add_node(self, node_id: str) -> None:
        stack = [node_id]
        links: list[tuple[str, str]] = []
        while stack:
            unique_id = stack.pop()
            if unique_id in self._pending:
                continue
            self._pending[unique_id] = None
            self._blockers[unique_id] = set()
            self._blocking[unique_id] = set()
            for value in self._prompt[unique_id]["inputs"].values():
                if _is_link(value):
                    from_id = str(value[0])
                    if not self._is_cached(from_id):
                        stack.append(from_id)
                    links.append((from_id, unique_id))
        for from_id, to_id in links:
            if not self._is_cached(from_id) or from_id in self._pending:
                self.add_node(from_id)
                self._blocking[from_id].add(to_id)
                self._blockers[to_id].add(from_id)

    def next_node(self) -> str | None:
        if not self._pending:
            return None
        ready = [node_id for node_id in self._pending if not self._blockers[node_id]]
        if not ready:
            raise RuntimeError(f"dependency cycle among {list(self._pending)}")
        for node_id in ready:
            if self._is_output(node_id):
                return node_id
        for node_id in ready:  # the VAEDecode -> PreviewImage case
            if any(self._is_output(blocked) for blocked in self._blocking[node_id]):
                return node_id
        for node_id in ready:  # the VAELoader -> VAEDecode -> PreviewImage case
            for blocked in self._blocking[node_id]:
                if any(self._is_output(further) for further in self._blocking[blocked]):
                    return node_id
        return ready[0]

    def complete(self, node_id: str) -> None:
        del self._pending[node_id]
        for blocked in self._blocking.pop(node_id):
            self._blockers[blocked].discard(node_id)
        self._blockers.pop(node_id)


class FakeComfyUI:
    """An in-process ComfyUI server on 127.0.0.1, port 0, recording every request.

    Use ``async with FakeComfyUI(...) as fake:`` or ``await fake.start()`` / ``await fake.stop()``.
    Every constructor argument is also a plain attribute that tests may change at any time.
    """

    def __init__(
        self,
        *,
        step_delay: float = 0.01,
        node_delay: float = 0.0,
        previews: bool = True,
        preview_format: Literal["JPEG", "PNG"] = "JPEG",
        sampler_types: frozenset[str] = DEFAULT_SAMPLER_TYPES,
        fail_node: str | None = None,
        fail_message: str = "fake failure",
        hang: bool = False,
        hold: bool = False,
        legacy: bool = False,
        checkpoints: Sequence[str] = DEFAULT_CHECKPOINTS,
        extra_node_types: Mapping[str, NodeType] | None = None,
        record_sent: bool = False,
    ) -> None:
        self.step_delay = step_delay  # seconds per sampler step
        self.node_delay = node_delay  # seconds every executed node takes (not interruptible, as stock nodes)
        self.previews = previews  # samplers send one preview frame per step
        self.preview_format = preview_format
        self.sampler_types = sampler_types
        self.fail_node = fail_node  # node id that raises -> execution_error
        self.fail_message = fail_message
        self.hang = hang  # the first executed node never returns (only /interrupt ends it)
        self.hold = hold  # prompts stay queued, none starts, until release()
        # Speak like a server from before the 2024 execution rework: no progress_state, feature flags,
        # TEXT frames or display_node, and progress frames with only value and max.
        self.legacy = legacy
        self.node_types = {**core_node_types(checkpoints), **(extra_node_types or {})}
        self.record_sent = record_sent  # every text frame written to a client goes to `sent_frames`

        self.url = ""
        self.calls: list[RecordedCall] = []
        self.ws_received: list[tuple[str, Any]] = []  # (client id, parsed text frame)
        self.sent_frames: list[SentFrame] = []  # with `record_sent`: to time what clients make of them
        self.executed_prompt_ids: list[str] = []
        self.max_concurrent = 0
        self.history: dict[str, dict[str, Any]] = {}
        self.files: dict[FileKey, bytes] = {}

        self._clients: dict[str, _Client] = {}
        self._queue: list[tuple[float, int, QueueItem]] = []
        self._queue_order = itertools.count()
        self._running: QueueItem | None = None
        self._number = 0
        self._active = 0
        self._cache: dict[Hashable, _CacheEntry] = {}
        self._change_tokens = itertools.count()
        self._temp_prefixes: dict[str, str] = {}
        self._client_id: str | None = None  # ComfyUI's server.client_id: who the running prompt reports to
        self._last_node_id: str | None = None
        self._interrupt = asyncio.Event()
        self._wakeup = asyncio.Event()
        self._outbox: asyncio.Queue[_Outbound] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._runner: web.AppRunner | None = None
        self._app = self._make_app()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Listen on 127.0.0.1 at a free port and start the worker and the message publisher."""
        self._runner = web.AppRunner(self._app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        self._tasks = [asyncio.create_task(self._work()), asyncio.create_task(self._publish())]

    async def stop(self) -> None:
        """Stop the worker, close every WebSocket and the server; re-raise a crash of the worker."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        crashed = [task.exception() for task in self._tasks if not task.cancelled() and task.exception()]
        self._tasks = []
        await self.drop_websockets()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if crashed:
            raise RuntimeError("the fake ComfyUI worker crashed") from crashed[0]

    async def __aenter__(self) -> FakeComfyUI:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # ------------------------------------------------------------------ test controls

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://", 1) + "/ws"

    @property
    def client_ids(self) -> list[str]:
        """Ids of the connected WebSocket clients."""
        return list(self._clients)

    @property
    def running(self) -> QueueItem | None:
        return self._running

    @property
    def pending(self) -> list[QueueItem]:
        return [entry[2] for entry in sorted(self._queue)]

    def release(self) -> None:
        """Stop holding prompts: the queued ones run, in their order."""
        self.hold = False
        self._wakeup.set()

    async def drop_websockets(self, *, abrupt: bool = False) -> None:
        """Close every WebSocket (a close frame, or with ``abrupt`` a bare TCP reset); runs go on."""
        clients = list(self._clients.values())
        self._clients.clear()
        if abrupt:
            for client in clients:
                if client.request.transport is not None:
                    client.request.transport.abort()
        else:
            await asyncio.gather(*(client.ws.close(code=WSCloseCode.GOING_AWAY) for client in clients))

    async def inject(self, message: Mapping[str, Any] | bytes, client_id: str | None = None) -> None:
        """Deliver a raw frame (a JSON message or binary bytes) to one client, or to all with None."""
        payload = message if isinstance(message, bytes) else json.dumps(message)
        self._outbox.put_nowait(_Outbound(payload, client_id))
        await self._outbox.join()

    # ------------------------------------------------------------------ HTTP

    def _make_app(self) -> web.Application:
        app = web.Application(client_max_size=SERVER_FEATURES["max_upload_size"], middlewares=[self._record])
        routes: list[tuple[str, str, Handler]] = [
            ("GET", "/ws", self._ws),
            ("POST", "/prompt", self._post_prompt),
            ("GET", "/prompt", self._get_prompt),
            ("GET", "/queue", self._get_queue),
            ("POST", "/queue", self._post_queue),
            ("POST", "/interrupt", self._post_interrupt),
            ("GET", "/history", self._get_history),
            ("GET", "/history/{prompt_id}", self._get_history_item),
            ("POST", "/history", self._post_history),
            ("GET", "/view", self._view),
            ("POST", "/upload/image", self._upload_image),
            ("POST", "/upload/mask", self._upload_mask),
            ("GET", "/system_stats", self._system_stats),
            ("GET", "/features", self._features),
            ("GET", "/object_info", self._object_info),
            ("GET", "/object_info/{node_class}", self._object_info),
        ]
        for method, path, handler in routes:
            for prefix in ("", "/api"):  # ComfyUI serves every route under /api too
                app.router.add_route(method, prefix + path, handler)
        return app

    @web.middleware
    async def _record(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        headers = {name.lower(): value for name, value in request.headers.items()}
        call = RecordedCall(request.method, request.path, dict(request.query), headers)
        if request.content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
            for name, value in (await request.post()).items():
                if isinstance(value, web.FileField):
                    call.form[name] = UploadedFile(value.filename, value.content_type, value.file.read())
                    value.file.seek(0)
                else:
                    call.form[name] = str(value)
        elif request.can_read_body:
            call.body = await request.read()
            try:
                call.json = json.loads(call.body)
            except ValueError:
                pass
        self.calls.append(call)
        return await handler(request)

    async def _post_prompt(self, request: web.Request) -> web.Response:
        body = await request.json()  # malformed JSON -> aiohttp's plain 500, as recorded
        if "number" in body:
            number: float = float(body["number"])
        else:
            number = -self._number if body.get("front") else self._number
            self._number += 1
        if "prompt" not in body:
            no_prompt = _prompt_error("no_prompt", "No prompt provided", "No prompt provided")
            return web.json_response({"error": no_prompt, "node_errors": {}}, status=400)
        prompt = body["prompt"]
        prompt_id = str(body.get("prompt_id", uuid.uuid4()))
        valid, error, outputs, node_errors = self._validate_prompt(
            prompt, body.get("partial_execution_targets")
        )
        extra_data = dict(body.get("extra_data", {}))
        if "client_id" in body:
            extra_data["client_id"] = body["client_id"]
        if not valid:
            return web.json_response({"error": error, "node_errors": node_errors}, status=400)
        item = QueueItem(number, prompt_id, prompt, extra_data, outputs)
        heapq.heappush(self._queue, (number, next(self._queue_order), item))
        self._send_status()
        self._wakeup.set()
        return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": node_errors})

    async def _get_prompt(self, request: web.Request) -> web.Response:
        return web.json_response(self._queue_info())

    async def _get_queue(self, request: web.Request) -> web.Response:
        running = [self._running.as_json()] if self._running else []
        pending = [entry[2].as_json() for entry in self._queue]  # heap order, as ComfyUI
        return web.json_response({"queue_running": running, "queue_pending": pending})

    async def _post_queue(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("clear"):
            self._queue.clear()
            self._send_status()
        for prompt_id in body.get("delete", []):
            self._delete_pending(prompt_id)
        return web.Response()

    def _delete_pending(self, prompt_id: str) -> None:
        for index, entry in enumerate(self._queue):
            if entry[2].prompt_id == prompt_id:
                if len(self._queue) == 1:  # ComfyUI wipes the queue here: one status more
                    self._queue.clear()
                    self._send_status()
                else:
                    self._queue.pop(index)
                    heapq.heapify(self._queue)
                self._send_status()
                return

    async def _post_interrupt(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            body = {}
        prompt_id = body.get("prompt_id")
        if not prompt_id or (self._running is not None and self._running.prompt_id == prompt_id):
            self._interrupt.set()
        return web.Response()

    async def _get_history(self, request: web.Request) -> web.Response:
        max_items = int(request.query["max_items"]) if "max_items" in request.query else None
        offset = int(request.query.get("offset", -1))
        if offset < 0 and max_items is not None:
            offset = len(self.history) - max_items
        selected: dict[str, Any] = {}
        for index, (prompt_id, entry) in enumerate(self.history.items()):
            if max_items is not None and len(selected) >= max_items:
                break
            if index >= offset:
                selected[prompt_id] = entry
        return web.json_response(selected)

    async def _get_history_item(self, request: web.Request) -> web.Response:
        prompt_id = request.match_info["prompt_id"]
        entry = self.history.get(prompt_id)
        return web.json_response({prompt_id: entry} if entry is not None else {})

    async def _post_history(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("clear"):
            self.history.clear()
        for prompt_id in body.get("delete", []):
            self.history.pop(prompt_id, None)
        return web.Response()

    async def _view(self, request: web.Request) -> web.Response:
        if "filename" not in request.query:
            return web.Response(status=404)
        filename, kind = self._annotated(request.query["filename"], request.query.get("type", "output"))
        if not filename:
            return web.Response(status=400)
        if filename[0] == "/" or ".." in filename or kind not in FOLDERS:
            return web.Response(status=400)
        folder = FOLDERS[kind]
        if "subfolder" in request.query:
            folder = posixpath.normpath(posixpath.join(folder, request.query["subfolder"]))
            if posixpath.commonpath((folder, FOLDERS[kind])) != FOLDERS[kind]:
                return web.Response(status=403)
        filename = posixpath.basename(filename)
        data = self.files.get(self._file_key(kind, posixpath.join(folder, filename)))
        if data is None:
            return web.Response(status=404)
        content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        return web.Response(
            body=data, content_type=content_type, headers={"Content-Disposition": f'filename="{filename}"'}
        )

    async def _upload_image(self, request: web.Request) -> web.Response:
        post = await request.post()
        return self._store_upload(post, None)

    async def _upload_mask(self, request: web.Request) -> web.Response:
        post = await request.post()
        original_ref = json.loads(str(post["original_ref"]))
        return self._store_upload(post, lambda mask: self._apply_mask(original_ref, mask))

    def _store_upload(
        self, post: Mapping[str, Any], transform: Callable[[bytes], bytes | None] | None
    ) -> web.Response:
        """ComfyUI's image_upload: traversal check, de-duplication by content, " (n)" renames."""
        image = post.get("image")
        kind = str(post.get("type", "input"))
        if kind not in FOLDERS:
            raise RuntimeError(f"unknown upload type {kind!r}")  # ComfyUI fails the same way: a 500
        if not isinstance(image, web.FileField) or not image.filename:
            return web.Response(status=400)
        subfolder = str(post.get("subfolder", ""))
        folder = posixpath.join(FOLDERS[kind], posixpath.normpath(subfolder))
        filename = image.filename
        path = posixpath.normpath(posixpath.join(folder, filename))
        if posixpath.commonpath((FOLDERS[kind], path)) != FOLDERS[kind]:
            return web.Response(status=400)
        data = image.file.read()
        if post.get("overwrite") not in ("true", "1"):
            stem, ext = posixpath.splitext(filename)
            for counter in itertools.count(1):
                existing = self.files.get(self._file_key(kind, path))
                if existing is None:
                    break
                if existing == data:  # the same image again: keep the name, write nothing
                    return web.json_response({"name": filename, "subfolder": subfolder, "type": kind})
                filename = f"{stem} ({counter}){ext}"
                path = posixpath.normpath(posixpath.join(folder, filename))
        stored = data if transform is None else transform(data)
        if stored is not None:
            self.files[self._file_key(kind, path)] = stored
        return web.json_response({"name": filename, "subfolder": subfolder, "type": kind})

    def _apply_mask(self, original_ref: Mapping[str, Any], mask: bytes) -> bytes | None:
        """The original image with the mask's alpha; None (nothing written) when it is not found."""
        filename, kind = self._annotated(
            str(original_ref.get("filename", "")), original_ref.get("type", "output")
        )
        if not filename or filename[0] == "/" or ".." in filename or kind not in FOLDERS:
            return None
        folder = posixpath.normpath(posixpath.join(FOLDERS[kind], original_ref.get("subfolder", "")))
        if posixpath.commonpath((folder, FOLDERS[kind])) != FOLDERS[kind]:
            return None
        original = self.files.get(self._file_key(kind, posixpath.join(folder, filename)))
        if original is None:
            return None
        with Image.open(io.BytesIO(original)) as source:
            info = PngInfo()
            for key, value in getattr(source, "text", {}).items():
                info.add_text(key, value)
            composed = source.convert("RGBA")
        with Image.open(io.BytesIO(mask)) as mask_image:
            composed.putalpha(mask_image.convert("RGBA").getchannel("A"))
        buffer = io.BytesIO()
        composed.save(buffer, format="PNG", compress_level=4, pnginfo=info)
        return buffer.getvalue()

    async def _system_stats(self, request: web.Request) -> web.Response:
        return web.json_response(SYSTEM_STATS)

    async def _features(self, request: web.Request) -> web.Response:
        if self.legacy:
            raise web.HTTPNotFound()
        return web.json_response(SERVER_FEATURES)

    async def _object_info(self, request: web.Request) -> web.Response:
        wanted = request.match_info.get("node_class")
        return web.json_response(
            {
                name: self._node_info(name, node_type)
                for name, node_type in self.node_types.items()
                if wanted is None or name == wanted
            }
        )

    def _node_info(self, name: str, node_type: NodeType) -> dict[str, Any]:
        required = dict(node_type.required)
        if node_type.file_input:
            options = required[node_type.file_input][1]
            required[node_type.file_input] = (
                sorted(key[2] for key in self.files if key[0] == "input"),
                options,
            )
        inputs: dict[str, Any] = {"required": required}
        if node_type.optional:
            inputs["optional"] = dict(node_type.optional)
        return {
            "input": inputs,
            "input_order": {category: list(specs) for category, specs in inputs.items()},
            "output": list(node_type.return_types),
            "output_is_list": [False] * len(node_type.return_types),
            "output_name": list(node_type.return_types),
            "name": name,
            "display_name": name,
            "description": "",
            "python_module": "nodes",
            "category": node_type.category,
            "output_node": node_type.output_node,
        }

    # ------------------------------------------------------------------ WebSocket

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(timeout=1.0)
        await ws.prepare(request)
        sid = request.query.get("clientId", "") or uuid.uuid4().hex
        client = _Client(ws, request, sid, self._writing)
        # Greet before registering so the status frame is always the first one a client reads.
        await client.send(json.dumps({"type": "status", "data": {"status": self._queue_info(), "sid": sid}}))
        if self._client_id == sid and self._last_node_id is not None:
            await client.send(json.dumps({"type": "executing", "data": {"node": self._last_node_id}}))
        self._clients[sid] = client
        first_message = True
        try:
            async for msg in ws:
                if msg.type is not WSMsgType.TEXT:
                    continue
                try:
                    data = json.loads(msg.data)
                except json.JSONDecodeError:
                    continue
                self.ws_received.append((sid, data))
                is_flags = isinstance(data, dict) and data.get("type") == "feature_flags"
                if first_message and is_flags and not self.legacy:  # older servers ignore the flags
                    flags = data.get("data")
                    client.feature_flags = flags if isinstance(flags, dict) else {}
                    await client.send(json.dumps({"type": "feature_flags", "data": SERVER_FEATURES}))
                first_message = False
        finally:
            if self._clients.get(sid) is client:
                del self._clients[sid]
        return ws

    def _writing(self, sid: str, text: str) -> None:
        if self.record_sent:
            self.sent_frames.append(SentFrame(time.monotonic(), sid, text))

    def _send(self, event: str, data: Any, sid: str | None) -> None:
        """ComfyUI's send_sync: queue a JSON frame for one client, or for all when sid is None."""
        self._outbox.put_nowait(_Outbound(json.dumps({"type": event, "data": data}), sid))

    def _send_bytes(self, event: int, payload: bytes, sid: str | None) -> None:
        self._outbox.put_nowait(_Outbound(struct.pack(">I", event) + payload, sid))

    def _send_status(self) -> None:
        self._send("status", {"status": self._queue_info()}, None)

    def _queue_info(self) -> dict[str, Any]:
        return {"exec_info": {"queue_remaining": len(self._queue) + (self._running is not None)}}

    async def _publish(self) -> None:
        """ComfyUI's publish_loop: deliver queued frames in order, skipping vanished clients."""
        while True:
            outbound = await self._outbox.get()
            try:
                if outbound.sid is None:
                    targets = list(self._clients.values())
                else:
                    targets = [self._clients[outbound.sid]] if outbound.sid in self._clients else []
                for client in targets:
                    await client.send(outbound.payload)
            finally:
                self._outbox.task_done()

    def _supports_metadata(self, sid: str | None) -> bool:
        client = self._clients.get(sid) if sid is not None else None
        return (
            not self.legacy
            and client is not None
            and client.feature_flags.get("supports_preview_metadata") is True
        )

    # ------------------------------------------------------------------ validation

    def _validate_prompt(
        self, prompt: dict[str, Any], partial_targets: list[str] | None
    ) -> tuple[bool, dict[str, Any] | None, list[str], dict[str, Any]]:
        """ComfyUI's validate_prompt: (valid, error, outputs to execute, node_errors)."""
        outputs = []
        for node_id, node in prompt.items():
            if "class_type" not in node:
                message = "Cannot execute because a node is missing the class_type property."
                return False, _prompt_error("invalid_prompt", message, f"Node ID '#{node_id}'"), [], {}
            node_type = self.node_types.get(node["class_type"])
            if node_type is None:
                message = f"Cannot execute because node {node['class_type']} does not exist."
                return False, _prompt_error("invalid_prompt", message, f"Node ID '#{node_id}'"), [], {}
            if node_type.output_node and (partial_targets is None or node_id in partial_targets):
                outputs.append(node_id)
        if not outputs:
            return False, _prompt_error("prompt_no_outputs", "Prompt has no outputs", ""), [], {}

        good_outputs: list[str] = []
        failed: list[tuple[str, list[dict[str, Any]]]] = []
        node_errors: dict[str, Any] = {}
        validated: dict[str, tuple[bool, list[dict[str, Any]]]] = {}
        for output in outputs:
            try:
                valid, reasons = self._validate_inputs(prompt, output, validated)
            except Exception as ex:  # noqa: BLE001 - ComfyUI reports any exception as a validation error
                reason = _exception_reason(
                    "exception_during_validation", "Exception when validating node", ex
                )
                valid, reasons = False, [reason]
                validated[output] = (valid, reasons)
            if valid:
                good_outputs.append(output)
                continue
            failed.append((output, reasons))
            for node_id, (node_valid, node_reasons) in validated.items():
                if not node_valid and node_reasons:
                    entry = node_errors.setdefault(
                        node_id,
                        {
                            "errors": node_reasons,
                            "dependent_outputs": [],
                            "class_type": prompt[node_id]["class_type"],
                        },
                    )
                    entry["dependent_outputs"].append(output)
        if not good_outputs:
            details = "\n".join(f"{r['message']}: {r['details']}" for _, reasons in failed for r in reasons)
            error = _prompt_error(
                "prompt_outputs_failed_validation", "Prompt outputs failed validation", details
            )
            return False, error, [], node_errors
        return True, None, good_outputs, node_errors

    def _validate_inputs(
        self, prompt: dict[str, Any], node_id: str, validated: dict[str, tuple[bool, list[dict[str, Any]]]]
    ) -> tuple[bool, list[dict[str, Any]]]:
        """ComfyUI's validate_inputs, converting constants in place as it does."""
        if node_id in validated:
            return validated[node_id]
        inputs = prompt[node_id]["inputs"]
        node_type = self.node_types[prompt[node_id]["class_type"]]
        errors: list[dict[str, Any]] = []
        valid = True
        for name, category, spec in node_type.inputs():
            input_type, options = spec[0], (spec[1] if len(spec) > 1 else {})
            config = [input_type, options]
            if name not in inputs:
                if category == "required":
                    errors.append(
                        _reason("required_input_missing", "Required input is missing", name, input_name=name)
                    )
                continue
            value = inputs[name]
            if isinstance(value, list):
                if len(value) != 2:
                    message = "Bad linked input, must be a length-2 list of [node_id, slot_index]"
                    errors.append(
                        _reason(
                            "bad_linked_input",
                            message,
                            name,
                            input_name=name,
                            input_config=config,
                            received_value=value,
                        )
                    )
                    continue
                source_id = value[0]
                received = self.node_types[prompt[source_id]["class_type"]].return_types[value[1]]
                if not _types_match(received, input_type):
                    details = f"{name}, received_type({received}) mismatch input_type({input_type})"
                    errors.append(
                        _reason(
                            "return_type_mismatch",
                            "Return type mismatch between linked nodes",
                            details,
                            input_name=name,
                            input_config=config,
                            received_type=received,
                            linked_node=value,
                        )
                    )
                    continue
                try:
                    if not self._validate_inputs(prompt, source_id, validated)[0]:
                        valid = False
                except Exception as ex:  # noqa: BLE001 - reported on the linked node, as ComfyUI does
                    valid = False
                    reason = _exception_reason(
                        "exception_during_inner_validation",
                        "Exception when validating inner node",
                        ex,
                        input_name=name,
                        input_config=config,
                        exception_message=str(ex),
                        linked_node=value,
                    )
                    validated[source_id] = (False, [reason])
                continue
            if isinstance(value, dict) and "__value__" in value:
                value = inputs[name] = value["__value__"]
            if isinstance(input_type, str) and input_type in CONVERTERS:
                try:
                    value = inputs[name] = CONVERTERS[input_type](value)
                except (TypeError, ValueError) as ex:
                    errors.append(
                        _reason(
                            "invalid_input_type",
                            f"Failed to convert an input value to a {input_type} value",
                            f"{name}, {value}, {ex}",
                            input_name=name,
                            input_config=config,
                            received_value=value,
                            exception_message=str(ex),
                        )
                    )
                    continue
            if name == node_type.file_input:  # LoadImage's VALIDATE_INPUTS replaces the range/list checks
                if self._input_file(value) is None:
                    errors.append(
                        _reason(
                            "custom_validation_failed",
                            "Custom validation failed for node",
                            f"{name} - Invalid image file: {value}",
                            input_name=name,
                        )
                    )
                continue
            errors.extend(_range_and_list_errors(name, value, input_type, options, config))
        result = (not errors and valid, errors)
        validated[node_id] = result
        return result

    # ------------------------------------------------------------------ execution

    async def _work(self) -> None:
        """ComfyUI's prompt_worker: one prompt at a time, lowest number first."""
        while True:
            while not self._queue or self.hold:
                self._wakeup.clear()
                await self._wakeup.wait()
            item = heapq.heappop(self._queue)[2]
            self._running = item
            self._send_status()
            self.executed_prompt_ids.append(item.prompt_id)
            self._active += 1
            self.max_concurrent = max(self.max_concurrent, self._active)
            try:
                run = await self._execute(item)
            finally:
                self._active -= 1
            outputs, meta = self._history_outputs(run)
            self.history[item.prompt_id] = {
                "prompt": item.as_json(),
                "outputs": outputs,
                "status": {
                    "status_str": "success" if run.success else "error",
                    "completed": run.success,
                    "messages": run.messages,
                },
                "meta": meta,
            }
            self._running = None
            self._send_status()
            if self._client_id is not None:
                self._send("executing", {"node": None, "prompt_id": item.prompt_id}, self._client_id)

    async def _execute(self, item: QueueItem) -> _Run:
        """ComfyUI's PromptExecutor.execute_async for one queue item."""
        self._interrupt.clear()
        self._client_id = item.client_id
        run = _Run(item, self._signatures(item.prompt))
        self._add_message(run, "execution_start", {"prompt_id": item.prompt_id})
        live = set(run.signatures.values())
        self._cache = {key: entry for key, entry in self._cache.items() if key in live}
        cached = [node_id for node_id in item.prompt if run.signatures[node_id] in self._cache]
        self._add_message(run, "execution_cached", {"nodes": cached, "prompt_id": item.prompt_id})
        order = _ExecutionList(
            item.prompt,
            lambda node_id: run.signatures[node_id] in self._cache,
            lambda node_id: self.node_types[item.prompt[node_id]["class_type"]].output_node,
        )
        for output in item.outputs:
            order.add_node(output)
        try:
            while (node_id := order.next_node()) is not None:
                await self._execute_node(run, node_id)
                order.complete(node_id)
        except _Interrupted as interrupted:
            run.success = False
            self._add_message(
                run, "execution_interrupted", self._failure_data(run, interrupted.node_id), True
            )
        except _NodeFailure as failure:
            run.success = False
            node = item.prompt[failure.node_id]
            current_inputs = {
                name: [f"<output {value[1]} of node {value[0]}>" if _is_link(value) else value]
                for name, value in node["inputs"].items()
            }
            data = {
                **self._failure_data(run, failure.node_id),
                "exception_message": f"{failure.message}\n",
                "exception_type": failure.exception_type,
                "traceback": traceback.format_tb(failure.__traceback__),
                "current_inputs": current_inputs,
                "current_outputs": list(reversed(item.prompt)),
            }
            self._add_message(run, "execution_error", data)
        else:
            self._add_message(run, "execution_success", {"prompt_id": item.prompt_id})
        self._last_node_id = None
        return run

    async def _execute_node(self, run: _Run, node_id: str) -> None:
        """ComfyUI's execute(): cached replay, or start -> executing -> work -> executed -> finish."""
        prompt_id = run.item.prompt_id
        cached = self._cache.get(run.signatures[node_id])
        if cached is not None:
            if self._client_id is not None:
                data = {
                    "node": node_id,
                    **self._display(node_id),
                    "output": cached.ui,
                    "prompt_id": prompt_id,
                }
                self._send("executed", data, self._client_id)
            self._finish_progress(run, node_id)
            return
        self._start_progress(run, node_id)
        if self._client_id is not None:
            self._last_node_id = node_id
            self._send(
                "executing",
                {"node": node_id, **self._display(node_id), "prompt_id": prompt_id},
                self._client_id,
            )
        if self._interrupt.is_set():
            raise _Interrupted(node_id)
        ui = await self._run_node(run, node_id)
        if ui and self._client_id is not None:
            data = {"node": node_id, **self._display(node_id), "output": ui, "prompt_id": prompt_id}
            self._send("executed", data, self._client_id)
        self._cache[run.signatures[node_id]] = _CacheEntry(ui or None)
        self._finish_progress(run, node_id)
        run.executed.append(node_id)

    async def _run_node(self, run: _Run, node_id: str) -> dict[str, Any] | None:
        """Stand in for the node's function; returns its UI output, if any."""
        node = run.item.prompt[node_id]
        class_type = node["class_type"]
        if self.hang:
            await self._interrupt.wait()
            raise _Interrupted(node_id)
        if node_id == self.fail_node:
            raise _NodeFailure(node_id, self.fail_message)
        if self.node_delay:
            await asyncio.sleep(self.node_delay)
        width, height, batch_size = self._shape(run, node_id)
        if class_type in self.sampler_types:
            steps = self._steps(run.item.prompt, node_id)
            for step in range(1, steps + 1):
                await asyncio.sleep(self.step_delay)
                preview = None
                if self.previews:
                    preview = _solid_image(
                        max(8, width // 8), max(8, height // 8), f"{run.item.prompt_id}:{step}"
                    )
                self._progress(run, node_id, step, steps, self.preview_format, preview)
        elif class_type == "SaveImageWebsocket":
            for index in range(batch_size):
                image = _solid_image(width, height, f"{run.item.prompt_id}:{node_id}:{index}")
                self._progress(run, node_id, index, batch_size, "PNG", image)
        elif class_type == "GetImageSize" and not self.legacy:
            text = f"width: {width}, height: {height}\n batch size: {batch_size}".encode()
            self._send_bytes(TEXT, struct.pack(">I", len(node_id.encode())) + node_id.encode() + text, None)
        elif class_type in ("SaveImage", "PreviewImage"):
            return {"images": self._save_images(run, node_id, (width, height, batch_size))}
        return None

    def _progress(
        self, run: _Run, node_id: str, value: int, total: int, image_format: str, image: Image.Image | None
    ) -> None:
        """The ProgressBar hook: interrupt check, progress_state, then progress and its preview."""
        if self._interrupt.is_set():
            raise _Interrupted(node_id)
        prompt_id, sid = run.item.prompt_id, self._client_id
        run.progress[node_id] = {"value": value, "max": total, "state": "running"}
        self._send_progress_state(run)
        with_metadata = self._supports_metadata(sid)
        if image is not None and with_metadata:
            metadata = {**self._node_ids(node_id, prompt_id), "image_type": f"image/{image_format.lower()}"}
            encoded = json.dumps(metadata).encode()
            payload = struct.pack(">I", len(encoded)) + encoded + _encode(image, image_format)
            self._send_bytes(PREVIEW_IMAGE_WITH_METADATA, payload, sid)
        # Servers before the 2024 execution rework sent only value and max.
        progress = {"value": value, "max": total}
        self._send(
            "progress",
            progress if self.legacy else {**progress, "prompt_id": prompt_id, "node": node_id},
            sid,
        )
        if image is not None and not with_metadata:
            payload = struct.pack(">I", IMAGE_FORMAT_NUMBERS[image_format]) + _encode(image, image_format)
            self._send_bytes(PREVIEW_IMAGE, payload, sid)

    def _start_progress(self, run: _Run, node_id: str) -> None:
        run.progress[node_id] = {"value": 0.0, "max": 1.0, "state": "running"}
        self._send_progress_state(run)

    def _finish_progress(self, run: _Run, node_id: str) -> None:
        entry = run.progress.setdefault(node_id, {"value": 0, "max": 1, "state": "pending"})
        entry.update(state="finished", value=entry["max"])
        self._send_progress_state(run)

    def _send_progress_state(self, run: _Run) -> None:
        """Every non-pending node's state, to every client (ComfyUI's WebUIProgressHandler)."""
        if self.legacy:
            return
        prompt_id = run.item.prompt_id
        nodes = {
            node_id: {
                "value": entry["value"],
                "max": entry["max"],
                "state": entry["state"],
                **self._node_ids(node_id, prompt_id),
            }
            for node_id, entry in run.progress.items()
        }
        self._send("progress_state", {"prompt_id": prompt_id, "nodes": nodes}, None)

    def _add_message(self, run: _Run, event: str, data: dict[str, Any], broadcast: bool = False) -> None:
        """PromptExecutor.add_message: kept for the history, sent to the prompt's client."""
        data = {**data, "timestamp": _timestamp()}
        run.messages.append([event, data])
        if self._client_id is not None or broadcast:
            self._send(event, data, self._client_id)

    def _failure_data(self, run: _Run, node_id: str) -> dict[str, Any]:
        return {
            "prompt_id": run.item.prompt_id,
            "node_id": node_id,
            "node_type": run.item.prompt[node_id]["class_type"],
            "executed": list(reversed(run.executed)),
        }

    def _history_outputs(self, run: _Run) -> tuple[dict[str, Any], dict[str, Any]]:
        """The UI outputs of the prompt's nodes (cached ones included) and their meta, by node id."""
        outputs: dict[str, Any] = {}
        meta: dict[str, Any] = {}
        for node_id in run.item.prompt:
            entry = self._cache.get(run.signatures[node_id])
            if entry is not None and entry.ui:
                outputs[node_id] = entry.ui
                meta[node_id] = {
                    "node_id": node_id,
                    "display_node": node_id,
                    "parent_node": None,
                    "real_node_id": node_id,
                }
        return outputs, meta

    def _display(self, node_id: str) -> dict[str, str]:
        return {} if self.legacy else {"display_node": node_id}

    @staticmethod
    def _node_ids(node_id: str, prompt_id: str) -> dict[str, Any]:
        return {
            "node_id": node_id,
            "prompt_id": prompt_id,
            "display_node_id": node_id,
            "parent_node_id": None,
            "real_node_id": node_id,
        }

    # ------------------------------------------------------------------ graph helpers

    def _signatures(self, prompt: dict[str, Any]) -> dict[str, Hashable]:
        """Cache keys like CacheKeySetInputSignature: class, IS_CHANGED and inputs, ancestors included."""
        memo: dict[str, Hashable] = {}

        def signature(node_id: str) -> Hashable:
            if node_id in memo:
                return memo[node_id]
            memo[node_id] = ("cycle", node_id)
            node = prompt[node_id]
            node_type = self.node_types[node["class_type"]]
            changed: Hashable = None
            if node_type.always_changed:
                changed = next(self._change_tokens)
            elif node_type.file_input:
                changed = hashlib.sha256(
                    self._input_file(node["inputs"].get(node_type.file_input)) or b""
                ).hexdigest()
            parts = []
            for name, value in sorted(node["inputs"].items()):
                if _is_link(value) and str(value[0]) in prompt:
                    parts.append((name, signature(str(value[0])), value[1]))
                else:
                    parts.append((name, json.dumps(value, sort_keys=True), None))
            memo[node_id] = (node["class_type"], changed, tuple(parts))
            return memo[node_id]

        return {node_id: signature(node_id) for node_id in prompt}

    def _shape(self, run: _Run, node_id: str) -> tuple[int, int, int]:
        """(width, height, batch) of what a node outputs; 512x512x1 when the graph does not say."""
        return self._find_shape(run, node_id) or (512, 512, 1)

    def _find_shape(self, run: _Run, node_id: str) -> tuple[int, int, int] | None:
        """Inherit the first linked input's shape, then apply the node's own width/height/batch_size."""
        if node_id in run.shapes:
            return run.shapes[node_id]
        run.shapes[node_id] = None  # guards against cycles
        prompt = run.item.prompt
        node = prompt[node_id]
        inputs = node["inputs"]
        shape: tuple[int, int, int] | None = None
        file_input = self.node_types[node["class_type"]].file_input
        data = self._input_file(inputs.get(file_input)) if file_input else None
        if data is not None:
            with Image.open(io.BytesIO(data)) as image:
                shape = (image.width, image.height, 1)
        for value in inputs.values():
            if shape is None and _is_link(value) and str(value[0]) in prompt:
                shape = self._find_shape(run, str(value[0]))
        width, height, batch_size = shape or (0, 0, 1)
        new_width, new_height = (
            self._int_input(run, inputs.get("width")),
            self._int_input(run, inputs.get("height")),
        )
        new_batch = self._int_input(run, inputs.get("batch_size"))
        if new_width == 0 and new_height:  # 0 keeps the aspect ratio (ImageScale)
            new_width = round(width * new_height / height) if height else new_height
        if new_height == 0 and new_width:
            new_height = round(height * new_width / width) if width else new_width
        width, height = new_width or width, new_height or height
        batch_size = new_batch or batch_size
        run.shapes[node_id] = (width, height, batch_size) if width and height else None
        return run.shapes[node_id]

    def _int_input(self, run: _Run, value: Any) -> int | None:
        """A constant int, or the width/height/batch read from a GetImageSize output."""
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if _is_link(value) and str(value[0]) in run.item.prompt:
            source_id = str(value[0])
            if run.item.prompt[source_id]["class_type"] == "GetImageSize" and 0 <= value[1] <= 2:
                shape = self._find_shape(run, source_id)
                return shape[value[1]] if shape else None
        return None

    @staticmethod
    def _steps(prompt: dict[str, Any], node_id: str) -> int:
        """The sampler's own ``steps`` input, else the nearest upstream one (SamplerCustom's sigmas)."""
        queue, seen = [node_id], {node_id}
        while queue:
            inputs = prompt[queue.pop(0)]["inputs"]
            steps = inputs.get("steps")
            if isinstance(steps, int) and steps > 0:
                return steps
            for value in inputs.values():
                if _is_link(value) and str(value[0]) in prompt and str(value[0]) not in seen:
                    seen.add(str(value[0]))
                    queue.append(str(value[0]))
        return 20

    def _save_images(self, run: _Run, node_id: str, shape: tuple[int, int, int]) -> list[dict[str, str]]:
        """SaveImage/PreviewImage: real PNGs under ComfyUI's file naming, raising its traversal error."""
        node = run.item.prompt[node_id]
        width, height, batch_size = shape
        if node["class_type"] == "SaveImage":
            kind, prefix = "output", str(node["inputs"].get("filename_prefix", "ComfyUI"))
        else:
            kind, prefix = "temp", "ComfyUI" + self._temp_prefix(node_id)
        prefix = prefix.replace("%width%", str(width)).replace("%height%", str(height))
        subfolder, filename = posixpath.split(posixpath.normpath(prefix))
        base = FOLDERS[kind]
        folder = posixpath.normpath(posixpath.join(base, subfolder))
        common = posixpath.commonpath((base, folder))
        if common != base:
            message = (
                "**** ERROR: Saving image outside the output folder is not allowed."
                f"\n full_output_folder: {folder}\n         output_dir: {base}\n         commonpath: {common}"
            )
            raise _NodeFailure(node_id, message)
        counter = self._next_counter(kind, subfolder, filename)
        pnginfo = PngInfo()
        pnginfo.add_text("prompt", json.dumps(run.item.prompt))
        images = []
        for index in range(batch_size):
            name = f"{filename.replace('%batch_num%', str(index))}_{counter:05}_.png"
            image = _solid_image(width, height, f"{run.item.prompt_id}:{node_id}:{index}")
            self.files[(kind, subfolder, name)] = _encode(image, "PNG", pnginfo)
            images.append({"filename": name, "subfolder": subfolder, "type": kind})
            counter += 1
        return images

    def _next_counter(self, kind: str, subfolder: str, filename: str) -> int:
        counters = [
            int(digits)
            for key_kind, key_folder, name in self.files
            if key_kind == kind
            and key_folder == subfolder
            and name.startswith(filename + "_")
            and (digits := name[len(filename) + 1 :].split("_")[0]).isdigit()
        ]
        return max(counters, default=0) + 1

    def _temp_prefix(self, node_id: str) -> str:
        """PreviewImage's random "_temp_xxxxx" prefix, kept per node as ComfyUI keeps node objects."""
        if node_id not in self._temp_prefixes:
            self._temp_prefixes[node_id] = "_temp_" + "".join(
                random.choice("abcdefghijklmnopqrstupvxyz") for _ in range(5)
            )
        return self._temp_prefixes[node_id]

    # ------------------------------------------------------------------ files

    @staticmethod
    def _annotated(filename: str, default_type: str) -> tuple[str, str]:
        """folder_paths.annotated_filepath: "name.png [output]" selects the folder."""
        for kind in FOLDERS:
            if filename.endswith(f"[{kind}]"):
                return filename[: -len(kind) - 3], kind
        return filename, default_type

    @staticmethod
    def _file_key(kind: str, path: str) -> FileKey:
        folder, name = posixpath.split(posixpath.relpath(path, FOLDERS[kind]))
        return kind, folder, name

    def _input_file(self, value: Any) -> bytes | None:
        """The bytes of an input-folder file named like LoadImage's ``image`` ("sub/name.png [input]")."""
        if not isinstance(value, str) or not value:
            return None
        filename, kind = self._annotated(value, "input")
        if kind not in FOLDERS or ".." in filename or filename.startswith("/"):
            return None
        return self.files.get(self._file_key(kind, posixpath.join(FOLDERS[kind], filename)))


def _prompt_error(error_type: str, message: str, details: str) -> dict[str, Any]:
    return {"type": error_type, "message": message, "details": details, "extra_info": {}}


def _reason(error_type: str, message: str, details: str, **extra_info: Any) -> dict[str, Any]:
    return {"type": error_type, "message": message, "details": details, "extra_info": extra_info}


def _exception_reason(error_type: str, message: str, ex: Exception, **extra_info: Any) -> dict[str, Any]:
    module, name = type(ex).__module__, type(ex).__qualname__
    exception_type = name if module == "builtins" else f"{module}.{name}"  # execution.full_type_name
    traceback_lines = traceback.format_tb(ex.__traceback__)
    return _reason(
        error_type, message, str(ex), **extra_info, exception_type=exception_type, traceback=traceback_lines
    )


def _range_and_list_errors(
    name: str, value: Any, input_type: Any, options: Mapping[str, Any], config: list[Any]
) -> list[dict[str, Any]]:
    """The min/max and combo checks of validate_inputs (at most one error, as there)."""
    if "min" in options and value < options["min"]:
        message = f"Value {value} smaller than min of {options['min']}"
        return [
            _reason(
                "value_smaller_than_min",
                message,
                name,
                input_name=name,
                input_config=config,
                received_value=value,
            )
        ]
    if "max" in options and value > options["max"]:
        message = f"Value {value} bigger than max of {options['max']}"
        return [
            _reason(
                "value_bigger_than_max",
                message,
                name,
                input_name=name,
                input_config=config,
                received_value=value,
            )
        ]
    if isinstance(input_type, list) and value not in input_type:
        # ComfyUI leaves long lists (model files) out of the answer.
        listed = f"(list of length {len(input_type)})" if len(input_type) > 20 else str(input_type)
        return [
            _reason(
                "value_not_in_list",
                "Value not in list",
                f"{name}: '{value}' not in {listed}",
                input_name=name,
                input_config=config if len(input_type) <= 20 else None,
                received_value=value,
            )
        ]
    return []
