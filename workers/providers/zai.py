"""Zhipu AI (BigModel) and Z.ai CogView image generation.

Follows the Z.ai API reference "Generate Image" (docs.z.ai/api-reference/image/generate-image, CogView-4
`cogview-4-250304`; BigModel's docs.bigmodel.cn "图像生成" describes the same call) and the business error
codes of docs.z.ai/api-reference/api-code. The same API is served at https://open.bigmodel.cn and https://api.z.ai:

    POST {base_url}/api/paas/v4/images/generations       Authorization: Bearer <key>
    {"model", "prompt", "size": "WIDTHxHEIGHT", "quality": "hd" | "standard", "user_id"}
    200 -> {"created", "data": [{"url"}], "content_filter": [{"role", "level"}]}
    400/401/429/500 -> {"error": {"code": "1301", "message"}}

Generation only: CogView takes no input image, so edits and variations never reach this adapter (the router
refuses them by PROVIDER_CAPABILITIES). Each call draws one image: n > 1 fans out into n parallel calls. The
images come as links, downloaded at once with a size cap. CogView reports no usage.
"""

from __future__ import annotations

import hashlib
from typing import Any

from pydantic import Field

from service.schemas import ImageSpec
from workers.providers.base import (
    Deployment,
    GeneratedImage,
    ImageRequest,
    ProgressReporter,
    Provider,
    ProviderOptions,
    ProviderResult,
)
from workers.providers.images_api import (
    CONTENT_POLICY,
    MAX_IMAGE_BYTES,
    ErrorRule,
    bearer_headers,
    download_image,
    raise_for_status,
)
from workers.providers.translation import fan_out
from workers.providers.upstream_client import UpstreamClient

DEFAULT_BASE_URL = "https://open.bigmodel.cn"
PATH = "/api/paas/v4/images/generations"
QUALITIES = frozenset({"hd", "standard"})  # "auto" leaves the choice to CogView (standard)
USER_ID_LENGTH = range(6, 129)

# Zhipu's business codes (strings in the error body), first match wins; others fall back to the HTTP status.
ZAI_ERRORS: tuple[ErrorRule, ...] = (
    ("100?", "auth", None),  # 1000-1004: missing, invalid or expired credentials
    ("11??", "failed", "upstream_account_error"),  # 1110-1121: account inactive, locked, in arrears
    ("121[12]", "failed", "upstream_account_error"),  # unknown model / call method: the deployment is wrong
    ("121?", "rejected", None),  # 1210, 1213-1215: parameters
    ("122?", "failed", "upstream_account_error"),  # no permission for the API, API offline
    ("1231", "rate_limited", None),  # a request of this user is already running
    ("123?", "failed", None),  # call process or network error
    ("130[01]", "rejected", CONTENT_POLICY),  # blocked by policy / unsafe or sensitive input or output
    ("130[235]", "rate_limited", None),  # concurrency, frequency, traffic
    ("13??", "failed", "upstream_account_error"),  # daily or plan limits
    ("500", "failed", None),
)
FILTERED_ROLES = {"user": "the prompt", "assistant": "the generated image", "history": "the conversation"}


class ZaiOptions(ProviderOptions):
    max_image_bytes: int = Field(MAX_IMAGE_BYTES, ge=1, description="largest image taken from CogView, bytes")


def cogview_body(spec: ImageSpec, model: str) -> dict[str, Any]:
    """The JSON body for one image: the whole mapping from the gateway's request to CogView's."""
    body: dict[str, Any] = {"model": model, "prompt": spec.prompt, "size": spec.size}
    if spec.quality in QUALITIES:
        body["quality"] = spec.quality
    if spec.user:
        # CogView wants 6 to 128 characters; any other id is sent as a stable digest so abuse stays traceable
        body["user_id"] = spec.user if len(spec.user) in USER_ID_LENGTH else hashlib.sha256(
            spec.user.encode()).hexdigest()
    return body


class ZaiProvider(Provider):
    """CogView text-to-image on open.bigmodel.cn or api.z.ai."""

    type = "zai"
    Options = ZaiOptions

    async def generate(self, request: ImageRequest, deployment: Deployment, progress: ProgressReporter
                       ) -> ProviderResult:
        spec = request.spec
        options = self.options(deployment)
        assert isinstance(options, ZaiOptions)
        client = UpstreamClient(self.http, self.type, deployment)
        url = f"{deployment.base_url or DEFAULT_BASE_URL}{PATH}"
        headers = bearer_headers(deployment)
        payload = cogview_body(spec, deployment.upstream_model)

        async def one(_index: int, _count: int) -> GeneratedImage:
            answer = await client.post_json(url, payload, headers)
            raise_for_status(client, ZAI_ERRORS, answer)
            body = answer.body if isinstance(answer.body, dict) else {}
            data, filters = body.get("data"), body.get("content_filter")
            first = data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else {}
            link = first.get("url")
            if isinstance(link, str):
                return await download_image(client, link, options.max_image_bytes)
            if isinstance(filters, list) and filters and isinstance(filters[0], dict):
                # no image but a content-filter verdict: CogView withheld the picture
                verdict = filters[0]
                what = FILTERED_ROLES.get(str(verdict.get("role")), "the request")
                reason = f"the content filter blocked {what} (level {verdict.get('level')})"
                raise client.failure("rejected", reason, code=CONTENT_POLICY, param="prompt")
            raise client.failure("failed", "the answer holds no image link", code="bad_upstream_answer")

        await progress.update(0.05, "waiting for CogView")
        images = await fan_out([1] * spec.n, one)
        await progress.update(0.95, "received")
        return ProviderResult(
            images=images,
            size=spec.size,
            quality=spec.quality if spec.quality in QUALITIES else "standard",
            background="opaque",
        )
