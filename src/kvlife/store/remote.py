"""Remote tier: a client of `kvlife serve` over HTTP (httpx, one keep-alive connection pool).

The bearer token decides the tenant on the server; a wrong token or an unreachable server raises
`StoreUnavailable`, which the tiered store turns into a recompute and one warning.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from kvlife.store.base import Backend, StoreError, StoreUnavailable, check_key

TOKEN_ENV = "KVLIFE_STORE_TOKEN"


class RemoteBackend(Backend):
    def __init__(self, url: str, token: str | None = None, timeout_s: float = 30.0) -> None:
        try:
            import httpx
        except ImportError:
            raise StoreError("the remote tier needs httpx: pip install httpx") from None
        self.url = url.rstrip("/")
        self.name = f"remote({self.url})"
        token = token or os.environ.get(TOKEN_ENV)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._httpx = httpx
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    def _request(self, method: str, path: str, **kwargs):
        try:
            response = self.client.request(method, path, **kwargs)
        except self._httpx.HTTPError as exc:
            raise StoreUnavailable(f"{self.name} unreachable: {exc}") from None
        if response.status_code in (401, 403):
            raise StoreUnavailable(f"{self.name} rejected the token ({response.status_code}); "
                                   f"set the right one with ?token= or {TOKEN_ENV}")
        if response.status_code >= 400 and response.status_code != 404:
            raise StoreUnavailable(f"{self.name}: {method} {path} -> {response.status_code} "
                                   f"{response.text[:200]}")
        return response

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        out = []
        for key in keys:
            response = self._request("GET", f"/v1/chunks/{check_key(key)}")
            out.append(None if response.status_code == 404 else response.content)
        return out

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        if not keys:
            return []
        response = self._request("POST", "/v1/exists", json={"keys": list(keys)})
        return [bool(x) for x in response.json()["exists"]]

    def put(self, key: str, blob: bytes) -> None:
        self._request("PUT", f"/v1/chunks/{check_key(key)}", content=blob,
                      headers={"Content-Type": "application/octet-stream"})

    def delete(self, key: str) -> None:
        self._request("DELETE", f"/v1/chunks/{check_key(key)}")

    def stats(self) -> dict[str, Any]:
        return self._request("GET", "/v1/stats").json()

    def close(self) -> None:
        self.client.close()
