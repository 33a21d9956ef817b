"""Follows one prompt through ComfyUI's messages: which are ours, overall percent, stage, outputs, the end."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workers.comfyui.frames import BinaryFrame

LOADER_HINTS = ("Loader", "LoadImage", "Load")
DECODER_HINTS = ("VAEDecode",)
SAVER_HINTS = ("Save", "Preview")


@dataclass
class PromptOutcome:
    success: bool = False
    error: dict[str, Any] | None = None  # execution_error data
    interrupted: bool = False


@dataclass
class PromptTracker:
    """State of our prompt, fed with every frame from our socket. Frames for other prompts are ignored;
    frames without a prompt id (older servers) count as ours only while our prompt is the one running."""

    prompt_id: str
    graph: dict[str, dict[str, Any]]
    outputs: frozenset[str]
    started: bool = False
    finished: bool = False
    current: str | None = None
    queue_position: int | None = None
    node_fraction: dict[str, float] = field(default_factory=dict)
    step: tuple[int, int] | None = None
    output_images: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    ws_images: list[tuple[bytes, str]] = field(default_factory=list)
    outcome: PromptOutcome = field(default_factory=PromptOutcome)

    def __post_init__(self) -> None:
        # a sampler's steps dominate a workflow's time: weight nodes by their step count
        self.weights = {nid: float(max(1, int(node.get("inputs", {}).get("steps", 1))))
                        if isinstance(node.get("inputs", {}).get("steps"), int) else 1.0
                        for nid, node in self.graph.items()}

    def _ours(self, data: dict[str, Any]) -> bool:
        pid = data.get("prompt_id")
        if pid is not None:
            return bool(pid == self.prompt_id)
        return self.started and not self.finished

    def on_message(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "status" or not isinstance(data, dict):
            return
        if not self._ours(data):
            return
        if kind == "execution_start":
            self.started = True
            self.queue_position = None
        elif kind == "execution_cached":
            self.started = True
            for nid in data.get("nodes", []):
                self.node_fraction[str(nid)] = 1.0
        elif kind == "executing":
            node = data.get("node")
            if self.current is not None:
                self.node_fraction[self.current] = 1.0
            self.step = None
            if node is None:
                if self.started:
                    self.finished = True
                    if self.outcome.error is None and not self.outcome.interrupted:
                        self.outcome.success = True
            else:
                self.started = True
                self.current = str(node)
                self.node_fraction.setdefault(self.current, 0.0)
        elif kind == "progress":
            node = str(data.get("node") or self.current or "")
            maximum = max(1, int(data.get("max", 1)))
            value = min(maximum, int(data.get("value", 0)))
            if node:
                self.node_fraction[node] = max(self.node_fraction.get(node, 0.0), value / maximum)
            self.step = (value, maximum)
        elif kind == "progress_state":
            for nid, state in (data.get("nodes") or {}).items():
                maximum = float(state.get("max") or 1.0)
                done = 1.0 if state.get("state") == "finished" else float(state.get("value", 0)) / maximum
                self.node_fraction[str(nid)] = max(self.node_fraction.get(str(nid), 0.0), min(1.0, done))
        elif kind == "executed":
            node = str(data.get("node"))
            self.node_fraction[node] = 1.0
            images = (data.get("output") or {}).get("images") or []
            if node in self.outputs and images:
                self.output_images[node] = images
        elif kind == "execution_success":
            self.outcome.success = True
            self.finished = True
        elif kind == "execution_error":
            self.outcome.error = data
            self.finished = True
        elif kind == "execution_interrupted":
            self.outcome.interrupted = True
            self.finished = True

    def on_binary(self, frame: BinaryFrame) -> tuple[bytes, str] | None:
        """A preview to show as a partial image, or None. Images sent by a SaveImageWebsocket output node
        are results, not previews: they are kept in `ws_images`."""
        if frame.image is None or frame.image_format is None:
            return None
        if frame.metadata is not None:
            if frame.metadata.get("prompt_id") != self.prompt_id:
                return None
            node = str(frame.metadata.get("node_id") or frame.metadata.get("display_node_id") or "")
        else:
            if not self.started or self.finished:
                return None
            node = self.current or ""
        if node in self.outputs and self.graph.get(node, {}).get("class_type") == "SaveImageWebsocket":
            self.ws_images.append((frame.image, frame.image_format))
            return None
        return frame.image, frame.image_format

    @property
    def fraction(self) -> float:
        total = sum(self.weights.values()) or 1.0
        return sum(w * self.node_fraction.get(nid, 0.0) for nid, w in self.weights.items()) / total

    @property
    def stage(self) -> str:
        if not self.started:
            if self.queue_position:
                return f"queued at ComfyUI (position {self.queue_position})"
            return "queued at ComfyUI"
        if self.finished:
            return "fetching images"
        node = self.graph.get(self.current or "", {})
        class_type = str(node.get("class_type", ""))
        if self.step is not None and isinstance(node.get("inputs", {}).get("steps"), int):
            return f"sampling step {self.step[0]}/{self.step[1]}"
        if any(h in class_type for h in DECODER_HINTS):
            return "decoding"
        if any(class_type.startswith(h) for h in SAVER_HINTS):
            return "saving"
        if any(h in class_type for h in LOADER_HINTS):
            return "loading"
        return f"running {class_type}" if class_type else "starting"
