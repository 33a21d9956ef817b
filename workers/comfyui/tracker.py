"""Follows one prompt through ComfyUI's messages: which are ours, overall percent, stage, outputs, the end."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workers.comfyui.frames import BinaryFrame

# (substring of a node's class type, stage text), first match wins
STAGES = (
    ("VAEDecode", "decoding"),
    ("VAEEncode", "encoding the input image"),
    ("TextEncode", "encoding the prompt"),
    ("Save", "saving"),
    ("Preview", "saving"),
    ("Load", "loading"),
)


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)


def _is_sampler(class_type: str) -> bool:
    return "Sampler" in class_type and not class_type.endswith("Select")


def node_weights(graph: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Samplers dominate a workflow's time: each weighs its step count (its own `steps`, else the nearest
    upstream one, as SamplerCustom's scheduler holds it); every other node weighs one step."""

    def steps(nid: str, seen: set[str]) -> int | None:
        inputs = graph.get(nid, {}).get("inputs", {})
        own = inputs.get("steps")
        if isinstance(own, int) and own > 0:
            return own
        for value in inputs.values():
            if _is_link(value) and str(value[0]) not in seen:
                seen.add(str(value[0]))
                found = steps(str(value[0]), seen)
                if found is not None:
                    return found
        return None

    return {nid: float(steps(nid, {nid}) or 1) if _is_sampler(str(node.get("class_type", ""))) else 1.0
            for nid, node in graph.items()}


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
    cached: bool = False  # every node came from ComfyUI's cache
    current: str | None = None
    queue_position: int | None = None
    node_fraction: dict[str, float] = field(default_factory=dict)
    step: tuple[int, int] | None = None
    output_images: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    ws_images: list[tuple[bytes, str]] = field(default_factory=list)
    outcome: PromptOutcome = field(default_factory=PromptOutcome)

    def __post_init__(self) -> None:
        self.weights = node_weights(self.graph)

    def _ours(self, data: dict[str, Any]) -> bool:
        pid = data.get("prompt_id")
        if pid is not None:
            return bool(pid == self.prompt_id)
        return self.started and not self.finished

    def on_message(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "status" or not isinstance(data, dict) or not self._ours(data) or self.finished:
            return
        if kind == "execution_start":
            self.started = True
            self.queue_position = None
        elif kind == "execution_cached":
            self.started = True
            nodes = {str(nid) for nid in data.get("nodes", [])}
            self.cached = bool(nodes) and nodes >= self.graph.keys()
            for nid in nodes:
                self.node_fraction[nid] = 1.0
        elif kind == "executing":
            self._on_executing(data.get("node"))
        elif kind == "progress":
            node = str(data.get("node") or self.current or "")
            total = max(1, int(data.get("max", 1)))
            value = min(total, int(data.get("value", 0)))
            if node:
                self.node_fraction[node] = max(self.node_fraction.get(node, 0.0), value / total)
            self.step = (value, total)
        elif kind == "progress_state":
            states = data.get("nodes") or {}
            for nid, state in states.items():
                maximum = float(state.get("max") or 1.0)
                done = 1.0 if state.get("state") == "finished" else float(state.get("value", 0)) / maximum
                self.node_fraction[str(nid)] = max(self.node_fraction.get(str(nid), 0.0), min(1.0, done))
            self._sampler_step(states.get(self.current or ""))
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

    def _on_executing(self, node: Any) -> None:
        if self.current is not None:
            self.node_fraction[self.current] = 1.0
        self.step = None
        if node is None:  # the end of the prompt; newer servers sent execution_success just before
            if self.started:
                self.outcome.success = True
                self.finished = True
            return
        self.started = True
        self.queue_position = None
        self.current = str(node)
        self.node_fraction.setdefault(self.current, 0.0)

    def _sampler_step(self, state: Any) -> None:
        """ComfyUI sends a step's `progress_state` before its `progress` frame: the running sampler's step is
        taken from it too, so the stage names the step the percent already counts. A sampler's steps count
        from 1; the 0 of a node's start is no step."""
        if not isinstance(state, dict) or state.get("state") != "running" or not _is_sampler(self._class_type):
            return
        value, maximum = int(float(state.get("value", 0))), int(float(state.get("max") or 1))
        if value >= 1:
            self.step = (value, max(1, maximum))

    def on_binary(self, frame: BinaryFrame) -> tuple[bytes, str] | None:
        """A preview to show as a partial image, or None. Images sent by a SaveImageWebsocket output node
        are results, not previews: they are kept in `ws_images`."""
        if frame.image is None or frame.image_format is None:
            return None
        if frame.metadata is not None:
            if frame.metadata.get("prompt_id") != self.prompt_id or self.finished:
                return None
            node = str(frame.metadata.get("node_id") or frame.metadata.get("display_node_id") or "")
        else:  # only the running prompt's client gets these
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
    def _class_type(self) -> str:
        """The running node's class type ("" before the first node)."""
        return str(self.graph.get(self.current or "", {}).get("class_type", ""))

    @property
    def stage(self) -> str:
        if not self.started:
            if self.queue_position:
                return f"queued at ComfyUI (position {self.queue_position})"
            return "queued at ComfyUI"
        if self.finished:
            return "fetching images"
        if self.current is None:
            return "reusing ComfyUI's cached results" if self.cached else "starting"
        class_type = self._class_type
        if self.step is not None and _is_sampler(class_type):
            return f"sampling step {self.step[0]}/{self.step[1]}"
        stage = next((text for hint, text in STAGES if hint in class_type), None)
        if stage is not None:
            return stage
        if self.step is not None:
            return f"running {class_type} {self.step[0]}/{self.step[1]}"
        return f"running {class_type}" if class_type else "running"
