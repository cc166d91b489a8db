"""Redis tier (redis-py): chunk values with a TTL, pipelined reads.

SET is atomic in Redis, so readers never see part of a value; values expire after `ttl_s`
(refreshed on read). Connection errors and timeouts raise `StoreUnavailable`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvlife.store.base import Backend, StoreError, StoreUnavailable

PREFIX = "kvlife:chunk:"


class RedisBackend(Backend):
    def __init__(self, url: str = "redis://127.0.0.1:6379/0", ttl_s: int = 24 * 3600, timeout_s: float = 5.0,
                 prefix: str = PREFIX) -> None:
        try:
            import redis
        except ImportError:
            raise StoreError("the redis tier needs redis-py: pip install redis") from None
        self.name = f"redis({url})"
        self.ttl_s = ttl_s
        self.prefix = prefix
        self._errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
        self._redis_error = redis.exceptions.RedisError
        try:
            self.client = redis.Redis.from_url(url, socket_timeout=timeout_s,
                                               socket_connect_timeout=timeout_s)
        except ValueError as exc:
            raise StoreError(f"bad redis URL {url!r}: {exc}") from None

    def _call(self, fn):
        try:
            return fn()
        except self._errors as exc:
            raise StoreUnavailable(f"{self.name} unreachable: {exc}") from None
        except self._redis_error as exc:
            raise StoreUnavailable(f"{self.name} refused: {exc}") from None

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        def run():
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.getex(self.prefix + key, ex=self.ttl_s)
            return pipe.execute()

        return self._call(run) if keys else []

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        def run():
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.exists(self.prefix + key)
            return [bool(n) for n in pipe.execute()]

        return self._call(run) if keys else []

    def put(self, key: str, blob: bytes) -> None:
        self._call(lambda: self.client.set(self.prefix + key, blob, ex=self.ttl_s))

    def delete(self, key: str) -> None:
        self._call(lambda: self.client.delete(self.prefix + key))

    def stats(self) -> dict[str, Any]:
        info = self._call(lambda: self.client.info("memory"))
        return {"used_memory": info.get("used_memory"), "ttl_s": self.ttl_s}

    def close(self) -> None:
        self.client.close()
