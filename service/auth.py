"""Bearer API keys: who is calling, and which models they may use."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from service.errors import AuthenticationFailed, PermissionDenied
from service.settings import KeyConfig

log = logging.getLogger(__name__)

DEV_OWNER = "dev"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. `owner` keys job ownership: a caller sees only its own jobs and files."""

    owner: str
    name: str
    models: frozenset[str] | None = None

    def check_model(self, model: str) -> None:
        if self.models is not None and model not in self.models:
            raise PermissionDenied(f"This API key may not use model '{model}'.", param="model",
                                   code="model_not_allowed")


def key_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return header.strip() if " " not in header.strip() else None


class KeyRing:
    """Keys from the config file, held only as SHA-256 hashes. Without keys the gateway is in dev mode."""

    def __init__(self, keys: list[KeyConfig]) -> None:
        self._by_hash: dict[str, Principal] = {}
        for key in keys:
            secret = key.secret()
            if not secret:
                raise ValueError(f"key {key.name!r}: environment variable {key.key_env!r} is not set")
            self._by_hash[key_hash(secret)] = Principal(
                owner=f"key:{key.name}", name=key.name, models=frozenset(key.models) if key.models else None
            )

    @property
    def dev_mode(self) -> bool:
        return not self._by_hash

    def lookup(self, token: str | None) -> Principal | None:
        if self.dev_mode:
            return Principal(owner=DEV_OWNER, name=DEV_OWNER)
        if token is None:
            return None
        return self._by_hash.get(key_hash(token))

    def authenticate(self, header: str | None) -> Principal:
        principal = self.lookup(bearer_token(header))
        if principal is None:
            if header:
                raise AuthenticationFailed("Incorrect API key provided.")
            raise AuthenticationFailed(
                "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.", code="missing_api_key"
            )
        return principal
