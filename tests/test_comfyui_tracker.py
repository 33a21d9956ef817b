"""The ComfyUI protocol pieces against the frames a real ComfyUI 0.3.64 sent (shared/comfyui-protocol): the
prompt tracker replaying each recording, binary frame decoding, workflow templates."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.pictures import encode, photo
from workers.comfyui import frames
from workers.comfyui.template import InputBindings, WorkflowTemplate
from workers.comfyui.tracker import PromptTracker, node_weights

PROTOCOL = ROOT.parent / "shared" / "comfyui-protocol"
TXT2IMG = ROOT / "deploy" / "workflows" / "sd-txt2img.json"


def replay(name: str, prompt_id: str | None = None) -> tuple[PromptTracker, list[float], dict[str, Any]]:
    """Feed a recording's text frames to a tracker of its prompt (or of `prompt_id`); the fractions seen."""
    recording = json.loads((PROTOCOL / name).read_text())
    pid, entry = next(iter(recording["history"].items()))
    graph = entry["prompt"][2]
    outputs = frozenset(nid for nid, node in graph.items() if node["class_type"].startswith("Save"))
    tracker = PromptTracker(prompt_id or pid, graph, outputs)
    fractions = []
    for item in recording["messages"]:
        message = item["msg"]
        if "type" in message:
            tracker.on_message(message["type"], message["data"])
            fractions.append(tracker.fraction)
    return tracker, fractions, entry


def test_a_full_run_climbs_to_the_end_and_names_its_outputs() -> None:
    tracker, fractions, history = replay("main.json")
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert len(set(fractions)) >= 8  # node by node, not 0 then 1
    assert tracker.finished and tracker.outcome.success and tracker.outcome.error is None
    saved = {nid: out["images"] for nid, out in history["outputs"].items() if nid in tracker.outputs}
    assert tracker.output_images == saved and saved


def test_a_cached_run_counts_cached_nodes_as_done() -> None:
    tracker, fractions, _ = replay("main_ff.json")
    first_cached = fractions[[i for i, f in enumerate(fractions) if f > 0][0]]
    assert first_cached >= 0.8  # nine of ten nodes came from the cache
    assert tracker.finished and tracker.outcome.success and tracker.output_images


def test_a_node_error_ends_the_prompt_naming_the_node() -> None:
    tracker, _, _ = replay("runtime_error.json")
    assert tracker.finished and not tracker.outcome.success
    assert tracker.outcome.error is not None
    assert tracker.outcome.error["node_id"] == "2" and tracker.outcome.error["node_type"] == "SaveImage"


def test_an_interrupted_prompt_ends_interrupted() -> None:
    tracker, _, _ = replay("interrupt_stock.json")
    assert tracker.finished and tracker.outcome.interrupted and not tracker.outcome.success


def test_a_batch_reports_progress_per_image() -> None:
    tracker, fractions, _ = replay("ws_batch.json")
    assert tracker.finished and tracker.outcome.success
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


@pytest.mark.parametrize("name", ["main.json", "main_ff.json", "runtime_error.json", "ws_batch.json"])
def test_another_prompts_frames_change_nothing(name: str) -> None:
    tracker, fractions, _ = replay(name, prompt_id="not-this-one")
    assert set(fractions) == {0.0} and not tracker.started and not tracker.finished
    assert tracker.stage == "queued at ComfyUI" and not tracker.output_images


def test_stage_texts() -> None:
    graph = json.loads(TXT2IMG.read_text())
    tracker = PromptTracker("p", graph, frozenset({"9"}))
    tracker.queue_position = 3
    assert tracker.stage == "queued at ComfyUI (position 3)"
    tracker.on_message("execution_start", {"prompt_id": "p"})
    expected = {"4": "loading", "6": "encoding the prompt", "5": "running EmptyLatentImage", "8": "decoding",
                "9": "saving"}
    for node, stage in expected.items():
        tracker.on_message("executing", {"node": node, "prompt_id": "p"})
        assert tracker.stage == stage
    tracker.on_message("executing", {"node": "3", "prompt_id": "p"})
    tracker.on_message("progress", {"value": 7, "max": 20})  # an older server: no prompt id, no node
    assert tracker.stage == "sampling step 7/20" and tracker.node_fraction["3"] == 7 / 20


def test_a_sampler_step_is_named_by_its_progress_state() -> None:
    """ComfyUI sends each step's progress_state before its progress frame: the stage and the percent move
    together on the first, so the event it triggers names the step it counts."""
    graph = json.loads(TXT2IMG.read_text())
    tracker = PromptTracker("p", graph, frozenset({"9"}))
    tracker.on_message("execution_start", {"prompt_id": "p"})

    def state(value: float, maximum: float, running: str = "running") -> dict[str, Any]:
        sampler = {"value": value, "max": maximum, "state": running, "node_id": "3", "prompt_id": "p"}
        return {"prompt_id": "p", "nodes": {"5": {"value": 1.0, "max": 1.0, "state": "finished"}, "3": sampler}}

    tracker.on_message("progress_state", state(0.0, 1.0))  # the sampler's start comes before its `executing`
    tracker.on_message("executing", {"node": "3", "prompt_id": "p"})
    tracker.on_message("progress_state", state(0.0, 1.0))  # a start seen late is still no step
    assert tracker.stage == "running KSampler"
    for step in (1, 2):
        tracker.on_message("progress_state", state(step, 20))
        stage, fraction = tracker.stage, tracker.fraction
        assert stage == f"sampling step {step}/20" and tracker.node_fraction["3"] == step / 20
        tracker.on_message("progress", {"value": step, "max": 20, "prompt_id": "p", "node": "3"})
        assert (tracker.stage, tracker.fraction) == (stage, fraction)  # the progress frame adds nothing
    tracker.on_message("progress_state", state(20, 20, "finished"))
    assert tracker.stage == "sampling step 2/20" and tracker.node_fraction["3"] == 1.0
    tracker.on_message("executing", {"node": "8", "prompt_id": "p"})
    tracker.on_message("progress_state", {"prompt_id": "p", "nodes": {"8": {"value": 1, "max": 1, "state": "running"}}})
    assert tracker.stage == "decoding" and tracker.step is None  # only a sampler's state names a step


def test_samplers_weigh_their_steps() -> None:
    graph = json.loads(TXT2IMG.read_text())
    assert node_weights(graph) == {**{nid: 1.0 for nid in graph}, "3": 20.0}
    custom = {"1": {"class_type": "BasicScheduler", "inputs": {"steps": 30, "model": ["2", 0]}},
              "2": {"class_type": "CheckpointLoaderSimple", "inputs": {}},
              "3": {"class_type": "SamplerCustom", "inputs": {"sigmas": ["1", 0], "model": ["2", 0]}},
              "4": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}}
    assert node_weights(custom) == {"1": 1.0, "2": 1.0, "3": 30.0, "4": 1.0}  # steps held by the scheduler


def test_binary_frames() -> None:
    png, jpeg = encode(photo((8, 8))), encode(photo((8, 8)), "JPEG")
    preview = frames.decode(struct.pack(">II", 1, 1) + jpeg)
    assert preview is not None and preview.image == jpeg and preview.image_format == "jpeg"
    preview = frames.decode(struct.pack(">II", 1, 2) + png)
    assert preview is not None and preview.image_format == "png" and preview.metadata is None
    metadata = json.dumps({"node_id": "3", "prompt_id": "p", "image_type": "image/png"}).encode()
    framed = frames.decode(struct.pack(">II", 4, len(metadata)) + metadata + png)
    assert framed is not None and framed.image == png and framed.image_format == "png"
    assert framed.metadata is not None and framed.metadata["prompt_id"] == "p"
    text = frames.decode(struct.pack(">II", 3, 1) + b"6" + "width: 512 ✓".encode())
    assert text is not None and text.node_id == "6" and text.text == "width: 512 ✓" and text.image is None
    assert frames.decode(struct.pack(">I", 9) + b"future event") is None
    assert frames.decode(b"\x00\x01") is None

    tracker = PromptTracker("p", {"3": {"class_type": "KSampler", "inputs": {}}}, frozenset())
    assert tracker.on_binary(preview) is None  # an anonymous preview while ours waits is another prompt's
    assert tracker.on_binary(framed) == (png, "png")  # one naming our prompt is ours
    tracker.on_message("execution_start", {"prompt_id": "p"})
    assert tracker.on_binary(preview) == (png, "png") and tracker.on_binary(text) is None
    other = frames.decode(struct.pack(">II", 4, len(b'{"prompt_id": "q"}')) + b'{"prompt_id": "q"}' + png)
    assert other is not None and tracker.on_binary(other) is None


def test_template_renders_only_bound_inputs(tmp_path: Path) -> None:
    bindings = InputBindings(prompt="6.text", width="5.width", seed="3.seed")
    template = WorkflowTemplate(TXT2IMG, bindings, None)
    assert template.outputs == frozenset({"9"}) and template.takes("seed") and not template.takes("image")
    graph = template.render({"prompt": "a cat", "width": 320, "seed": 1, "height": 999,
                             "negative_prompt": None})
    original = json.loads(TXT2IMG.read_text())
    assert graph["6"]["inputs"]["text"] == "a cat" and graph["5"]["inputs"]["width"] == 320
    assert graph["5"]["inputs"]["height"] == original["5"]["inputs"]["height"]  # unbound: as saved
    assert template.render({"prompt": "x"})["6"]["inputs"]["text"] == "x"  # each render starts from the file
    with pytest.raises(ValueError, match="must look like '<node id>.<input>'"):
        WorkflowTemplate(TXT2IMG, InputBindings(prompt="6"), None)
