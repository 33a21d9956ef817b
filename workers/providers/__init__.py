"""The registry of provider types, by the `type` name used in the config file."""

from workers.providers.base import Provider
from workers.providers.comfyui import ComfyUIProvider
from workers.providers.doubao import DoubaoProvider
from workers.providers.gemini import GeminiProvider
from workers.providers.local import LocalRenderer
from workers.providers.openai import OpenAIProvider
from workers.providers.openrouter import OpenRouterProvider
from workers.providers.zai import ZaiProvider

PROVIDER_TYPES: dict[str, type[Provider]] = {
    LocalRenderer.type: LocalRenderer,
    OpenAIProvider.type: OpenAIProvider,
    GeminiProvider.type: GeminiProvider,
    OpenRouterProvider.type: OpenRouterProvider,
    DoubaoProvider.type: DoubaoProvider,
    ZaiProvider.type: ZaiProvider,
    ComfyUIProvider.type: ComfyUIProvider,
}
