"""Typed keys for what the application holds, shared by the factory and the handlers."""

from __future__ import annotations

import socketio
from aiohttp import web
from arq.connections import ArqRedis

from service.auth import KeyRing, Principal
from service.connections import RedisFactory
from service.dispatch import Dispatcher
from service.fetch import UrlFetcher
from service.jobs import JobStore
from service.metrics import Metrics
from service.progress import ProgressHub
from service.settings import GatewayConfig, Settings
from service.storage import Storage

SETTINGS = web.AppKey("settings", Settings)
CONFIG = web.AppKey("config", GatewayConfig)
KEYS = web.AppKey("keys", KeyRing)
REDIS_FACTORY = web.AppKey("redis_factory", RedisFactory)
REDIS = web.AppKey("redis", ArqRedis)
STORAGE = web.AppKey("storage", Storage)
STORE = web.AppKey("store", JobStore)
HUB = web.AppKey("hub", ProgressHub)
SIO = web.AppKey("sio", socketio.AsyncServer)
DISPATCHER = web.AppKey("dispatcher", Dispatcher)
FETCHER = web.AppKey("fetcher", UrlFetcher)

METRICS = web.AppKey("metrics", Metrics)

PRINCIPAL = web.RequestKey("principal", Principal)  # set by the auth middleware
REQUEST_ID_KEY = web.RequestKey("request_id", str)  # set by the observe middleware


def principal(request: web.Request) -> Principal:
    found: Principal = request[PRINCIPAL]
    return found
