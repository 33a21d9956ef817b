"""Downloading image URLs that clients give us, without letting them reach what only the gateway can reach.

Every hop (the URL and each redirect, followed by hand) is checked: http(s) only, and no loopback, private,
link-local, multicast, reserved or metadata address unless `fetch_allowed_networks` says so. Names are checked
inside the connector's resolver, so the addresses checked are the very addresses connected to: there is no
window for DNS rebinding between the check and the connection. Size and time are capped.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from service.errors import InvalidRequest
from service.settings import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

REDIRECTS = frozenset({301, 302, 303, 307, 308})
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # embeds an IPv4 address in its last 32 bits


class ForbiddenAddress(Exception):
    """A URL's host is, or resolves to, an address the gateway must not connect to for a client."""

    def __init__(self, host: str, address: str) -> None:
        super().__init__(f"{host} resolves to {address}" if host != address else address)
        self.host = host
        self.address = address


class AddressPolicy:
    """Which addresses image URLs may reach: the public internet, plus the allow-listed networks."""

    def __init__(self, allowed: list[IPNetwork]) -> None:
        self.allowed = allowed

    def permits(self, address: IPAddress) -> bool:
        if any(address.version == net.version and address in net for net in self.allowed):
            return True
        return not forbidden(address)


def forbidden(address: IPAddress) -> bool:
    """Not a public unicast address, also when hidden in an IPv6 form (mapped, 6to4, Teredo, NAT64)."""
    if isinstance(address, ipaddress.IPv6Address):
        if address in NAT64:  # a translator reaches the embedded IPv4 address: judge that one
            return forbidden(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        embedded = [address.ipv4_mapped, address.sixtofour, address.teredo[1] if address.teredo else None]
        if any(inner is not None and forbidden(inner) for inner in embedded):
            return True
    return (not address.is_global or address.is_private or address.is_loopback or address.is_link_local
            or address.is_multicast or address.is_reserved or address.is_unspecified)


class GuardedResolver(AbstractResolver):
    """The connector's resolver: refuses a name if any of its addresses is forbidden."""

    def __init__(self, policy: AddressPolicy) -> None:
        self.policy = policy
        self.inner = DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        results = await self.inner.resolve(host, port, family)
        for result in results:
            if not self.policy.permits(ipaddress.ip_address(result["host"])):
                raise ForbiddenAddress(host, result["host"])
        return results

    async def close(self) -> None:
        await self.inner.close()


class UrlFetcher:
    """One HTTP session for client-given URLs, separate from the workers' session to upstreams."""

    def __init__(self, settings: Settings) -> None:
        self.policy = AddressPolicy(list(settings.fetch_allowed_networks))
        self.timeout = settings.fetch_timeout
        self.max_bytes = settings.max_input_image_bytes
        self.max_redirects = settings.fetch_max_redirects
        self.session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        # no DNS cache: every connection goes through the resolver's check; no proxies from the environment
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(self.policy), use_dns_cache=False, limit=50)
        self.session = aiohttp.ClientSession(connector=connector, trust_env=False,
                                             headers={"User-Agent": "imagegw", "Accept": "image/*"})

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    def check_url(self, url: URL, field: str) -> None:
        """Before connecting: the scheme, and the host when it is an address literal (the resolver never sees
        those)."""
        if url.scheme not in ("http", "https") or not url.host:
            raise InvalidRequest(f"Invalid '{field}': only http and https URLs can be fetched.", param=field,
                                 code="invalid_image_url")
        try:
            address = ipaddress.ip_address(url.host)
        except ValueError:
            return
        if not self.policy.permits(address):
            raise _refused(field, ForbiddenAddress(url.host, url.host))

    async def fetch(self, url: str, field: str) -> bytes:
        """The body of `url`, after at most `max_redirects` checked redirects; failing is a 400 on `field`."""
        assert self.session is not None, "UrlFetcher.open() was not called"
        try:
            target = URL(url)
        except ValueError:
            raise InvalidRequest(f"Invalid '{field}': not a valid URL.", param=field,
                                 code="invalid_image_url") from None
        try:
            async with asyncio.timeout(self.timeout):
                for _ in range(self.max_redirects + 1):
                    self.check_url(target, field)
                    async with self.session.get(target, allow_redirects=False) as response:
                        if response.status in REDIRECTS and "Location" in response.headers:
                            target = target.join(URL(response.headers["Location"]))
                            continue
                        if response.status != 200:
                            raise InvalidRequest(f"Invalid '{field}': fetching the URL answered HTTP "
                                                 f"{response.status}.", param=field, code="image_url_failed")
                        return await self._read(response, field)
        except ForbiddenAddress as exc:
            raise _refused(field, exc) from None
        except TimeoutError:
            raise InvalidRequest(f"Invalid '{field}': fetching the URL took longer than {self.timeout:g} s.",
                                 param=field, code="image_url_timeout") from None
        except aiohttp.ClientError as exc:
            raise InvalidRequest(f"Invalid '{field}': the URL could not be fetched ({type(exc).__name__}).",
                                 param=field, code="image_url_failed") from None
        raise InvalidRequest(f"Invalid '{field}': more than {self.max_redirects} redirects.", param=field,
                             code="image_url_failed")

    async def _read(self, response: aiohttp.ClientResponse, field: str) -> bytes:
        if response.content_length is not None and response.content_length > self.max_bytes:
            raise too_large(field, self.max_bytes)
        data = bytearray()
        async for chunk in response.content.iter_chunked(64 * 1024):
            data += chunk
            if len(data) > self.max_bytes:
                raise too_large(field, self.max_bytes)
        return bytes(data)


def _refused(field: str, exc: ForbiddenAddress) -> InvalidRequest:
    return InvalidRequest(f"Invalid '{field}': the URL points at a private or reserved address ({exc}); the "
                          "gateway does not fetch from there.", param=field, code="image_url_forbidden")


def too_large(field: str, limit: int) -> InvalidRequest:
    return InvalidRequest(f"Invalid '{field}': larger than the limit of {limit} bytes.", param=field,
                          code="file_too_large")
