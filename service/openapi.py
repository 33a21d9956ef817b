"""The OpenAPI 3.1 document, built from the router and the pydantic models the handlers parse and answer with.

A handler declares its contract next to its code with `@api(...)`; the router supplies method and path. So a
new endpoint shows up in `/openapi.json` as soon as its decorated handler is routed, and a model change shows
up because the document is generated from the very classes `parse_body` and `model_response` use.
"""

from __future__ import annotations

import http
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Literal, TypeVar

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from service.schemas import ErrorResponse

OPERATION_ATTR = "__openapi_operation__"
REF_TEMPLATE = "#/components/schemas/{model}"
BINARY = {"type": "string", "format": "binary"}
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")

Auth = Literal["required", "optional", "none"]

PREFER_HEADER = {
    "Prefer": "`respond-async` answers 202 with the job at once instead of waiting for the images."
}


@dataclass(frozen=True)
class Media:
    """A body that is not a pydantic model as JSON: image bytes, Prometheus text, an event stream..."""

    types: tuple[str, ...]
    schema: Mapping[str, Any] = field(default_factory=lambda: dict(BINARY))


Body = type[BaseModel] | Media
Responses = Mapping[int, Body | tuple[Body, ...]]


@dataclass(frozen=True)
class Operation:
    """What `@api` records on a handler."""

    summary: str
    tags: tuple[str, ...]
    responses: Responses
    errors: tuple[int, ...]
    body: type[BaseModel] | None
    form: type[BaseModel] | None
    query: type[BaseModel] | None
    headers: Mapping[str, str]
    path_params: Mapping[str, str]
    auth: Auth
    description: str | None


H = TypeVar("H", bound=Callable[..., Any])


def api(
    summary: str,
    *,
    tags: tuple[str, ...] | str,
    responses: Responses,
    errors: tuple[int, ...] = (),
    body: type[BaseModel] | None = None,
    form: type[BaseModel] | None = None,
    query: type[BaseModel] | None = None,
    headers: Mapping[str, str] | None = None,
    path_params: Mapping[str, str] | None = None,
    auth: Auth = "required",
    description: str | None = None,
) -> Callable[[H], H]:
    """Declare a handler's contract: `body` is a JSON request model, `form` a multipart one, `query` the query
    string; `responses` maps success statuses to models (or `Media`); `errors` lists the error statuses it may
    answer with. 401 (when `auth` is required), 413 (with a body) and 500 are added by the document itself."""
    operation = Operation(
        summary=summary,
        tags=(tags,) if isinstance(tags, str) else tags,
        responses=responses,
        errors=errors,
        body=body,
        form=form,
        query=query,
        headers=headers or {},
        path_params=path_params or {},
        auth=auth,
        description=description,
    )

    def mark(handler: H) -> H:
        setattr(handler, OPERATION_ATTR, operation)
        return handler

    return mark


def operation_of(route: web.AbstractRoute) -> Operation | None:
    found: Operation | None = getattr(route.handler, OPERATION_ATTR, None)
    return found


def documented_routes(app: web.Application) -> list[tuple[str, str, Operation]]:
    """(method, path, operation) for every routed handler carrying `@api`; HEAD twins of GETs are left out."""
    found = []
    for route in app.router.routes():
        operation = operation_of(route)
        if operation is not None and route.method != "HEAD" and route.resource is not None:
            found.append((route.method.lower(), route.resource.canonical, operation))
    return found


class _Components:
    """Collects every model the operations name, then resolves them into one `components.schemas`."""

    def __init__(self) -> None:
        self.wanted: list[tuple[type[BaseModel], JsonSchemaMode]] = [(ErrorResponse, "serialization")]

    def ref(self, model: type[BaseModel], mode: JsonSchemaMode) -> tuple[type[BaseModel], JsonSchemaMode]:
        if (model, mode) not in self.wanted:
            self.wanted.append((model, mode))
        return model, mode

    def resolve(self) -> tuple[Mapping[Any, Any], dict[str, Any]]:
        """The `$ref` of each wanted (model, mode), and the schemas they point into."""
        refs, schema = models_json_schema(self.wanted, ref_template=REF_TEMPLATE)
        return refs, schema.get("$defs", {})


def _content(body: Body | tuple[Body, ...], components: _Components, mode: JsonSchemaMode) -> dict[str, Any]:
    content: dict[str, Any] = {}
    for one in body if isinstance(body, tuple) else (body,):
        if isinstance(one, Media):
            content.update({t: {"schema": dict(one.schema)} for t in one.types})
        else:
            content["application/json"] = {"schema": components.ref(one, mode)}
    return content


def _query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    schema = model.model_json_schema(ref_template=REF_TEMPLATE)
    required = set(schema.get("required", ()))
    return [
        {"name": name, "in": "query", "required": name in required, "schema": prop}
        for name, prop in schema.get("properties", {}).items()
    ]


def _operation_doc(method: str, path: str, op: Operation, components: _Components) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "operationId": method
        + "_"
        + "_".join(p.strip("{}") for p in path.strip("/").split("/")).replace("-", "_"),
        "summary": op.summary,
        "tags": list(op.tags),
    }
    if op.description:
        doc["description"] = op.description
    params = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": {"type": "string"},
            **({"description": op.path_params[name]} if name in op.path_params else {}),
        }
        for name in _path_names(path)
    ]
    params += [
        {"name": name, "in": "header", "required": False, "schema": {"type": "string"}, "description": text}
        for name, text in op.headers.items()
    ]
    if op.query is not None:
        params += _query_parameters(op.query)
    if params:
        doc["parameters"] = params
    if op.body is not None:
        doc["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": components.ref(op.body, "validation")}},
        }
    elif op.form is not None:
        doc["requestBody"] = {
            "required": True,
            "content": {"multipart/form-data": {"schema": components.ref(op.form, "validation")}},
        }
    responses: dict[str, Any] = {
        str(status): {
            "description": http.HTTPStatus(status).phrase,
            "content": _content(body, components, "serialization"),
        }
        for status, body in op.responses.items()
    }
    errors = set(op.errors) | {500}
    if op.auth == "required":
        errors.add(401)
    if op.body is not None or op.form is not None:
        errors.add(413)
    for status in sorted(errors):
        responses[str(status)] = {
            "description": http.HTTPStatus(status).phrase,
            "content": {"application/json": {"schema": components.ref(ErrorResponse, "serialization")}},
        }
    doc["responses"] = responses
    doc["security"] = {"required": [{"bearerAuth": []}], "optional": [{}, {"bearerAuth": []}], "none": []}[
        op.auth
    ]
    return doc


def _path_names(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{") and part.endswith("}")]


def _replace_refs(node: Any, refs: Mapping[Any, Any]) -> Any:
    """Swap the (model, mode) placeholders left by `_Components.ref` for the `$ref`s pydantic chose."""
    if isinstance(node, tuple) and node in refs:
        return refs[node]
    if isinstance(node, dict):
        return {k: _replace_refs(v, refs) for k, v in node.items()}
    if isinstance(node, list):
        return [_replace_refs(v, refs) for v in node]
    return node


def build_document(app: web.Application) -> dict[str, Any]:
    """The whole OpenAPI 3.1 document for the routes of `app`."""
    components = _Components()
    paths: dict[str, dict[str, Any]] = {}
    for method, path, op in documented_routes(app):
        paths.setdefault(path, {})[method] = _operation_doc(method, path, op, components)
    refs, schemas = components.resolve()
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "imagegw",
            "version": _package_version(),
            "description": "OpenAI-compatible image generation with queued jobs and live progress. "
            'Errors always have the shape `{"error": {message, type, param, code}}`. '
            "Live progress: Socket.IO namespace `/image-progress` (see the README).",
        },
        "paths": _replace_refs(paths, refs),
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key from the gateway's config file.",
                }
            },
        },
    }


def _package_version() -> str:
    try:
        return version("imagegw")
    except PackageNotFoundError:
        return "0.0.0"
