"""Image URLs in JSON edits: fetched by the gateway within size and time limits, never from internal
addresses (checked for every redirect, and for every address a name resolves to) unless allow-listed."""

from __future__ import annotations

import ipaddress
from typing import Any

import aiohttp
import pytest

from service.fetch import forbidden
from tests.conftest import Gateway, GatewayFactory
from tests.fakes.image_host import ImageHost, Route
from tests.pictures import data_url, decode, png


async def edit(gateway: Gateway, http: aiohttp.ClientSession, image: Any, path: str = "/v1/images/edits"
               ) -> tuple[int, dict[str, Any]]:
    async with http.post(gateway.url + path, json={"prompt": "paint it", "image": image}) as resp:
        return resp.status, await resp.json()


@pytest.mark.parametrize(("host", "code"), [
    *((host, "image_url_forbidden") for host in (
        "127.0.0.1:{port}", "localhost:{port}", "[::1]:{port}", "0.0.0.0:{port}", "[::ffff:127.0.0.1]:{port}",
        "169.254.169.254", "10.0.0.1", "192.168.1.1", "100.100.100.200", "[fd00:ec2::254]", "224.0.0.1")),
    ("2130706433:{port}", "image_url_failed"),  # 127.0.0.1 in disguise: the HTTP client itself refuses it
])
async def test_internal_addresses_are_refused_before_any_connection(
    gateway: Gateway, http: aiohttp.ClientSession, host: str, code: str
) -> None:
    async with ImageHost() as server:
        server.routes["/latest/meta-data/"] = Route(body=png())
        url = f"http://{host.format(port=server.port)}/latest/meta-data/"
        status, body = await edit(gateway, http, url)
        assert status == 400, body
        assert body["error"]["code"] == code and body["error"]["param"] == "image"
        assert server.connections == 0


async def test_every_endpoint_taking_urls_refuses_them(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    async with ImageHost() as server:
        server.routes["/a.png"] = Route(body=png())
        status, body = await edit(gateway, http, [png_url := f"{server.url}/a.png", png_url],
                                  path="/api/images/generations")
        assert status == 400 and body["error"]["param"] == "image[0]"
        content = [{"type": "text", "text": "redraw"}, {"type": "image_url", "image_url": {"url": png_url}}]
        chat = {"model": "imagegw-local", "modalities": ["image", "text"],
                "messages": [{"role": "user", "content": content}]}
        async with http.post(gateway.url + "/v1/chat/completions", json=chat) as resp:
            assert resp.status == 400
            error = (await resp.json())["error"]
        assert error["code"] == "image_url_forbidden" and error["param"] == "messages[0].content[1].image_url"
        assert server.connections == 0


@pytest.fixture
async def trusting(gateway_factory: GatewayFactory) -> Gateway:
    """A gateway that may fetch from 127.0.0.1 (only), with short limits."""
    return await gateway_factory(fetch_allowed_networks=["127.0.0.1/32"], fetch_timeout=0.5,
                                 fetch_max_redirects=2, max_input_image_bytes=100_000)


async def test_allow_listed_urls_are_fetched(trusting: Gateway, http: aiohttp.ClientSession) -> None:
    async with ImageHost() as server:
        server.routes["/pictures/cat.png"] = Route(body=png((48, 32)), headers={"Content-Type": "image/png"})
        status, body = await edit(trusting, http, f"{server.url}/pictures/cat.png")
        assert status == 200, body
        assert decode(body["data"][0]["b64_json"]).size == (48, 32)
        ((line, headers),) = server.requests
        assert line == "GET /pictures/cat.png HTTP/1.1" and headers["host"] == f"127.0.0.1:{server.port}"


@pytest.mark.parametrize("target", ["http://10.0.0.1/x.png", "http://169.254.169.254/latest/meta-data/",
                                    "http://[::1]:{port}/a.png", "file:///etc/passwd"])
async def test_each_redirect_is_checked_again(trusting: Gateway, http: aiohttp.ClientSession, target: str
                                              ) -> None:
    async with ImageHost() as server:
        server.routes["/a.png"] = Route(body=png())
        server.routes["/moved"] = Route(status=302, headers={"Location": target.format(port=server.port)})
        status, body = await edit(trusting, http, f"{server.url}/moved")
        assert status == 400
        assert body["error"]["code"] in ("image_url_forbidden", "invalid_image_url")
        assert [line for line, _ in server.requests] == ["GET /moved HTTP/1.1"]


async def test_relative_redirects_are_followed_up_to_the_limit(trusting: Gateway, http: aiohttp.ClientSession
                                                               ) -> None:
    async with ImageHost() as server:
        server.routes["/a.png"] = Route(body=png())
        server.routes["/1"] = Route(status=301, headers={"Location": "/2"})
        server.routes["/2"] = Route(status=307, headers={"Location": "/a.png"})
        server.routes["/loop"] = Route(status=302, headers={"Location": "/loop"})
        assert (await edit(trusting, http, f"{server.url}/1"))[0] == 200
        status, body = await edit(trusting, http, f"{server.url}/loop")
        assert status == 400 and "redirects" in body["error"]["message"]
        assert [line for line, _ in server.requests][-3:] == ["GET /loop HTTP/1.1"] * 3


def png_data_url() -> str:
    return data_url(png((32, 32)))


@pytest.mark.parametrize(("route", "code"), [
    (Route(body=b"\0" * 100_001), "file_too_large"),  # refused on its Content-Length
    (Route(body=b"\0" * 200_000, declare_length=False), "file_too_large"),  # refused while reading
    (Route(stall=True), "image_url_timeout"),
    (Route(status=404), "image_url_failed"),
    (Route(body=b"<html>not an image</html>", headers={"Content-Type": "image/png"}), "invalid_image_format"),
])
async def test_fetch_failures_are_400s_on_the_field(trusting: Gateway, http: aiohttp.ClientSession,
                                                    route: Route, code: str) -> None:
    async with ImageHost() as server:
        server.routes["/x"] = route
        status, body = await edit(trusting, http, [png_data_url(), f"{server.url}/x"])
        assert status == 400, body
        assert body["error"]["param"] == "image[1]" and body["error"]["code"] == code


@pytest.mark.parametrize(("address", "refused"), [
    ("8.8.8.8", False), ("2606:4700:4700::1111", False),
    ("127.0.0.1", True), ("10.1.2.3", True), ("172.16.0.1", True), ("192.168.0.1", True),
    ("169.254.169.254", True), ("100.64.0.1", True), ("0.0.0.0", True), ("255.255.255.255", True),
    ("224.0.0.251", True), ("240.0.0.1", True),
    ("::1", True), ("::", True), ("fe80::1", True), ("fd00:ec2::254", True), ("ff02::1", True),
    ("::ffff:10.0.0.1", True), ("2002:7f00:1::", True), ("64:ff9b::a9fe:a9fe", True),
    ("64:ff9b::808:808", False),
])
def test_forbidden_addresses(address: str, refused: bool) -> None:
    assert forbidden(ipaddress.ip_address(address)) is refused
