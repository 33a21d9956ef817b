"""Hostile input against a real cluster: fuzzed JSON and headers, oversized bodies and headers, slow-loris
uploads, malformed multipart, image bombs, path tricks and forged signed links. Every answer is a 2xx or a
4xx (never a 5xx, never a hang), every job that was accepted ends, and the service keeps serving.
The OpenAPI-driven fuzzing (schemathesis) lives in tests/test_openapi.py; here the inputs are the ones a
schema would never produce."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import struct
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.faults.harness import AUTH, CLIENT_TIMEOUT, Cluster, rss_kib, running_cluster

MALLORY = {"Authorization": "Bearer sk-mallory"}
BODY_LIMIT = 256 * 1024
READ_TIMEOUT = 1.0
SIGNING_SECRET = b"test-secret"  # what tests.conftest.Processes gives every process


def hostile_config() -> dict[str, Any]:
    return {
        "default_model": "small",
        "keys": [{"name": "alice", "key": AUTH["Authorization"].removeprefix("Bearer ")},
                 {"name": "mallory", "key": "sk-mallory"}],
        "providers": {"local": {"type": "local", "options": {"steps": 1}}},
        "models": {"small": {"family": "dall-e-2", "deployments": [{"provider": "local"}]},
                   "local": {"family": "generic", "deployments": [{"provider": "local"}]}},
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    env = {"IMAGEGW_MAX_BODY_BYTES": str(BODY_LIMIT), "IMAGEGW_BODY_READ_TIMEOUT": str(READ_TIMEOUT),
           "IMAGEGW_FETCH_TIMEOUT": "2", "IMAGEGW_LOG_LEVEL": "WARNING"}
    with running_cluster(tmp_path_factory.mktemp("hostile"), hostile_config(), env=env) as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        yield session


def assert_openai_error(status: int, body: bytes, *statuses: int) -> dict[str, Any]:
    """A 4xx in the OpenAI error shape, one of `statuses` when given."""
    assert 400 <= status < 500 and (not statuses or status in statuses), (status, body[:300])
    error = json.loads(body)["error"]
    assert isinstance(error["message"], str) and error["type"], error
    return error  # type: ignore[no-any-return]


async def raw_request(url: str, head: str, body: bytes = b"") -> tuple[int, bytes]:
    """Send exactly these bytes (no client normalising the path or the headers); (status, body)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head.encode("latin-1") + body)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 10)
        headers = {}
        while (line := await asyncio.wait_for(reader.readline(), 10)) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        payload = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), 10)
        return int(status_line.split()[1]), payload
    finally:
        writer.close()


# fuzzing: JSON bodies and headers ---------------------------------------------------------------------------

JOB_ROUTES = ("/v1/images/generations", "/api/images/generations", "/v1/images/edits",
              "/v1/images/variations", "/v1/chat/completions")
FIELDS = ("prompt", "model", "n", "size", "quality", "response_format", "output_format",
          "output_compression", "background", "style", "user", "stream", "partial_images", "image", "mask",
          "input_fidelity", "seed", "negative_prompt", "watermark", "moderation", "messages", "modalities")
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                         st.text(max_size=30))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                 st.dictionaries(st.text(max_size=8), inner,
                                                                                 max_size=4)), max_leaves=12)
# values that reach past the first checks: real models, sizes, image references, chat messages
telling = st.sampled_from([
    "small", "256x256", "1024x1024", "auto", 1, 2, 10, 11, 0, -1, 2**63, True, "b64_json", "url", "png",
    "webp",
    "data:image/png;base64,iVBORw0KGgo=", "http://127.0.0.1:1/a.png", "file:///etc/passwd", "", ["x"],
    [{"role": "user", "content": "draw a cat"}], ["image", "text"], "\u0000", "\ud7ff" * 3,
])
bodies = st.one_of(
    # a valid request with a few changes: these reach admission, the queue and the workers
    st.dictionaries(st.sampled_from(FIELDS), telling, max_size=3).map(lambda changed: {"prompt": "fuzz",
                                                                                      **changed}),
    st.dictionaries(st.sampled_from(FIELDS), st.one_of(telling, json_values), max_size=8),
    json_values,
    st.binary(max_size=200),
)
# what a client library lets through: printable ASCII without surrounding blanks
header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40).map(str.strip)
headers = st.fixed_dictionaries({
    "Authorization": st.one_of(st.sampled_from([AUTH["Authorization"], MALLORY["Authorization"]]),
                               header_text),
}, optional={
    "Content-Type": st.one_of(st.sampled_from(["application/json", "text/plain", "multipart/form-data",
                                               "application/x-www-form-urlencoded"]), header_text),
    "Prefer": st.one_of(st.just("respond-async"), header_text),
    "X-Request-ID": header_text,
    "Accept": header_text,
})  # broken Content-Encodings have a test of their own: aiohttp's parser answers some of them itself


def fuzz_json(url: str, examples: int) -> tuple[int, int]:
    """Random bodies and headers to every JSON endpoint; returns (requests, accepted jobs)."""
    seen: list[str] = []
    counts = [0, 0]
    session = requests.Session()

    @given(route=st.sampled_from([*JOB_ROUTES, "jobs", "admin"]), body=bodies, extra=headers,
           pick=st.integers(min_value=0))
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def one(route: str, body: Any, extra: dict[str, str], pick: int) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        if route == "jobs":
            job_id = seen[pick % len(seen)] if seen and pick % 3 else str(body)[:40]
            method = "DELETE" if pick % 2 else "GET"
            resp = session.request(method, f"{url}/v1/images/jobs/{job_id}", headers=extra, timeout=30)
        else:
            path = "/admin/keys" if route == "admin" else route
            resp = session.post(url + path, data=raw, headers={"Content-Type": "application/json", **extra},
                                timeout=30)
        counts[0] += 1
        assert resp.status_code < 500, (route, raw[:200], extra, resp.status_code, resp.text[:300])
        if resp.status_code >= 400:
            assert_openai_error(resp.status_code, resp.content)
        elif route in JOB_ROUTES and resp.status_code in (200, 202):
            counts[1] += 1
            if resp.status_code == 202:
                seen.append(resp.json()["id"])

    one()
    return counts[0], counts[1]


async def test_fuzzed_json_bodies_and_headers_get_only_2xx_or_4xx(cluster: Cluster,
                                                                   http: aiohttp.ClientSession) -> None:
    before = cluster.job_ids()
    sent, accepted = await asyncio.to_thread(fuzz_json, cluster.url, 300)
    assert sent >= 300 and accepted >= 5  # some requests got through: the fuzzing reached the job paths
    ledger = await cluster.settled(before, accepted, within=60)
    assert set(ledger.statuses.values()) <= {"succeeded", "failed", "cancelled"}
    await cluster.still_serves(http, "local")


# sizes: bodies, headers -------------------------------------------------------------------------------------

async def test_oversized_bodies_get_413_in_the_error_shape(cluster: Cluster,
                                                           http: aiohttp.ClientSession) -> None:
    before = cluster.job_ids()
    big = {"prompt": "x" * (BODY_LIMIT + 1)}
    async with http.post(cluster.url + "/v1/images/generations", headers=AUTH, json=big) as resp:
        assert_openai_error(resp.status, await resp.read(), 413)

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the limit must hold while reading
        yield b'{"prompt": "'
        for _ in range(BODY_LIMIT // 4096 + 2):
            yield b"y" * 4096
        yield b'"}'

    async with http.post(cluster.url + "/v1/chat/completions", headers=AUTH, data=chunked()) as resp:
        assert_openai_error(resp.status, await resp.read(), 413)
    form = aiohttp.FormData()
    form.add_field("prompt", "edit")
    form.add_field("image", b"\x89PNG" + bytes(BODY_LIMIT), filename="big.png", content_type="image/png")
    async with http.post(cluster.url + "/v1/images/edits", headers=AUTH, data=form) as resp:
        assert_openai_error(resp.status, await resp.read(), 413)
    await cluster.settled(before, 0)
    await cluster.still_serves(http, "local")


async def test_oversized_headers_and_urls_are_refused_with_400(cluster: Cluster,
                                                              http: aiohttp.ClientSession) -> None:
    # aiohttp's parser refuses these before any handler runs, so the body is its plain text, not JSON
    huge_value = f"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {'a' * 20000}\r\n\r\n"
    many = "GET /healthz HTTP/1.1\r\nHost: x\r\n" + "".join(f"X-H{i}: v\r\n" for i in range(200)) + "\r\n"
    long_url = f"GET /v1/models/{'m' * 20000} HTTP/1.1\r\nHost: x\r\n\r\n"
    for head in (huge_value, many, long_url):
        status, _ = await raw_request(cluster.url, head)
        assert status in (400, 414, 431), status
    await cluster.still_serves(http, "local")


async def test_bodies_that_break_the_parsers_are_400s(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    before = cluster.job_ids()
    front_end = cluster.processes.procs[0]
    rss_before = rss_kib(front_end.pid)
    url = cluster.url + "/v1/images/generations"
    json_type = {**AUTH, "Content-Type": "application/json"}
    for body in (b'{"prompt": "x", "n": ' + b"9" * 5000 + b"}",  # too long for int()
                 b"[" * 100_000,  # deeper than the parser's recursion
                 rb'{"prompt": "\ud800"}'):  # a lone surrogate
        async with http.post(url, data=body, headers=json_type) as resp:
            assert assert_openai_error(resp.status, await resp.read(), 400)["code"] in ("invalid_json",
                                                                                        "invalid_value")
    for encoding in ("gzip", "deflate", "br"):
        async with http.post(url, data=b"not compressed at all",
                             headers={**json_type, "Content-Encoding": encoding}) as resp:
            # a body that arrives with its headers is refused by aiohttp's parser itself, in plain text (br
            # always is, without the Brotli package); one that arrives later reaches the handler: JSON
            assert resp.status == 400
            if resp.content_type == "application/json":
                assert assert_openai_error(resp.status, await resp.read(), 400)["code"] == "invalid_body"
                # aiohttp closes such a connection: the client is told not to send on it again
                assert resp.headers["Connection"] == "close"
    # a gzip bomb: 100 KB on the wire, 100 MB inflated; refused at the body limit, not inflated in full
    bomb = zlib.compressobj(9, zlib.DEFLATED, 31)
    gz = b"".join(bomb.compress(bytes(1 << 20)) for _ in range(100)) + bomb.flush()
    assert len(gz) < BODY_LIMIT
    async with http.post(url, data=gz, headers={**json_type, "Content-Encoding": "gzip"}) as resp:
        assert_openai_error(resp.status, await resp.read(), 413)
    broken_chunks = (f"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: {AUTH['Authorization']}\r\nContent-Type: application/json\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\nzz\r\n")
    status, _ = await raw_request(cluster.url, broken_chunks)
    assert status == 400
    assert rss_kib(front_end.pid) - rss_before < 32 * 1024
    await cluster.settled(before, 0)
    await cluster.still_serves(http, "local")


# slow loris ------------------------------------------------------------------------------------------------

async def slow_upload(url: str, path: str, content_type: str, body: bytes, *, send: int
                      ) -> tuple[int, bytes, float]:
    """Headers, `send` bytes of the body, then one byte every 0.2 s: (status, answer, seconds to answer)."""
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH['Authorization']}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n")
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))

    async def dribble() -> None:
        writer.write(head.encode() + body[:send])
        for i in range(send, len(body)):
            await asyncio.sleep(0.2)
            writer.write(body[i:i + 1])
            await writer.drain()

    started = time.monotonic()
    sender = asyncio.create_task(dribble())
    try:
        status_line = await asyncio.wait_for(reader.readline(), 10)
        took = time.monotonic() - started
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        return int(status_line.split()[1]), await reader.readexactly(length), took
    finally:
        sender.cancel()
        writer.close()


async def test_slow_loris_uploads_are_cut_off_by_the_body_read_timeout(cluster: Cluster,
                                                                        http: aiohttp.ClientSession) -> None:
    before = cluster.job_ids()
    json_body = b'{"prompt": "a slow, slow upload", "size": "256x256"}'
    boundary = "slowloris"
    multipart = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nslow\r\n"
                 f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
                 "Content-Type: image/png\r\n\r\n").encode() + png(32, 32)
    multipart += f"\r\n--{boundary}--\r\n".encode()
    attacks = [slow_upload(cluster.url, "/v1/images/generations", "application/json", json_body, send=10)
               for _ in range(10)]
    attacks += [slow_upload(cluster.url, "/v1/images/edits", f"multipart/form-data; boundary={boundary}",
                            multipart, send=60) for _ in range(5)]
    # headers only: a body announced and never sent
    attacks.append(slow_upload(cluster.url, "/v1/chat/completions", "application/json", b"{" * 100, send=0))
    running = asyncio.gather(*attacks)
    # meanwhile, honest clients are served
    async with http.post(cluster.url + "/v1/images/generations", headers=AUTH,
                         json={"prompt": "honest", "size": "256x256"}) as resp:
        assert resp.status == 200
    for status, body, took in await running:
        error = assert_openai_error(status, body, 408)
        assert error["code"] == "request_timeout"
        assert READ_TIMEOUT <= took < READ_TIMEOUT + 2
    await cluster.settled(before, 1)
    await cluster.still_serves(http, "local")


# multipart and images -------------------------------------------------------------------------------------

MALFORMED_MULTIPART = [
    ("multipart/form-data", b"no boundary at all"),
    ("multipart/form-data; boundary=XX", b"no boundary line in the body"),
    ("multipart/form-data; boundary=XX",
     b'--XX\r\nContent-Disposition: form-data; name="prompt"\r\n\r\ncut short'),
    ("multipart/form-data; boundary=" + "B" * 100, b"--" + b"B" * 100 + b"--\r\n"),
    ('multipart/form-data; boundary="', b"x"),
    ("multipart/form-data; boundary=XX", b'--XX\r\nContent-Disposition: form-data; name="prompt"\r\nX-Long: '
     + b"a" * 20000 + b"\r\n\r\nhi\r\n--XX--\r\n"),
    ("multipart/form-data; boundary=XX", b"--XX\r\nContent-Type: multipart/mixed; boundary=YY\r\n"
     b'Content-Disposition: form-data; name="image"\r\n\r\n--YY\r\n\r\nx\r\n--YY--\r\n--XX--\r\n'),
    ("multipart/form-data; boundary=XX", b'--XX\r\nContent-Disposition: form-data; name="prompt"\r\n'
     b"Content-Type: text/plain; charset=no-such-charset\r\n\r\nhi\r\n--XX--\r\n"),
    ("multipart/form-data; boundary=XX", b'--XX\r\nContent-Disposition: form-data; name="image"; '
     b'filename="a.png"\r\n\r\n\x89PNG\r\n\x1a\nnot really\r\n--XX\r\nContent-Disposition: form-data; '
     b'name="prompt"\r\n\r\nx\r\n--XX--\r\n'),
    ("multipart/form-data; boundary=XX", b'--XX\r\nContent-Disposition: form-data; name="n"\r\n\r\n'
     + b"9" * 5000 + b"\r\n--XX--\r\n"),
]


async def test_malformed_multipart_is_a_400(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    before = cluster.job_ids()
    for path in ("/v1/images/edits", "/v1/images/variations"):
        for content_type, body in MALFORMED_MULTIPART:
            async with http.post(cluster.url + path, data=body,
                                 headers={**AUTH, "Content-Type": content_type}) as resp:
                assert_openai_error(resp.status, await resp.read(), 400)
    await cluster.settled(before, 0)
    await cluster.still_serves(http, "local")


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, "PNG")
    return out.getvalue()


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int, *, pixels: bool) -> bytes:
    """A grey PNG declaring width x height: with `pixels`, real all-zero rows (a few KB that decode to
    width*height bytes); without, a token IDAT, as a file that only lies in its header."""
    compressor = zlib.compressobj(9)
    if pixels:
        row = bytes(width + 1)  # filter byte + zero pixels
        data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    else:
        data = compressor.compress(bytes(64)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


async def test_image_bombs_are_refused_before_decoding(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    before = cluster.job_ids()
    front_end = cluster.processes.procs[0]
    rss_before = rss_kib(front_end.pid)
    decoding = bomb_png(8000, 8000, pixels=True)  # 64 Mpx: 64 MB as pixels, 60 KB as a file
    lying = bomb_png(100_000, 100_000, pixels=False)
    assert len(decoding) < 100_000
    for bomb in (decoding, lying):
        started = time.monotonic()
        form = aiohttp.FormData()
        form.add_field("prompt", "explode")
        form.add_field("image", bomb, filename="bomb.png", content_type="image/png")
        async with http.post(cluster.url + "/v1/images/edits", headers=AUTH, data=form) as resp:
            error = assert_openai_error(resp.status, await resp.read(), 400)
        assert error["code"] == "image_too_large" and error["param"] == "image", error
        reference = "data:image/png;base64," + base64.b64encode(bomb).decode()
        async with http.post(cluster.url + "/v1/images/edits", headers=AUTH,
                             json={"prompt": "explode", "image": reference}) as resp:
            assert assert_openai_error(resp.status, await resp.read(), 400)["code"] == "image_too_large"
        variation = aiohttp.FormData()
        variation.add_field("image", bomb, filename="bomb.png", content_type="image/png")
        async with http.post(cluster.url + "/v1/images/variations", headers=AUTH, data=variation) as resp:
            assert assert_openai_error(resp.status, await resp.read(), 400)["code"] == "image_too_large"
        assert time.monotonic() - started < 3
    assert rss_kib(front_end.pid) - rss_before < 32 * 1024  # never decoded
    await cluster.settled(before, 0)
    await cluster.still_serves(http, "local")


# files: paths and signed links -----------------------------------------------------------------------------

async def made_image(http: aiohttp.ClientSession, cluster: Cluster) -> tuple[str, str, bytes]:
    """A finished job's signed image link: (job id, file name, the image bytes)."""
    async with http.post(cluster.url + "/v1/images/generations", headers=AUTH,
                         json={"prompt": "a file", "size": "256x256", "response_format": "url"}) as resp:
        assert resp.status == 200, await resp.text()
        link = (await resp.json())["data"][0]["url"]
    async with http.get(link) as resp:
        assert resp.status == 200
        data = await resp.read()
    job_id, name = link.split("/v1/files/")[1].split("?")[0].split("/")
    return job_id, name, data


async def test_path_tricks_on_the_files_endpoint_reach_nothing(cluster: Cluster,
                                                               http: aiohttp.ClientSession) -> None:
    before = cluster.job_ids()
    job_id, name, image = await made_image(http, cluster)
    tricks = [
        "/v1/files/../../etc/passwd", "/v1/files/%2e%2e/%2e%2e/etc/passwd", "/v1/files//etc/passwd",
        f"/v1/files/{job_id}/..%2F..%2Fimagegw.yaml", f"/v1/files/{job_id}/%2Fetc%2Fpasswd",
        f"/v1/files/{job_id}/{name}%00.txt", f"/v1/files/{job_id}/input-0.png", f"/v1/files/{job_id}/{name}/",
        f"/v1/files/{job_id}/{name.upper()}", f"/v1/files/{job_id.upper()}/{name}",
        f"/v1/files/{job_id}%2F{name}",
        f"/v1/files/{job_id}/..\\..\\imagegw.yaml", f"/v1/files/{job_id}/%2e%2e%2f%2e%2e%2f{name}",
        "/v1/files/" + "0" * 32 + f"/{name}",
    ]
    for path in tricks:
        for auth in ({}, AUTH, MALLORY):
            head = f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            head += "".join(f"{k}: {v}\r\n" for k, v in auth.items()) + "\r\n"
            status, body = await raw_request(cluster.url, head)
            assert_openai_error(status, body, 400, 401, 403, 404)
            assert body != image and b"root:" not in body and b"providers" not in body
    # the owner's key reaches the file; another key's cannot tell it exists
    path = f"/v1/files/{job_id}/{name}"
    async with http.get(cluster.url + path, headers=AUTH) as resp:
        assert resp.status == 200 and await resp.read() == image
    async with http.get(cluster.url + path, headers=MALLORY) as resp:
        assert assert_openai_error(resp.status, await resp.read(), 404)["code"] == "job_not_found"
    async with http.get(cluster.url + path) as resp:
        assert_openai_error(resp.status, await resp.read(), 401)
    await cluster.settled(before, 1)
    await cluster.still_serves(http, "local")


def signature(name: str, expires: int | str) -> str:
    return hmac.new(SIGNING_SECRET, f"{name}\n{expires}".encode(), hashlib.sha256).hexdigest()


async def test_forged_or_expired_signed_links_are_403(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    before = cluster.job_ids()
    job_id, name, image = await made_image(http, cluster)
    other_id, other_name, _ = await made_image(http, cluster)
    file = f"{job_id}/{name}"
    future = int(time.time()) + 600
    async with http.get(f"{cluster.url}/v1/files/{file}?expires={future}&signature={signature(file, future)}"
                        ) as resp:  # the scheme itself works: the refusals below are for cause
        assert resp.status == 200 and await resp.read() == image
    past = int(time.time()) - 1
    queries = [
        f"expires={past}&signature={signature(file, past)}",  # genuine, but expired
        f"expires={future}&signature={'0' * 64}",  # forged
        f"expires={future}&signature={signature(f'{other_id}/{other_name}', future)}",  # another file's
        f"expires={future + 1}&signature={signature(file, future)}",  # expiry moved
        f"expires={future}&signature=%C3%A9%C3%A9",  # not ASCII
        f"expires=%C2%B2&signature={signature(file, future)}",  # a digit to str.isdigit(), not to int()
        f"expires={'9' * 5000}&signature=x",  # too long for int()
        f"expires={future}", f"signature={signature(file, future)}", "expires=&signature=",
    ]
    for query in queries:
        async with http.get(f"{cluster.url}/v1/files/{file}?{query}") as resp:
            error = assert_openai_error(resp.status, await resp.read(), 403)
            assert error["code"] == "invalid_signature", (query, error)
    await cluster.settled(before, 2)
    await cluster.still_serves(http, "local")
