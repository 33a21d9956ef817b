"""Workflow templates: an API-format workflow JSON plus which node inputs receive the request's values."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

# node class types whose images are the job's result when the declaration names no output nodes
SAVE_NODES = frozenset({"SaveImage", "SaveImageWebsocket"})


class InputBindings(BaseModel):
    """`"<node id>.<input name>"` for each request value a workflow takes; unset values are left as saved."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    negative_prompt: str | None = None
    width: str | None = None
    height: str | None = None
    n: str | None = None
    seed: str | None = None
    steps: str | None = None
    image: str | None = None
    mask: str | None = None


@dataclass(frozen=True)
class Binding:
    node: str
    input: str


class WorkflowTemplate:
    """A validated workflow; `render` fills a copy for one request."""

    def __init__(self, path: Path, bindings: InputBindings, outputs: list[str] | None) -> None:
        self.path = path
        try:
            graph = json.loads(path.read_text())
        except OSError as exc:
            raise ValueError(f"workflow {path}: cannot read: {exc.strerror}") from None
        except ValueError as exc:
            raise ValueError(f"workflow {path}: invalid JSON: {exc}") from None
        if not isinstance(graph, dict) or not all(isinstance(n, dict) and "class_type" in n
                                                  for n in graph.values()):
            raise ValueError(f"workflow {path}: not an API-format workflow (save it with 'Export (API)')")
        self.graph: dict[str, dict[str, Any]] = graph
        self.bindings: dict[str, Binding] = {}
        for field, target in bindings.model_dump(exclude_none=True).items():
            node, sep, name = target.partition(".")
            if not sep:
                raise ValueError(f"workflow {path}: inputs.{field} must look like '<node id>.<input>', "
                                 f"got {target!r}")
            if node not in graph:
                raise ValueError(f"workflow {path}: inputs.{field} names node '{node}', "
                                 "which is not in the workflow")
            if name not in graph[node].get("inputs", {}):
                raise ValueError(f"workflow {path}: inputs.{field}: node '{node}' "
                                 f"({graph[node]['class_type']}) "
                                 f"has no input '{name}'")
            self.bindings[field] = Binding(node, name)
        if outputs is None:
            outputs = [nid for nid, node in graph.items() if node["class_type"] in SAVE_NODES]
        for nid in outputs:
            if nid not in graph:
                raise ValueError(f"workflow {path}: output node '{nid}' is not in the workflow")
        if not outputs:
            raise ValueError(f"workflow {path}: no output node (SaveImage or SaveImageWebsocket); "
                             "declare `outputs`")
        self.outputs = frozenset(outputs)

    def takes(self, field: str) -> bool:
        return field in self.bindings

    def render(self, values: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """A copy of the workflow with each bound input set from `values` (keys as in InputBindings)."""
        graph = copy.deepcopy(self.graph)
        for field, value in values.items():
            binding = self.bindings.get(field)
            if binding is not None and value is not None:
                graph[binding.node]["inputs"][binding.input] = value
        return graph
