"""`/admin/keys`: create, list, read, change and revoke the API keys kept in Redis. Needs the admin token
(`IMAGEGW_ADMIN_TOKEN`) or a key with the `admin` capability. Keys of the config file are not listed here:
the file is where they are managed."""

from __future__ import annotations

from aiohttp import web
from pydantic import ValidationError

from service.auth import Principal, owner_of
from service.constants import BUDGET_USED
from service.errors import InvalidRequest, NotFound, PermissionDenied
from service.fetch import AddressPolicy
from service.keys import ApiKey, CreatedKey, DeletedKey, KeyFields, KeyList, KeyStore, KeyUpdate, KeyView
from service.openapi import api
from service.routes.responses import model_response
from service.schemas import parse_body, validation_error
from service.settings import GatewayConfig
from service.state import CONFIG, KEYS, REDIS, SETTINGS, principal
from service.webhooks import check_webhook_url

KEY_ID = {"key_id": "The key's id (`key_...`), from its creation or the list."}


def require_admin(request: web.Request) -> Principal:
    caller = principal(request)
    if not caller.admin:
        raise PermissionDenied("This endpoint needs the admin token or a key with the 'admin' capability.",
                               code="admin_required")
    return caller


def key_store(request: web.Request) -> KeyStore:
    store = request.app[KEYS].store
    assert store is not None, "the key store is attached when Redis opens"
    return store


def check_fields(request: web.Request, models: list[str] | None, webhook_url: str | None) -> None:
    config: GatewayConfig = request.app[CONFIG]
    for model in models or ():
        if model not in config.models:
            raise InvalidRequest(f"Invalid 'models': the model '{model}' does not exist.", param="models",
                                 code="model_not_found")
    if webhook_url is not None:
        check_webhook_url(webhook_url, AddressPolicy(list(request.app[SETTINGS].fetch_allowed_networks)))


async def view(request: web.Request, key: ApiKey) -> KeyView:
    used = await request.app[REDIS].get(BUDGET_USED.format(owner_of(key.id)))
    return KeyView(**key.model_dump(), images_used=int(used or 0))


def key_not_found(key_id: str) -> NotFound:
    return NotFound(f"No API key found with id '{key_id}'.", param="key_id", code="key_not_found")


async def found(request: web.Request) -> ApiKey:
    key = await key_store(request).get(request.match_info["key_id"])
    if key is None:
        raise key_not_found(request.match_info["key_id"])
    return key


@api("Create an API key (its secret is shown only in this answer)", tags="Admin", responses={201: CreatedKey},
     errors=(400, 403), body=KeyFields)
async def create_key(request: web.Request) -> web.Response:
    require_admin(request)
    fields = parse_body(KeyFields, await request.read())
    check_fields(request, fields.models, fields.webhook_url)
    key, secret = await key_store(request).create(fields)
    return model_response(CreatedKey(**(await view(request, key)).model_dump(), key=secret), status=201)


@api("List the API keys kept in Redis", tags="Admin", responses={200: KeyList}, errors=(403,))
async def list_keys(request: web.Request) -> web.Response:
    require_admin(request)
    return model_response(KeyList(data=[await view(request, key) for key in await key_store(request).list()]))


@api("Read an API key", tags="Admin", responses={200: KeyView}, errors=(403, 404), path_params=KEY_ID)
async def get_key(request: web.Request) -> web.Response:
    require_admin(request)
    return model_response(await view(request, await found(request)))


@api("Change an API key: only the fields sent change", tags="Admin", responses={200: KeyView},
     errors=(400, 403, 404), body=KeyUpdate, path_params=KEY_ID)
async def update_key(request: web.Request) -> web.Response:
    require_admin(request)
    update = parse_body(KeyUpdate, await request.read())
    check_fields(request, update.models, update.webhook_url)
    key_id = request.match_info["key_id"]
    try:
        key = await key_store(request).update(key_id, update)
    except ValidationError as exc:  # the merged key is invalid, e.g. after "name": null
        raise validation_error(exc) from None
    if key is None:
        raise key_not_found(key_id)
    return model_response(await view(request, key))


@api("Revoke (delete) an API key: it stops working at once", tags="Admin", responses={200: DeletedKey},
     errors=(403, 404), path_params=KEY_ID)
async def delete_key(request: web.Request) -> web.Response:
    require_admin(request)
    key_id = request.match_info["key_id"]
    if not await key_store(request).delete(key_id):
        raise key_not_found(key_id)
    return model_response(DeletedKey(id=key_id))


def setup(app: web.Application) -> None:
    app.router.add_post("/admin/keys", create_key)
    app.router.add_get("/admin/keys", list_keys)
    app.router.add_get("/admin/keys/{key_id}", get_key)
    app.router.add_patch("/admin/keys/{key_id}", update_key)
    app.router.add_delete("/admin/keys/{key_id}", delete_key)
