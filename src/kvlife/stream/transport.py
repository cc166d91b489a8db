"""The streaming client's side of the wire: HTTP requests to `kvlife serve` (httpx, one keep-alive pool).

`get` returns a whole body or raises `TransportError` (unreachable, timed out, cut short, an error
status), and can be given up as the body arrives (`give_up`, the abandonment rules): the caller decides
whether to fetch again or recompute. Anything with its `get`, `put` and `request_json` can stand in for
it (the tests wrap it to lose and corrupt chunks in transit).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx

from kvlife.store.serve_args import STREAM_TOKEN_ENV
from kvlife.stream.context import StreamError

TOKEN_ENV = STREAM_TOKEN_ENV


class TransportError(StreamError):
    """One request failed in transit (or the server answered with an error status)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class DeadlinePassed(TransportError):
    """A request was cut off at its deadline."""


class Abandoned(TransportError):
    """The caller gave up on a request that was too slow (not a failure of the bytes)."""

    def __init__(self, message: str, received: int, seconds: float) -> None:
        super().__init__(message)
        self.received, self.seconds = received, seconds


class HttpTransport:
    def __init__(self, url: str, token: str | None = None, timeout_s: float = 30.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise StreamError(f"bad server URL {url!r}: expected http://HOST:PORT")
        self.url = url.rstrip("/")
        token = token or os.environ.get(TOKEN_ENV)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    def _fail(self, method: str, path: str, response: Any) -> TransportError:
        try:
            message = response.json().get("error", "")
        except Exception:  # noqa: BLE001 - any body: report the status alone
            message = ""
        hint = f"; set the token with --token or ${TOKEN_ENV}" if response.status_code == 401 else ""
        return TransportError(f"{method} {self.url}{path}: {response.status_code} {message}{hint}".rstrip(),
                              response.status_code)

    def get(self, path: str, timeout_s: float | None = None, deadline: float | None = None,
            give_up: Callable[[int, float], bool] | None = None) -> bytes:
        """The body of GET `path`. `deadline` (a `time.perf_counter()` value): drop the connection and raise
        `DeadlinePassed` if the body is not complete by then. `give_up(bytes so far, seconds so far)`: asked
        as the body arrives; True drops the connection and raises `Abandoned` (with what had arrived)."""
        timeout = httpx.Timeout(timeout_s) if timeout_s else None
        try:
            with self.client.stream("GET", path, **({"timeout": timeout} if timeout else {})) as response:
                if response.status_code != 200:
                    response.read()
                    raise self._fail("GET", path, response)
                pieces, received, started = [], 0, time.perf_counter()
                for piece in response.iter_bytes():
                    pieces.append(piece)
                    received += len(piece)
                    now = time.perf_counter()
                    if deadline is not None and now > deadline:
                        raise DeadlinePassed(f"GET {path}: deadline passed")
                    if give_up is not None and give_up(received, now - started):
                        raise Abandoned(
                            f"GET {path}: abandoned after {received} bytes", received, now - started
                        )
                body = b"".join(pieces)
                expected = response.headers.get("content-length")
                if expected is not None and int(expected) != len(body):
                    raise TransportError(f"GET {path}: {len(body)} of {expected} bytes")
                return body
        except httpx.ConnectError as exc:
            raise TransportError(
                f"cannot reach {self.url} (is `kvlife serve` running there?): {exc}"
            ) from None
        except httpx.HTTPError as exc:
            raise TransportError(f"GET {self.url}{path}: {type(exc).__name__}: {exc}") from None

    def put(self, path: str, parts: Sequence[bytes]) -> dict:
        try:
            response = self.client.put(path, content=iter(parts), timeout=None,
                                       headers={"Content-Type": "application/octet-stream"})
        except httpx.HTTPError as exc:
            raise TransportError(f"PUT {self.url}{path}: {type(exc).__name__}: {exc}") from None
        if response.status_code >= 300:
            raise self._fail("PUT", path, response)
        return response.json()

    def request_json(self, method: str, path: str, body: Any = None) -> dict:
        try:
            response = self.client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise TransportError(f"{method} {self.url}{path}: {type(exc).__name__}: {exc}") from None
        if response.status_code >= 300:
            raise self._fail(method, path, response)
        return response.json()

    def close(self) -> None:
        self.client.close()
