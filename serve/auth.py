"""API keys: Bearer keys on `/v1/*`, a separate admin key for `/admin/*`, and where to bind.

Keys come from `http.api_keys` / `http.admin_keys` and the environment variables the config
names (`HttpConfig.resolved_keys`). With no API key configured the API is open, so the server
binds to 127.0.0.1 only, whatever `http.host` says, and logs that it does. Admin calls need an
admin key; when no admin key is configured they are allowed only in that open loopback mode.
Keys are compared in constant time.
"""

from __future__ import annotations

import hmac
import logging

from senmon.config import HttpConfig
from senmon.serve.errors import ApiError

log = logging.getLogger("senmon.serve")
LOOPBACK = "127.0.0.1"


class Keys:
    def __init__(self, api_keys: list[str], admin_keys: list[str]):
        self.api_keys, self.admin_keys = list(api_keys), list(admin_keys)

    @classmethod
    def from_config(cls, http: HttpConfig) -> "Keys":
        return cls(*http.resolved_keys())

    @property
    def open(self) -> bool:
        return not self.api_keys

    @staticmethod
    def _bearer(authorization: str | None) -> str | None:
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None

    @staticmethod
    def _matches(token: str, keys: list[str]) -> bool:
        return any(hmac.compare_digest(token.encode(), key.encode()) for key in keys)

    def check_api(self, authorization: str | None) -> str | None:
        """401 unless the header carries a valid key; returns that key (None when the API is open)."""
        if self.open:
            return None
        token = self._bearer(authorization)
        if token is None:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        if not self._matches(token, self.api_keys + self.admin_keys):
            raise ApiError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return token

    def check_admin(self, authorization: str | None) -> None:
        if not self.admin_keys:
            if self.open:
                return
            raise ApiError(403, "admin endpoints are disabled: no admin key is configured (http.admin_keys)",
                           code="admin_disabled")
        token = self._bearer(authorization)
        if token is None:
            raise ApiError(401, "missing admin key: send 'Authorization: Bearer <admin key>'", code="missing_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        if not self._matches(token, self.admin_keys):
            raise ApiError(403, "this key may not call admin endpoints", code="not_admin")


def bind_host(http: HttpConfig) -> str:
    """The address to listen on: the configured host with keys, loopback only without."""
    api_keys, _ = http.resolved_keys()
    if api_keys:
        return http.host
    if http.host != LOOPBACK:
        log.warning("no API keys configured: serving on %s only (not %s); set http.api_keys or $%s to open it",
                    LOOPBACK, http.host, http.api_keys_env)
    else:
        log.warning("no API keys configured: the API is open, so it listens on %s only", LOOPBACK)
    return LOOPBACK
