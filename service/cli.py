"""`imagegw` entry points: serve, worker, check-config, generate."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import socket
import sys

from aiohttp import web

from service.auth import KeyRing
from service.client import add_generate_command, run_generate
from service.settings import ConfigError, Settings, load_config

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
    if KeyRing(config.keys).dev_mode:
        if not is_loopback(settings.host):
            log.error("no API keys are configured: refusing to listen on %s; declare keys in the config file "
                      "or bind to a loopback address", settings.host)
            return 2
        log.warning("DEV MODE: no API keys configured, every request is accepted (loopback %s only)", settings.host)
    mode = "embedded (in-memory Redis, in-process worker)" if settings.embedded else f"Redis {settings.redis_url}"
    log.info("imagegw serving on http://%s:%d, %s", settings.host, settings.port, mode)
    web.run_app(create_app(settings, config), host=settings.host, port=settings.port, print=None,
                access_log=None, shutdown_timeout=settings.worker_grace)
    return 0


def worker(settings: Settings) -> int:
    from workers.worker import serve_worker

    if settings.embedded:
        log.error("imagegw worker needs IMAGEGW_REDIS_URL; in embedded mode `imagegw serve` runs the worker itself")
        return 2
    asyncio.run(serve_worker(settings))
    return 0


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
    args = parser.parse_args(argv)

    settings = Settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        settings = settings.model_copy(update={k: v for k, v in (("host", args.host), ("port", args.port)) if v})
    try:
        if args.command == "serve":
            return serve(settings)
        if args.command == "worker":
            return worker(settings)
        if args.command == "generate":
            return run_generate(args)
        return check_config(settings)
    except (ConfigError, ValueError) as exc:
        print(f"imagegw: configuration error:\n{exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
