"""Completion webhooks: which URLs are allowed, how a delivery is signed, and one delivery attempt.

A delivery is `POST <url>` with the job object as JSON (results as signed URLs, never inline images) and

    X-Imagegw-Timestamp: <unix seconds>
    X-Imagegw-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>." + body)>

The secret is the job's key's `webhook_secret` (shown when the key is created), or `IMAGEGW_WEBHOOK_SECRET`
for config-file keys. Receivers should recompute the signature over the raw body and refuse stale timestamps.
URLs follow the rules of image URL fetching (service/fetch.py): http(s) only, and no loopback, private or
reserved address unless `fetch_allowed_networks` allows it, checked on the very addresses connected to.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import time

import aiohttp
from arq.connections import ArqRedis
from yarl import URL

from service.auth import REDIS_KEY_ID, Principal, key_id_of
from service.errors import InvalidRequest
from service.fetch import AddressPolicy, ForbiddenAddress, GuardedResolver
from service.keys import KeyStore
from service.schemas import WebhookAttempt
from service.settings import Settings

TIMESTAMP_HEADER = "X-Imagegw-Timestamp"
SIGNATURE_HEADER = "X-Imagegw-Signature"
EVENT_HEADER = "X-Imagegw-Event"
MAX_BACKOFF = 300.0


def signature(secret: str, timestamp: str, body: bytes) -> str:
    return "v1=" + hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def backoff(settings: Settings, attempts: int) -> float:
    """Seconds before the next attempt after `attempts` failed ones."""
    return float(min(MAX_BACKOFF, settings.webhook_backoff * 2 ** (attempts - 1)))


def check_webhook_url(url: str, policy: AddressPolicy) -> None:
    """Before accepting a URL: http(s), and not an address literal the policy forbids. Host names are checked
    when a delivery connects (the resolver refuses forbidden addresses)."""
    try:
        target = URL(url)
    except ValueError:
        target = None
    if target is None or target.scheme not in ("http", "https") or not target.host:
        raise InvalidRequest("Invalid 'webhook_url': an http or https URL is needed.", param="webhook_url",
                             code="invalid_webhook_url")
    try:
        address = ipaddress.ip_address(target.host)
    except ValueError:
        address = None
    if address is not None and not policy.permits(address):
        raise InvalidRequest(f"Invalid 'webhook_url': {target.host} is a private or reserved address.",
                             param="webhook_url", code="webhook_url_forbidden")


def check_webhook(url: str, policy: AddressPolicy, principal: Principal) -> None:
    """At submission: a usable URL, and a secret to sign the caller's webhooks with."""
    check_webhook_url(url, policy)
    if principal.webhook_secret is None:
        raise InvalidRequest("Webhooks are not enabled for this API key: the gateway has no webhook secret "
                             "for it (IMAGEGW_WEBHOOK_SECRET).", param="webhook_url",
                             code="webhooks_not_enabled")


async def signing_secret(redis: ArqRedis, settings: Settings, owner: str) -> str | None:
    """The secret for a job owner's webhooks; None when its key is gone (its receiver's secret with it)."""
    key_id = key_id_of(owner)
    if REDIS_KEY_ID.match(key_id):
        key = await KeyStore(redis).get(key_id)
        return key.webhook_secret if key is not None else None
    return settings.webhook_secret.get_secret_value() if settings.webhook_secret else None


class WebhookSender:
    """The HTTP session webhooks go out on: guarded resolver, no redirects, no proxies from the environment"""

    def __init__(self, settings: Settings) -> None:
        self.policy = AddressPolicy(list(settings.fetch_allowed_networks))
        self.timeout = settings.webhook_timeout
        self.session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(self.policy), use_dns_cache=False, limit=50)
        self.session = aiohttp.ClientSession(connector=connector, trust_env=False,
                                             headers={"User-Agent": "imagegw-webhooks"})

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def post(self, url: str, body: bytes, secret: str, event: str) -> WebhookAttempt:
        """One signed attempt: a 2xx answer is a delivery; anything else (or no answer) says why not."""
        assert self.session is not None, "WebhookSender.open() was not called"
        now = time.time()
        timestamp = str(int(now))
        headers = {"Content-Type": "application/json", TIMESTAMP_HEADER: timestamp, EVENT_HEADER: event,
                   SIGNATURE_HEADER: signature(secret, timestamp, body)}
        target = URL(url)
        try:
            address = ipaddress.ip_address(target.host or "")
        except ValueError:
            address = None
        if address is not None and not self.policy.permits(address):
            return WebhookAttempt(at=now, error=f"forbidden address {target.host}")
        try:
            async with self.session.post(target, data=body, headers=headers, allow_redirects=False,
                                         timeout=aiohttp.ClientTimeout(total=self.timeout)) as response:
                await response.read()
                ok = 200 <= response.status < 300
                return WebhookAttempt(at=now, status=response.status,
                                      error=None if ok else "not a 2xx answer")
        except ForbiddenAddress as exc:
            return WebhookAttempt(at=now, error=f"forbidden address: {exc}")
        except TimeoutError:
            return WebhookAttempt(at=now, error=f"no answer within {self.timeout:g} s")
        except aiohttp.ClientError as exc:
            return WebhookAttempt(at=now, error=f"connection failed ({type(exc).__name__})")
