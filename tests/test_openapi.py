"""The OpenAPI document against the running gateway: schemathesis finds no 5xx, no off-schema answer."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.routes.static import STATIC_DIR
from service.settings import GatewayConfig
from tests.conftest import GatewayFactory

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
KEY = "sk-openapi-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
# the pages, the files they load and Socket.IO's transport are not part of the HTTP API
UNDOCUMENTED = ("/playground", "/docs", "/openapi.json", "/static", "/socket.io/")


def contract_config() -> GatewayConfig:
    """Small images only, so generated requests that do succeed stay fast."""
    return GatewayConfig.model_validate(
        {
            "default_model": "small",
            "providers": {"local": {"type": "local", "options": {"steps": 1}}},
            "models": {
                "small": {"family": "dall-e-2", "deployments": [{"provider": "local"}]},
                "free": {"family": "generic", "deployments": [{"provider": "local"}]},
            },
            "keys": [{"name": "tester", "key": KEY}],
        }
    )


async def fetch_document(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(url + "/openapi.json") as resp:
        assert resp.status == 200 and resp.content_type == "application/json"
        doc: dict[str, Any] = await resp.json()
        return doc


async def test_document_lists_every_api_route_with_its_models(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(config=contract_config())
    doc = await fetch_document(gw.url)
    assert doc["openapi"] == "3.1.0"
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    routed = {
        (r.resource.canonical, r.method.lower())
        for r in gw.app.router.routes()
        if r.method != "HEAD" and r.resource is not None
    }
    missing = {(p, m) for p, m in routed - documented if not p.startswith(UNDOCUMENTED)}
    assert not missing, f"routes without @api(...): {sorted(missing)}"
    generate = doc["paths"]["/v1/images/generations"]["post"]
    assert generate["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ImageGenerationRequest"
    }
    assert set(generate["responses"]) >= {"200", "202", "400", "401", "404", "413", "500", "502", "504"}
    request_schema = doc["components"]["schemas"]["ImageGenerationRequest"]
    assert request_schema["required"] == ["prompt"] and request_schema["additionalProperties"] is False
    assert doc["components"]["schemas"]["ErrorResponse"]["required"] == ["error"]
    assert doc["paths"]["/healthz"]["get"]["security"] == []
    files = doc["paths"]["/v1/files/{job_id}/{file}"]["get"]
    assert set(files["responses"]["200"]["content"]) == {"image/png", "image/jpeg", "image/webp"}
    assert {p["name"] for p in files["parameters"]} == {"job_id", "file", "expires", "signature"}


async def test_docs_page_and_renderer_are_served(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(config=contract_config())
    async with aiohttp.ClientSession() as session:
        async with session.get(gw.url + "/docs") as resp:
            assert resp.status == 200 and resp.content_type == "text/html"
            assert "swagger-ui-bundle.js" in await resp.text()
        async with session.get(gw.url + "/static/vendor/swagger-ui/swagger-ui-bundle.js") as resp:
            assert resp.status == 200
            assert await resp.read() == (STATIC_DIR / "vendor/swagger-ui/swagger-ui-bundle.js").read_bytes()


def operation_has_inputs(operation: schemathesis.APIOperation) -> bool:
    return bool(operation.definition.raw.get("parameters") or operation.definition.raw.get("requestBody"))


def run_cases(doc: dict[str, Any], base_url: str, examples: int) -> list[str]:
    """Every operation, positive and negative data; returns the labels of the operations exercised."""
    schema = schemathesis.openapi.from_dict(doc)
    seen = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            def check(case: schemathesis.Case) -> None:
                case.call_and_validate(base_url=base_url, headers=AUTH, checks=CHECKS, timeout=30)

            try:
                check()
            except Unsatisfiable:
                # nothing can be made invalid in an operation without parameters or body (GET /healthz)
                assert mode is schemathesis.GenerationMode.NEGATIVE and not operation_has_inputs(operation)
        seen.append(operation.label)
    return seen


async def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory(config=contract_config())
    doc = await fetch_document(gw.url)
    seen = await asyncio.to_thread(run_cases, doc, gw.url, 12)
    assert "POST /v1/images/generations" in seen and "GET /v1/files/{job_id}/{file}" in seen


def run_known_flow(doc: dict[str, Any], base_url: str) -> None:
    """A real generation, its job and its file, each answer validated against the document."""
    schema = schemathesis.openapi.from_dict(doc)
    generate = schema["/v1/images/generations"]["POST"]
    sync = generate.Case(body={"prompt": "a red kite", "size": "256x256", "n": 2, "response_format": "url"})
    result = sync.call_and_validate(base_url=base_url, headers=AUTH, checks=CHECKS)
    assert result.status_code == 200 and len(result.json()["data"]) == 2
    queued = generate.Case(
        body={"prompt": "a blue kite", "model": "free", "size": "64x64"}, headers={"Prefer": "respond-async"}
    )
    accepted = queued.call_and_validate(base_url=base_url, headers=AUTH, checks=CHECKS)
    assert accepted.status_code == 202
    job_id = accepted.json()["id"]
    get_job = schema["/v1/images/jobs/{job_id}"]["GET"].Case(path_parameters={"job_id": job_id})
    for _ in range(100):
        job = get_job.call_and_validate(base_url=base_url, headers=AUTH, checks=CHECKS).json()
        if job["status"] == "succeeded":
            break
    assert job["status"] == "succeeded" and job["result"]["data"][0]["b64_json"]
    cancel = schema["/v1/images/jobs/{job_id}"]["DELETE"].Case(path_parameters={"job_id": job_id})
    assert cancel.call_and_validate(base_url=base_url, headers=AUTH, checks=CHECKS).status_code == 409
    url = result.json()["data"][0]["url"]
    job_part, file_part = url.split("/v1/files/")[1].split("?")[0].split("/")
    download = schema["/v1/files/{job_id}/{file}"]["GET"].Case(
        path_parameters={"job_id": job_part, "file": file_part}
    )
    image = download.call_and_validate(base_url=base_url, headers=AUTH, checks=CHECKS)
    assert image.status_code == 200 and image.headers["content-type"] == ["image/png"]
    anonymous = download.call_and_validate(base_url=base_url, checks=CHECKS)
    assert anonymous.status_code == 401


async def test_a_real_flow_conforms_to_the_document(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(config=contract_config())
    doc = await fetch_document(gw.url)
    await asyncio.to_thread(run_known_flow, doc, gw.url)


async def test_a_document_that_drifted_from_the_server_is_caught(gateway_factory: GatewayFactory) -> None:
    """The check can fail: the same run against a document demanding a field the server never sends."""
    gw = await gateway_factory(config=contract_config())
    doc = await fetch_document(gw.url)
    doc["paths"] = {"/v1/models": doc["paths"]["/v1/models"]}
    doc["components"]["schemas"]["ModelCard"]["required"].append("owner_email")
    with pytest.raises(FailureGroup, match="Response violates schema"):
        await asyncio.to_thread(run_cases, doc, gw.url, 2)
