"""The registry of provider types, by the `type` name used in the config file."""

from workers.providers.base import Provider
from workers.providers.local import LocalRenderer

PROVIDER_TYPES: dict[str, type[Provider]] = {
    LocalRenderer.type: LocalRenderer,
}
