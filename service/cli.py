"""`imagegw` entry points: serve, worker, check-config, keys, generate."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import socket
import sys
import time
from functools import partial
from typing import get_args

from aiohttp import web
from pydantic import ValidationError

from service.auth import KeyRing
from service.client import add_generate_command, run_generate
from service.connections import RedisFactory
from service.heap import settle_heap
from service.keys import KeyFields, KeyStore
from service.logs import configure_logging
from service.settings import DEFAULT_CAPABILITIES, Capability, ConfigError, KeyLimits, Settings, load_config

log = logging.getLogger("imagegw")


def is_loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback
                   for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP))
    except (OSError, ValueError):
        return False


def serve(settings: Settings) -> int:
    from service.app import create_app

    config = load_config(settings.config)
    if KeyRing(config.keys, settings.admin_token).dev_mode_possible:
        if not is_loopback(settings.host):
            log.error("no API keys and no admin token are configured: refusing to listen on %s; declare "
                      "keys in the config file, set IMAGEGW_ADMIN_TOKEN, or bind to a loopback address",
                      settings.host)
            return 2
        log.warning("DEV MODE: no API keys configured, every request is accepted (loopback %s only) until a "
                    "key is created with `imagegw keys create`", settings.host)
    mode = "embedded (in-memory Redis, in-process worker)" if settings.embedded else f"Redis {settings.redis_url}"
    log.info("imagegw serving on http://%s:%d, %s", settings.host, settings.port, mode)
    # aiohttp reads a shutdown timeout of 0 as "no limit": a grace of 0 must mean "do not wait"
    grace = settings.worker_grace or 0.001
    app = create_app(settings, config)
    app.on_startup.append(settle_heap_after_startup)  # runs after the app's own start-up (its cleanup contexts)
    web.run_app(app, host=settings.host, port=settings.port, print=None, access_log=None, shutdown_timeout=grace,
                loop=new_event_loop(settings))
    return 0


async def settle_heap_after_startup(app: web.Application) -> None:
    settle_heap()


def worker(settings: Settings) -> int:
    from workers.worker import serve_worker

    if settings.embedded:
        log.error("imagegw worker needs IMAGEGW_REDIS_URL; in embedded mode `imagegw serve` runs the worker itself")
        return 2
    with asyncio.Runner(loop_factory=partial(new_event_loop, settings)) as runner:
        runner.run(serve_worker(settings))
    return 0


def new_event_loop(settings: Settings) -> asyncio.AbstractEventLoop:
    """uvloop's (about a tenth less CPU per job here), unless turned off or not installed (no Windows build)."""
    if settings.uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def check_config(settings: Settings) -> int:
    """Report every problem of the config file, its workflow templates and the storage settings; 2 on errors."""
    from service.config_check import check

    config, findings = asyncio.run(check(settings))
    for finding in findings:
        print(finding.render(settings.config), file=sys.stderr)
    errors = sum(f.level == "error" for f in findings)
    if config is None or errors:
        print(f"imagegw check-config: {errors} error(s)", file=sys.stderr)
        return 2
    print(f"{settings.config or 'built-in config'}: OK, {len(config.models)} models, "
          f"{len(config.providers)} providers, {len(config.keys)} keys")
    return 0


def keys(settings: Settings, args: argparse.Namespace) -> int:
    """`imagegw keys create|list|revoke`: the Redis key records, straight from the command line."""
    if settings.embedded:
        log.error("imagegw keys needs IMAGEGW_REDIS_URL (embedded mode keeps keys in memory: /admin/keys)")
        return 2
    fields = None
    if args.action == "create":
        try:
            fields = key_fields(args)
        except ValidationError as exc:
            print(f"imagegw keys create: {exc}", file=sys.stderr)
            return 2
    return asyncio.run(run_keys(settings, args, fields))


def key_fields(args: argparse.Namespace) -> KeyFields:
    limits = KeyLimits(**{name: getattr(args, name) for name in KeyLimits.model_fields})
    expires_at = time.time() + args.expires_in if args.expires_in is not None else None
    return KeyFields(name=args.name, owner=args.owner, models=args.models,
                     capabilities=args.capabilities or list(DEFAULT_CAPABILITIES), limits=limits,
                     image_budget=args.image_budget, webhook_url=args.webhook_url, expires_at=expires_at)


async def run_keys(settings: Settings, args: argparse.Namespace, fields: KeyFields | None) -> int:
    redis = RedisFactory(settings)()
    try:
        store = KeyStore(redis)
        if fields is not None:
            key, secret = await store.create(fields)
            print(json.dumps({"key": secret, **key.model_dump(mode="json")}, indent=2))
            print("Store the key now: it is not kept and cannot be shown again.", file=sys.stderr)
            return 0
        if args.action == "list":
            found = await store.list()
            if args.json:
                listed = [k.model_dump(mode="json", exclude={"webhook_secret"}) for k in found]
                print(json.dumps(listed, indent=2))
                return 0
            for key in found:
                state = "disabled" if not key.enabled else "expired" if key.expired() else "enabled"
                owner = f"  ({key.owner})" if key.owner else ""
                print(f"{key.id}  {key.prefix}...  {state:8}  {key.name}{owner}")
            return 0
        if not await store.delete(args.key_id):
            print(f"imagegw keys revoke: no key with id {args.key_id!r}", file=sys.stderr)
            return 1
        print(f"revoked {args.key_id}")
        return 0
    finally:
        await redis.aclose()


def add_keys_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys_cmd = commands.add_parser("keys", help="create, list and revoke the API keys kept in Redis "
                                                "(needs IMAGEGW_REDIS_URL)")
    actions = keys_cmd.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a key and print it: the only time it is shown")
    create.add_argument("--name", required=True)
    create.add_argument("--owner", help="who the key is for")
    create.add_argument("--model", dest="models", action="append", help="a model the key may use (repeat); "
                                                                        "default: all")
    create.add_argument("--capability", dest="capabilities", action="append", choices=get_args(Capability),
                        help="repeat for several; default: generate, edit, stream")
    for limit in KeyLimits.model_fields:
        create.add_argument("--" + limit.replace("_", "-"), type=int, help="default: unlimited")
    create.add_argument("--image-budget", type=int, help="images the key may create in all; default: no cap")
    create.add_argument("--webhook-url", help="default completion webhook of the key's jobs")
    create.add_argument("--expires-in", type=float, help="seconds until the key stops working; default never")
    listing = actions.add_parser("list", help="list the keys (never their secrets)")
    listing.add_argument("--json", action="store_true", help="as JSON")
    revoke = actions.add_parser("revoke", help="delete a key: it stops working at once")
    revoke.add_argument("key_id")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imagegw", description="OpenAI-compatible image-generation gateway")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run the HTTP front end (and, in embedded mode, a worker)")
    serve_cmd.add_argument("--host", help="default 127.0.0.1 (IMAGEGW_HOST)")
    serve_cmd.add_argument("--port", type=int, help="default 8080 (IMAGEGW_PORT)")
    commands.add_parser("worker", help="run a queue worker (needs IMAGEGW_REDIS_URL)")
    commands.add_parser("check-config", help="validate the config file, its workflow templates and the storage "
                                             "settings; exit status 2 on any error")
    add_generate_command(commands)
    add_keys_command(commands)
    args = parser.parse_args(argv)

    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    if args.command == "serve":
        settings = settings.model_copy(update={k: v for k, v in (("host", args.host), ("port", args.port)) if v})
    try:
        if args.command == "serve":
            return serve(settings)
        if args.command == "worker":
            return worker(settings)
        if args.command == "generate":
            return run_generate(args)
        if args.command == "keys":
            return keys(settings, args)
        return check_config(settings)
    except (ConfigError, ValueError) as exc:
        print(f"imagegw: configuration error:\n{exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
