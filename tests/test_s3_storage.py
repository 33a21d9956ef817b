"""Object storage on an S3-compatible server (moto in server mode on a free port): presigned links, lifetime.

moto serves presigned URLs without checking their signature or expiry, so what S3 itself would check is
done here by `s3_rejects`, an independent implementation of AWS Signature V4 query authentication.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import aiohttp
import boto3
import pytest
from moto.server import ThreadedMotoServer
from PIL import Image

from service.connections import RedisFactory, open_storage
from service.constants import STORAGE_SWEEP_KEY
from service.settings import Settings
from service.storage import image_name
from service.storage_s3 import open_s3_storage
from tests.conftest import GatewayFactory, free_port

ACCESS_KEY, SECRET_KEY, REGION = "AKIDIMAGEGWTEST", "imagegw-test-secret", "us-east-1"
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 32


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def admin(moto_url: str) -> Any:
    """The test's own S3 client, to create buckets and look inside them."""
    return boto3.client(
        "s3",
        endpoint_url=moto_url,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
    )


@pytest.fixture
def bucket(admin: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket; the gateway finds its credentials where any AWS client would: standard variables."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    name = f"images-{uuid.uuid4().hex[:12]}"
    admin.create_bucket(Bucket=name)
    return name


def keys_in(admin: Any, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in admin.list_objects_v2(Bucket=bucket).get("Contents", []))


def s3_rejects(url: str, secret: str, now: float) -> str | None:
    """Why S3 would refuse this presigned GET (SigV4 query auth), or None when it would serve it."""
    parts = urlsplit(url)
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    signature = params.pop("X-Amz-Signature", "")
    if params.get("X-Amz-Algorithm") != "AWS4-HMAC-SHA256":
        return "unsupported algorithm"
    signed_at = datetime.strptime(params["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
    if now > signed_at + int(params["X-Amz-Expires"]):
        return "expired"
    scope = params["X-Amz-Credential"].split("/", 1)[1]
    canonical_query = "&".join(
        f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(params.items())
    )
    canonical = "\n".join(
        [
            "GET",
            parts.path,
            canonical_query,
            f"host:{parts.netloc}",
            "",
            params["X-Amz-SignedHeaders"],
            "UNSIGNED-PAYLOAD",
        ]
    )
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", params["X-Amz-Date"], scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = ("AWS4" + secret).encode()
    for part in scope.split("/"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    return None if hmac.compare_digest(expected, signature) else "signature mismatch"


async def test_sdk_url_is_a_presigned_s3_link_that_downloads(
    gateway_factory: GatewayFactory, bucket: str, admin: Any, moto_url: str, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(storage="s3", s3_bucket=bucket, s3_endpoint_url=moto_url, url_ttl=600)
    result = await gw.client().images.generate(
        prompt="a harbour", model="imagegw-local", size="256x192", n=2, response_format="url"
    )
    urls = [d.url or "" for d in result.data]
    stored = keys_in(admin, bucket)
    assert len(stored) == 2 and all(k.startswith("imagegw/") for k in stored)
    for url, key in zip(urls, stored, strict=True):
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        assert f"{parts.scheme}://{parts.netloc}" == moto_url and parts.path == f"/{bucket}/{key}"
        assert query["X-Amz-Expires"] == "600" and query["X-Amz-Credential"].startswith(f"{ACCESS_KEY}/")
        assert s3_rejects(url, SECRET_KEY, time.time()) is None
        async with http.get(url) as resp:  # no gateway key: the link is the credential
            assert resp.status == 200 and resp.content_type == "image/png"
            with Image.open(io.BytesIO(await resp.read())) as image:
                assert image.size == (256, 192)

    # the same objects back b64_json answers and the owner's /v1/files route
    b64 = await gw.client().images.generate(
        prompt="a quay", model="imagegw-local", size="64x64", response_format="b64_json"
    )
    assert b64.data[0].b64_json and len(keys_in(admin, bucket)) == 3
    job_id, file = stored[0].removeprefix("imagegw/").split("/")
    async with http.get(f"{gw.url}/v1/files/{job_id}/{file}", headers={"Authorization": "Bearer k"}) as resp:
        assert resp.status == 200 and resp.content_type == "image/png"
    async with http.get(f"{gw.url}/v1/files/{job_id}/{file}?expires=9999999999&signature=00") as resp:
        assert resp.status == 403 and (await resp.json())["error"]["code"] == "invalid_signature"


async def test_tampered_and_expired_links_are_refused(
    gateway_factory: GatewayFactory, bucket: str, moto_url: str
) -> None:
    gw = await gateway_factory(
        storage="s3",
        s3_bucket=bucket,
        s3_endpoint_url=moto_url,
        url_ttl=30,
        s3_public_endpoint_url="http://images.example.test:9000",
    )
    result = await gw.client().images.generate(
        prompt="a pier", model="imagegw-local", size="64x64", response_format="url"
    )
    url = result.data[0].url or ""
    assert url.startswith(f"http://images.example.test:9000/{bucket}/imagegw/")  # signed for the public host
    now = time.time()
    assert s3_rejects(url, SECRET_KEY, now) is None
    assert s3_rejects(url, SECRET_KEY, now + 31) == "expired"
    assert s3_rejects(url, "another-secret", now) == "signature mismatch"
    assert s3_rejects(url.replace("/0.png", "/1.png"), SECRET_KEY, now) == "signature mismatch"
    assert (
        s3_rejects(url.replace("X-Amz-Expires=30", "X-Amz-Expires=3000"), SECRET_KEY, now)
        == "signature mismatch"
    )
    assert (
        s3_rejects(url.replace("images.example.test:9000", moto_url.removeprefix("http://")), SECRET_KEY, now)
        == "signature mismatch"
    )


async def test_objects_are_deleted_per_job_and_after_their_lifetime(
    bucket: str, admin: Any, moto_url: str
) -> None:
    settings = Settings(
        _env_file=None,
        storage="s3",
        s3_bucket=bucket,
        s3_endpoint_url=moto_url,  # type: ignore[call-arg]
        s3_prefix="gw/",
        job_ttl=3600,
    )
    redis = RedisFactory(settings)()
    admin.put_object(Bucket=bucket, Key="someone-else/0.png", Body=PNG)  # outside our prefix: never touched
    async with open_storage(settings, redis) as storage:
        for _ in range(200):  # the sweeper runs at start-up and then holds the interval's key
            if await redis.exists(STORAGE_SWEEP_KEY):
                break
            await asyncio.sleep(0.01)
        assert 3000 < await redis.ttl(STORAGE_SWEEP_KEY) <= 3600
        assert keys_in(admin, bucket) == ["someone-else/0.png"]
        a, b = uuid.uuid4().hex, uuid.uuid4().hex
        for job in (a, b):
            await storage.put(image_name(job, 0, "png"), PNG)
            await storage.put(image_name(job, 1, "webp"), PNG)
        assert await storage.get(image_name(a, 1, "webp")) == PNG
        assert await storage.get(image_name(a, 2, "png")) is None
        await storage.delete_job(a)
        assert keys_in(admin, bucket) == sorted([f"gw/{b}/0.png", f"gw/{b}/1.webp", "someone-else/0.png"])
        assert await storage.purge_older_than(datetime.now(UTC) - timedelta(hours=1)) == 0
        assert await storage.purge_older_than(datetime.now(UTC) + timedelta(minutes=1)) == 2
        assert keys_in(admin, bucket) == ["someone-else/0.png"]
        with pytest.raises(ValueError, match="invalid storage name"):
            await storage.put("../escape.png", PNG)
    await redis.aclose()


async def test_misconfiguration_stops_start_up(moto_url: str) -> None:
    redis = RedisFactory(Settings(_env_file=None))()  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="needs IMAGEGW_S3_BUCKET"):
        async with open_s3_storage(Settings(_env_file=None, storage="s3"), redis):  # type: ignore[call-arg]
            pass
    with pytest.raises(ValueError, match="presigned S3 links last at most 604800 seconds"):
        async with open_s3_storage(
            Settings(
                _env_file=None,
                storage="s3",
                s3_bucket="b",  # type: ignore[call-arg]
                url_ttl=8 * 24 * 3600,
            ),
            redis,
        ):
            pass
    await redis.aclose()
