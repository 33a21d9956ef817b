"""Per-model-family rules as data (sizes, n, quality, formats...) and the one function that applies them."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from service.errors import InvalidRequest
from service.schemas import ImageGenerationRequest, ImageSpec, ResponseFormat, parse_dimensions

ALL_QUALITIES = frozenset({"standard", "hd", "low", "medium", "high", "auto"})
ALL_FORMATS = frozenset({"png", "jpeg", "webp"})
ALL_BACKGROUNDS = frozenset({"transparent", "opaque", "auto"})
TRANSPARENT_FORMATS = frozenset({"png", "webp"})
COMPRESSED_FORMATS = frozenset({"jpeg", "webp"})
# request parameters beyond OpenAI's, accepted only by the families listing them in `extensions`
EXTENSIONS = ("seed", "negative_prompt", "watermark")


@dataclass(frozen=True)
class SizeRule:
    """Which `size` strings a family takes: a fixed list, and/or any WIDTHxHEIGHT within limits."""

    fixed: frozenset[str] = frozenset()
    free: bool = False
    multiple_of: int = 1
    min_edge: int = 1
    max_edge: int = 4096
    max_pixels: int | None = None
    min_pixels: int | None = None
    max_aspect: float | None = None

    def check(self, size: str) -> str | None:
        """None when `size` is allowed, else the reason it is not."""
        if size in self.fixed:
            return None
        dims = parse_dimensions(size)
        if not self.free or dims is None:
            return f"supported values are {', '.join(sorted(self.fixed, key=_size_key))}"
        width, height = dims
        if not (self.min_edge <= width <= self.max_edge and self.min_edge <= height <= self.max_edge):
            return f"width and height must be between {self.min_edge} and {self.max_edge}"
        if width % self.multiple_of or height % self.multiple_of:
            return f"width and height must be multiples of {self.multiple_of}"
        if self.max_pixels is not None and width * height > self.max_pixels:
            return f"at most {self.max_pixels} pixels are supported"
        if self.min_pixels is not None and width * height < self.min_pixels:
            return f"at least {self.min_pixels} pixels are needed"
        if self.max_aspect is not None and max(width, height) > self.max_aspect * min(width, height):
            return f"the aspect ratio must be between 1:{self.max_aspect:g} and {self.max_aspect:g}:1"
        return None


def _size_key(size: str) -> tuple[int, str]:
    dims = parse_dimensions(size)
    return (dims[0] * dims[1] if dims else 0, size)


@dataclass(frozen=True)
class FamilyRules:
    """What one model family accepts. An empty option set means the parameter is not supported at all."""

    max_prompt: int
    max_n: int
    sizes: SizeRule
    default_size: str
    qualities: frozenset[str] = ALL_QUALITIES
    styles: frozenset[str] = frozenset()
    output_formats: frozenset[str] = ALL_FORMATS
    backgrounds: frozenset[str] = ALL_BACKGROUNDS
    moderations: frozenset[str] = frozenset({"low", "auto"})
    compression: bool = True
    stream: bool = True
    extensions: frozenset[str] = field(default_factory=lambda: frozenset({"seed", "negative_prompt"}))


GPT_IMAGE = FamilyRules(
    max_prompt=32000,
    max_n=10,
    sizes=SizeRule(fixed=frozenset({"1024x1024", "1536x1024", "1024x1536", "auto"})),
    default_size="auto",
    qualities=frozenset({"low", "medium", "high", "auto"}),
    extensions=frozenset(),
)

# Google's Gemini image models, direct or through OpenRouter: any WIDTHxHEIGHT, drawn at the nearest aspect
# ratio the model has (Google picks the pixels, the answer's `size` tells); n is fanned out over calls.
GEMINI_IMAGE = FamilyRules(
    max_prompt=32000,
    max_n=10,
    sizes=SizeRule(fixed=frozenset({"auto"}), free=True, min_edge=64, max_edge=8192, max_aspect=4.0),
    default_size="auto",
    qualities=frozenset({"standard", "auto"}),
    backgrounds=frozenset({"opaque", "auto"}),
    moderations=frozenset({"auto"}),
    stream=False,
    extensions=frozenset({"seed"}),
)

FAMILIES: dict[str, FamilyRules] = {
    "dall-e-2": FamilyRules(
        max_prompt=1000,
        max_n=10,
        sizes=SizeRule(fixed=frozenset({"256x256", "512x512", "1024x1024"})),
        default_size="1024x1024",
        qualities=frozenset({"standard", "auto"}),
        output_formats=frozenset(),
        backgrounds=frozenset(),
        moderations=frozenset(),
        compression=False,
        stream=False,
        extensions=frozenset(),
    ),
    "dall-e-3": FamilyRules(
        max_prompt=4000,
        max_n=1,
        sizes=SizeRule(fixed=frozenset({"1024x1024", "1792x1024", "1024x1792"})),
        default_size="1024x1024",
        qualities=frozenset({"standard", "hd", "auto"}),
        styles=frozenset({"vivid", "natural"}),
        output_formats=frozenset(),
        backgrounds=frozenset(),
        moderations=frozenset(),
        compression=False,
        stream=False,
        extensions=frozenset(),
    ),
    "gpt-image": GPT_IMAGE,
    "gpt-image-2": FamilyRules(
        max_prompt=32000,
        max_n=10,
        sizes=SizeRule(
            fixed=frozenset({"auto"}),
            free=True,
            multiple_of=16,
            min_edge=16,
            max_edge=3840,
            max_pixels=3840 * 2160,
            max_aspect=3.0,
        ),
        default_size="auto",
        qualities=GPT_IMAGE.qualities,
        extensions=frozenset(),
    ),
    # ByteDance Seedream 4.0 (Volcengine Ark image generation API): a resolution tier, or WIDTHxHEIGHT with
    # 1280x720 to 4096x4096 pixels in all and an aspect ratio within 1:16..16:1. The upstream counts the
    # prompt in tokens and refuses a long one itself.
    "seedream": FamilyRules(
        max_prompt=32000,
        max_n=10,
        sizes=SizeRule(fixed=frozenset({"1K", "2K", "4K"}), free=True, max_edge=16384,
                       min_pixels=1280 * 720, max_pixels=4096 * 4096, max_aspect=16.0),
        default_size="2K",
        qualities=frozenset({"auto"}),
        backgrounds=frozenset({"opaque", "auto"}),
        moderations=frozenset(),
        stream=False,
        extensions=frozenset({"seed", "watermark"}),
    ),
    # Zhipu / Z.ai CogView-4 (images/generations): the recommended sizes, or any custom size with 512-2048 px
    # edges divisible by 16 and at most 2^21 pixels.
    "cogview": FamilyRules(
        max_prompt=32000,
        max_n=10,
        sizes=SizeRule(fixed=frozenset({"1024x1024", "768x1344", "864x1152", "1344x768", "1152x864",
                                        "1440x720", "720x1440"}),
                       free=True, multiple_of=16, min_edge=512, max_edge=2048, max_pixels=2**21),
        default_size="1024x1024",
        qualities=frozenset({"standard", "hd", "auto"}),
        backgrounds=frozenset({"opaque", "auto"}),
        moderations=frozenset(),
        stream=False,
        extensions=frozenset(),
    ),
    "gemini": GEMINI_IMAGE,
    # Imagen on the Gemini API: like Gemini with fewer aspect ratios and no seed; the upstream counts the
    # prompt in tokens and refuses a long one itself.
    "imagen": replace(GEMINI_IMAGE, extensions=frozenset()),
    # Anything-goes rules for back ends that draw at any size: the offline renderer, ComfyUI, test doubles.
    "generic": FamilyRules(
        max_prompt=32000,
        max_n=10,
        sizes=SizeRule(fixed=frozenset({"auto"}), free=True, min_edge=16, max_edge=4096, max_pixels=4096 * 4096),
        default_size="1024x1024",
        styles=frozenset({"vivid", "natural"}),
    ),
}


CAPABILITIES = ("generation", "edit", "variation", "streaming", "progress")

# What each provider type can do: shown on /v1/models and checked before a job reaches a provider.
PROVIDER_CAPABILITIES: dict[str, frozenset[str]] = {
    "local": frozenset({"generation", "edit", "variation", "streaming", "progress"}),
    "openai": frozenset({"generation", "edit", "variation", "streaming"}),
    "gemini": frozenset({"generation", "edit"}),
    "openrouter": frozenset({"generation", "edit"}),
    "doubao": frozenset({"generation", "edit"}),
    "zai": frozenset({"generation"}),
    "comfyui": frozenset({"generation", "edit", "streaming", "progress"}),
}


def family_rules(family: str) -> FamilyRules:
    try:
        return FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(sorted(FAMILIES))}") from None


def _check_option(param: str, value: str | None, allowed: frozenset[str], model: str) -> None:
    if value is None:
        return
    if not allowed:
        raise InvalidRequest(f"'{param}' is not supported by model '{model}'.", param=param,
                             code="unsupported_parameter")
    if value not in allowed:
        raise InvalidRequest(
            f"Invalid value for '{param}': '{value}' is not supported by model '{model}'; "
            f"supported values are {', '.join(sorted(allowed))}.",
            param=param,
        )


def resolve_spec(
    request: ImageGenerationRequest,
    model: str,
    rules: FamilyRules,
    default_response_format: ResponseFormat,
) -> ImageSpec:
    """Apply a family's rules to a parsed request: a 400 naming the parameter, or the spec with defaults filled."""
    if len(request.prompt) > rules.max_prompt:
        raise InvalidRequest(
            f"Invalid 'prompt': string too long. Expected a string with maximum length {rules.max_prompt} "
            f"for model '{model}', but got a string with length {len(request.prompt)} instead.",
            param="prompt",
            code="string_above_max_length",
        )
    n = request.n or 1
    if n > rules.max_n:
        raise InvalidRequest(
            f"Invalid 'n': model '{model}' supports at most n={rules.max_n}.", param="n", code="integer_above_max_value"
        )
    size = request.size or rules.default_size
    reason = rules.sizes.check(size)
    if reason is not None:
        raise InvalidRequest(f"Invalid value for 'size': '{size}' is not supported by model '{model}'; {reason}.",
                             param="size")
    _check_option("quality", request.quality, rules.qualities, model)
    _check_option("style", request.style, rules.styles, model)
    _check_option("output_format", request.output_format, rules.output_formats, model)
    _check_option("background", request.background, rules.backgrounds, model)
    _check_option("moderation", request.moderation, rules.moderations, model)
    for param in EXTENSIONS:
        if getattr(request, param) is not None and param not in rules.extensions:
            raise InvalidRequest(f"'{param}' is not supported by model '{model}'.", param=param,
                                 code="unsupported_parameter")
    output_format = request.output_format or "png"
    if request.output_compression is not None:
        if not rules.compression:
            raise InvalidRequest(f"'output_compression' is not supported by model '{model}'.",
                                 param="output_compression", code="unsupported_parameter")
        if output_format not in COMPRESSED_FORMATS:
            raise InvalidRequest("'output_compression' is only supported with output_format 'jpeg' or 'webp'.",
                                 param="output_compression")
    if request.background == "transparent" and output_format not in TRANSPARENT_FORMATS:
        raise InvalidRequest("A transparent background needs output_format 'png' or 'webp'.", param="background")
    if (request.stream or request.partial_images is not None) and not rules.stream:
        param = "stream" if request.stream else "partial_images"
        raise InvalidRequest(f"'{param}' is not supported by model '{model}'.", param=param,
                             code="unsupported_parameter")
    return ImageSpec(
        model=model,
        prompt=request.prompt,
        n=n,
        size=size,
        quality=request.quality,
        style=request.style,
        user=request.user,
        background=request.background,
        output_format=output_format,
        output_compression=request.output_compression,
        moderation=request.moderation,
        partial_images=request.partial_images or 0,
        stream=bool(request.stream),
        seed=request.seed,
        negative_prompt=request.negative_prompt,
        watermark=request.watermark,
        response_format=request.response_format or default_response_format,
        webhook_url=request.webhook_url,
    )
