"""Images in an S3-compatible bucket (AWS S3, MinIO, R2, Ceph...), handed out as presigned, expiring links.

Object lifetime: the gateway deletes its own objects older than `job_ttl`
(`service.storage.sweep_forever`), so it works on any S3-compatible service and needs no bucket-level
permission. A bucket lifecycle rule on the same prefix is a fine addition where the service supports one,
but it counts in whole days.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from arq.connections import ArqRedis
from botocore.exceptions import ClientError

from service.settings import Settings
from service.storage import NAME_PATTERN, content_type

log = logging.getLogger(__name__)

MAX_PRESIGN_SECONDS = 7 * 24 * 3600  # SigV4's limit for a presigned URL
MISSING = frozenset({"NoSuchKey", "404", "NotFound"})


class S3Storage:
    """The `Storage` protocol on one bucket and key prefix. `signer` is a client for the endpoint clients
    see (it may differ from the one the gateway talks to, e.g. in a container network); it signs offline."""

    def __init__(self, client: Any, signer: Any, bucket: str, prefix: str, url_ttl: int) -> None:
        self.client = client
        self.signer = signer
        self.bucket = bucket
        self.prefix = prefix
        self.url_ttl = url_ttl

    def key(self, name: str) -> str:
        if not NAME_PATTERN.match(name):
            raise ValueError(f"invalid storage name {name!r}")
        return self.prefix + name

    async def put(self, name: str, data: bytes) -> None:
        await self.client.put_object(
            Bucket=self.bucket, Key=self.key(name), Body=data, ContentType=content_type(name)
        )

    async def get(self, name: str) -> bytes | None:
        try:
            response = await self.client.get_object(Bucket=self.bucket, Key=self.key(name))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in MISSING:
                return None
            raise
        async with response["Body"] as body:
            data: bytes = await body.read()
            return data

    async def delete_job(self, job_id: str) -> None:
        await self._delete([obj["Key"] async for obj in self._objects(self.prefix + job_id + "/")])

    async def public_url(self, name: str, base_url: str) -> str:
        url: str = await self.signer.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self.key(name)}, ExpiresIn=self.url_ttl
        )
        return url

    async def purge_older_than(self, cutoff: datetime) -> int:
        """Delete this gateway's objects last written before `cutoff`; how many were deleted."""
        old = [obj["Key"] async for obj in self._objects(self.prefix) if obj["LastModified"] < cutoff]
        await self._delete(old)
        return len(old)

    async def _objects(self, prefix: str) -> AsyncIterator[dict[str, Any]]:
        paginator = self.client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", ()):
                yield obj

    async def _delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            await self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})


def client_config(settings: Settings) -> AioConfig:
    return AioConfig(
        signature_version="s3v4",
        s3={"addressing_style": settings.s3_addressing_style},
        retries={"max_attempts": 3, "mode": "standard"},
    )


@asynccontextmanager
async def open_s3_storage(settings: Settings, redis: ArqRedis) -> AsyncIterator[S3Storage]:
    """The bucket's clients (credentials from the standard AWS variables and files)."""
    if not settings.s3_bucket:
        raise ValueError("IMAGEGW_STORAGE=s3 needs IMAGEGW_S3_BUCKET")
    if settings.url_ttl > MAX_PRESIGN_SECONDS:
        raise ValueError(
            f"IMAGEGW_URL_TTL is {settings.url_ttl}; presigned S3 links last at most "
            f"{MAX_PRESIGN_SECONDS} seconds"
        )
    session = get_session()
    async with AsyncExitStack() as stack:
        client = await stack.enter_async_context(
            session.create_client(
                "s3",
                endpoint_url=settings.s3_endpoint_url,
                region_name=settings.s3_region,
                config=client_config(settings),
            )
        )
        signer = client
        if settings.s3_public_endpoint_url:
            signer = await stack.enter_async_context(
                session.create_client(
                    "s3",
                    endpoint_url=settings.s3_public_endpoint_url,
                    region_name=settings.s3_region,
                    config=client_config(settings),
                )
            )
        yield S3Storage(client, signer, settings.s3_bucket, settings.s3_prefix, settings.url_ttl)
