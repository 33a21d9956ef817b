"""`GET /v1/models`: the public models and what each can do."""

from __future__ import annotations

from aiohttp import web

from service.errors import NotFound
from service.models import CAPABILITIES, PROVIDER_CAPABILITIES
from service.openapi import api
from service.routes.responses import model_response
from service.schemas import ModelCard, ModelList
from service.settings import GatewayConfig
from service.state import CONFIG

STARTED = 1_700_000_000  # OpenAI's `created`; our models have no meaningful date


def card(config: GatewayConfig, name: str) -> ModelCard:
    model = config.models[name]
    types = {config.providers[d.provider].type for d in model.deployments}
    able = set().union(*(PROVIDER_CAPABILITIES.get(t, frozenset()) for t in types))
    return ModelCard(id=name, created=STARTED, owned_by="imagegw:" + ",".join(sorted(types)),
                     capabilities={c: c in able for c in CAPABILITIES})


@api("List the models", tags="Models", responses={200: ModelList})
async def list_models(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    return model_response(ModelList(data=[card(config, name) for name in config.models]))


@api("Describe one model", tags="Models", responses={200: ModelCard}, errors=(404,))
async def get_model(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    name = request.match_info["model"]
    if name not in config.models:
        raise NotFound(f"The model '{name}' does not exist.", param="model", code="model_not_found")
    return model_response(card(config, name))


def setup(app: web.Application) -> None:
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)
