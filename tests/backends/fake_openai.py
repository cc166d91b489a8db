"""A small fake OpenAI-compatible server (aiohttp on loopback) for the HTTP backend's tests.

It streams chat and plain completions the way vLLM / llama.cpp do (SSE `data:` lines, a usage
chunk, `[DONE]`), answers the kv task from the prompt itself (finds the asked key's value), and
simulates a prefix cache: `cached_tokens` is the longest prefix (in whitespace words) shared with
any earlier prompt, and the first token waits `prefill_s_per_token` per uncached word. Knobs inject
failures: HTTP errors for the first requests, a hang, a mid-stream error, an API key, no
/v1/models. It records every request and the most requests in flight at once.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

KV_QUESTION = re.compile(r'key "([0-9a-f-]{36})"')


def kv_oracle(prompt: str) -> str:
    """The value of the key the last question asks about, read from the prompt; else a refusal."""
    asked = KV_QUESTION.findall(prompt)
    if asked:
        found = re.search(re.escape(f'"{asked[-1]}": "') + r"([0-9a-f-]{36})", prompt)
        if found:
            return found.group(1)
    return "I do not know."


@dataclass
class FakeOpenAI:
    models: list[str] = field(default_factory=lambda: ["fake-model"])
    answer: Any = kv_oracle  # prompt text -> answer text
    prefill_s_per_token: float = 0.0
    chunk_delay_s: float = 0.0  # between streamed content chunks
    fail_first: int = 0  # the first N completion requests fail with fail_status
    fail_status: int = 503
    retry_after: str | None = None
    hang_s: float = 0.0  # completion requests wait this long before answering
    error_mid_stream: bool = False
    api_key: str | None = None
    list_models: bool = True
    llama_timings: bool = False  # add llama.cpp's `timings` to the last chunk
    requests: list[dict[str, Any]] = field(default_factory=list)
    max_in_flight: int = 0

    # ---- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> FakeOpenAI:
        self._seen: list[list[str]] = []
        self._in_flight = 0
        self._failures = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._complete)
        app.router.add_post("/v1/completions", self._complete)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # ---- handlers ---------------------------------------------------------------------------

    def _authorized(self, request: web.Request) -> bool:
        return self.api_key is None or request.headers.get("Authorization") == f"Bearer {self.api_key}"

    async def _models(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": {"message": "invalid api key"}}, status=401)
        if not self.list_models:
            return web.json_response({"error": {"message": "not found"}}, status=404)
        return web.json_response(
            {"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]}
        )

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        chat = request.path.endswith("/chat/completions")
        self.requests.append({"path": request.path, "body": body, "at": time.perf_counter()})
        if not self._authorized(request):
            return web.json_response({"error": {"message": "invalid api key"}}, status=401)
        if body.get("model") not in self.models:
            return web.json_response(
                {"error": {"message": f"The model `{body.get('model')}` does not exist."}}, status=404
            )
        if self._failures < self.fail_first:
            self._failures += 1
            headers = {"Retry-After": self.retry_after} if self.retry_after is not None else {}
            return web.json_response(
                {"error": {"message": "overloaded"}}, status=self.fail_status, headers=headers
            )
        self._in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            return await self._stream(request, body, chat)
        finally:
            self._in_flight -= 1

    async def _stream(self, request: web.Request, body: dict[str, Any], chat: bool) -> web.StreamResponse:
        if self.hang_s:
            await asyncio.sleep(self.hang_s)
        prompt = "\n".join(m["content"] for m in body["messages"]) if chat else body["prompt"]
        words = prompt.split()
        cached = max((_common_prefix(words, seen) for seen in self._seen), default=0)
        self._seen.append(words)
        started = time.perf_counter()
        await asyncio.sleep(self.prefill_s_per_token * (len(words) - cached))
        prompt_ms = (time.perf_counter() - started) * 1000
        answer_words = self.answer(prompt).split(" ")[: body.get("max_tokens", 16)]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        async def send(payload: dict[str, Any]) -> None:
            await response.write(f"data: {json.dumps(payload)}\n\n".encode())

        kind = "chat.completion.chunk" if chat else "text_completion"
        if chat:
            await send({"object": kind, "choices": [{"index": 0, "delta": {"role": "assistant"}}]})
        await response.write(b": keep-alive comment\n\n")
        for index, word in enumerate(answer_words):
            if index:
                await asyncio.sleep(self.chunk_delay_s)
            text = word if index == 0 else " " + word
            choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
            await send({"object": kind, "choices": [choice]})
            if self.error_mid_stream:
                await send({"error": {"message": "slot crashed"}})
                return response
        last: dict[str, Any] = {"object": kind, "choices": [{"index": 0, "finish_reason": "stop",
                                                             **({"delta": {}} if chat else {"text": ""})}]}
        if self.llama_timings:
            last["timings"] = {"cache_n": cached, "prompt_n": len(words) - cached, "prompt_ms": prompt_ms,
                               "predicted_n": len(answer_words), "predicted_per_second": 123.0}
        await send(last)
        usage = {"prompt_tokens": len(words), "completion_tokens": len(answer_words),
                 "total_tokens": len(words) + len(answer_words),
                 "prompt_tokens_details": {"cached_tokens": cached}}
        if (body.get("stream_options") or {}).get("include_usage"):
            await send({"object": kind, "choices": [], "usage": usage})
        await response.write(b"data: [DONE]\n\n")
        return response


def _common_prefix(a: list[str], b: list[str]) -> int:
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count
