"""The benchmark against any OpenAI-compatible server (vLLM, SGLang, llama.cpp's llama-server, ...).

Modes map onto plain API requests, so the engine's own prefix cache does the reuse:
- multi-turn: one growing chat. Turn 1 sends `context + "\\n\\n" + query 1` as the user message;
  each later turn appends the previous answer (the reference, or with own_answers the model's)
  as the assistant message and the next query as a user message.
- multi-request: every query is a separate request `context + "\\n\\n" + query`; the requests
  share the context as their prefix.
With `prompt_format="plain"` the same text goes to /v1/completions without a chat template
(`context\\n\\n query\\n answer\\n\\n ...`, as kvlife's plain format).

Every request streams (`stream_options.include_usage`), which gives the time to the first token.
Recorded per turn: TTFT and total latency seen by the client, the usage counts, and the number of
prompt tokens the server served from its cache: `usage.prompt_tokens_details.cached_tokens`
(OpenAI's field; vLLM with --enable-prompt-tokens-details, SGLang, llama.cpp), else llama.cpp's
`timings.cache_n`. llama.cpp's `timings` also give the server-side prompt time and decode speed.

Decoding is greedy (temperature 0). The server's cache and attention are its own: there is no
recipe to apply (the method is `dense`), no K/V bytes to read, and no teacher-forced NLL.

Connection errors, timeouts, 408/409/425/429 and 5xx are retried with exponential backoff
(Retry-After is honoured, capped); anything else fails at once with the server's message.
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from kvlife.backends.base import RunSettings
from kvlife.errors import BackendError
from kvlife.session import MODES, TurnResult

RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
MAX_BACKOFF_S = 30.0


def api_root(base_url: str) -> str:
    """`http://host:port` or `http://host:port/v1` -> the URL that /chat/completions hangs from."""
    url = (base_url or "").strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise BackendError("--base-url must be an http:// or https:// URL (e.g. http://127.0.0.1:8000/v1), "
                           f"got {base_url!r}")
    return url if url.endswith("/v1") else url + "/v1"


@dataclass
class Completion:
    """One streamed completion as the client saw it."""

    text: str
    ttft_s: float  # request sent -> first content token (or -> end, when the answer is empty)
    latency_s: float  # request sent -> last byte
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None  # prompt tokens the server served from its cache
    finish_reason: str | None = None
    timings: dict[str, Any] = field(default_factory=dict)  # llama.cpp's server-side timings
    attempts: int = 1


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


def _server_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except (ValueError, json.JSONDecodeError):
        return response.text.strip()[:300] or response.reason_phrase
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict):
        return str(error.get("message") or error.get("detail") or error)[:300]
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])[:300]
    return str(error)[:300]


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers.get("retry-after", ""))
    except ValueError:
        return None


def cached_tokens_of(usage: dict[str, Any] | None, timings: dict[str, Any] | None) -> int | None:
    details = (usage or {}).get("prompt_tokens_details") or {}
    if isinstance(details, dict) and details.get("cached_tokens") is not None:
        return int(details["cached_tokens"])
    if timings and timings.get("cache_n") is not None:
        return int(timings["cache_n"])
    return None


class OpenAIClient:
    """A thread-safe client for one model on one OpenAI-compatible server (httpx, keep-alive)."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout_s: float = 600.0,
                 retries: int = 3, backoff_s: float = 0.5, max_connections: int = 8,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.root = api_root(base_url)
        self.model = model
        self.retries = max(0, retries)
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(
            base_url=self.root, headers=headers, transport=transport,
            # read= is the longest wait between two bytes: a long prefill sends nothing until its first token
            timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )
        self._rng = random.Random()
        self._lock = threading.Lock()

    def close(self) -> None:
        self.http.close()

    # ---- retries -------------------------------------------------------------------------------

    def _call(self, what: str, attempt_fn):
        last = ""
        for attempt in range(self.retries + 1):
            wait = None
            try:
                return attempt_fn(attempt + 1)
            except _Retryable as exc:
                last, wait = str(exc), exc.retry_after
            except httpx.TimeoutException as exc:
                last = f"timed out ({type(exc).__name__}, --timeout {self.timeout_s:g} s)"
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc or 'connection failed'}"
            if attempt == self.retries:
                break
            with self._lock:
                jitter = self._rng.uniform(0.0, 0.25)
            delay = min(MAX_BACKOFF_S, self.backoff_s * 2 ** attempt) * (1.0 + jitter)
            time.sleep(min(MAX_BACKOFF_S, wait) if wait is not None else delay)
        tries = f"{self.retries + 1} attempts" if self.retries else "1 attempt"
        raise BackendError(f"{what} at {self.root} failed after {tries}: {last}; is the server up "
                           f"(check --base-url)? Rows written so far are kept; rerun to resume")

    def _check_status(self, response: httpx.Response, what: str) -> None:
        if response.status_code < 400:
            return
        response.read()
        message = _server_message(response)
        if response.status_code in RETRY_STATUSES:
            raise _Retryable(f"HTTP {response.status_code}: {message}", _retry_after(response))
        if response.status_code in (401, 403):
            raise BackendError(f"the server at {self.root} refused the request (HTTP {response.status_code}: "
                               f"{message}); pass --api-key (or set OPENAI_API_KEY)")
        if response.status_code == 404:
            raise BackendError(f"{what}: HTTP 404 from {self.root} ({message}); check --model {self.model!r} "
                               f"and --base-url")
        raise BackendError(f"{what}: HTTP {response.status_code} from {self.root}: {message}")

    # ---- endpoints -----------------------------------------------------------------------------

    def list_models(self) -> list[str] | None:
        """The model ids the server lists, or None when it has no /v1/models."""

        def attempt(_: int) -> list[str] | None:
            response = self.http.get("/models")
            if response.status_code in (404, 405, 501):
                return None
            self._check_status(response, "GET /models")
            try:
                data = response.json().get("data", [])
                return [str(item["id"]) for item in data if isinstance(item, dict) and "id" in item]
            except (ValueError, AttributeError, TypeError):
                raise BackendError(f"{self.root}/models did not answer with an OpenAI model list; "
                                   f"is --base-url an OpenAI-compatible server?") from None

        return self._call("GET /models", attempt)

    def check_model(self) -> list[str] | None:
        served = self.list_models()
        if served is not None and self.model not in served:
            raise BackendError(f"the server at {self.root} does not serve model {self.model!r}; it serves: "
                               f"{', '.join(served) or '(none)'} (pass one of them as --model)")
        return served

    def complete(self, max_tokens: int, messages: list[dict[str, str]] | None = None,
                 prompt: str | None = None) -> Completion:
        """One greedy streamed completion: chat when `messages` are given, else plain `prompt`."""
        chat = messages is not None
        body: dict[str, Any] = {"model": self.model, "max_tokens": max_tokens, "temperature": 0.0,
                                "stream": True, "stream_options": {"include_usage": True}}
        if chat:
            body["messages"] = messages
        else:
            body["prompt"] = prompt
        path = "/chat/completions" if chat else "/completions"
        return self._call(f"POST {path}", lambda attempt: self._stream(path, body, chat, attempt))

    def _stream(self, path: str, body: dict[str, Any], chat: bool, attempt: int) -> Completion:
        parts: list[str] = []
        usage: dict[str, Any] | None = None
        timings: dict[str, Any] = {}
        finish_reason = None
        first_token_at = None
        started = time.perf_counter()
        with self.http.stream("POST", path, json=body) as response:
            self._check_status(response, f"POST {path}")
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue  # SSE comments, event names, keep-alives
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                try:
                    chunk = json.loads(payload)
                except json.JSONDecodeError:
                    raise _Retryable(f"a malformed stream chunk: {payload[:80]!r}") from None
                if isinstance(chunk, dict) and chunk.get("error"):
                    error = chunk["error"]
                    raise BackendError(f"POST {path}: the server reported an error mid-stream: "
                                       f"{error.get('message', error) if isinstance(error, dict) else error}")
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if text:
                        if first_token_at is None:
                            first_token_at = time.perf_counter()
                        parts.append(text)
                    finish_reason = choice.get("finish_reason") or finish_reason
                usage = chunk.get("usage") or usage
                timings = chunk.get("timings") or timings
        ended = time.perf_counter()
        return Completion(
            text="".join(parts), ttft_s=(first_token_at or ended) - started, latency_s=ended - started,
            prompt_tokens=(usage or {}).get("prompt_tokens"),
            completion_tokens=(usage or {}).get("completion_tokens"),
            cached_tokens=cached_tokens_of(usage, timings), finish_reason=finish_reason, timings=timings,
            attempts=attempt,
        )


class ChatSession:
    """One shared context at a time, as requests to the server (see the module docstring)."""

    def __init__(self, client: OpenAIClient, mode: str = "multi-turn", own_answers: bool = False,
                 prompt_format: str = "chat") -> None:
        if mode not in MODES:
            raise BackendError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
        self.client = client
        self.mode = mode
        self.own_answers = own_answers
        self.chat = prompt_format != "plain"
        self.context = ""
        self.history: list[dict[str, str]] = []  # multi-turn chat so far (before the next query)
        self.prompt_so_far = ""  # multi-turn plain text so far

    @property
    def context_tokens(self) -> int | None:
        return None  # the server tokenizes; usage reports whole prompts only

    def prefill(self, context: str) -> None:
        """Start a new context. Nothing is sent: the first request carries it (and warms the cache)."""
        self.context = context
        self.history = []
        self.prompt_so_far = ""
        return None

    def _request(self, query: str) -> tuple[list[dict[str, str]] | None, str | None]:
        first = self.mode == "multi-request" or not (self.history or self.prompt_so_far)
        if self.chat:
            content = f"{self.context}\n\n{query}" if first else query
            base = [] if self.mode == "multi-request" else self.history
            return [*base, {"role": "user", "content": content}], None
        text = (f"{self.context}\n\n" if first else self.prompt_so_far) + f"{query}\n"
        return None, text

    def ask(self, query: str, max_new_tokens: int = 64, reference: str | None = None) -> TurnResult:
        messages, prompt = self._request(query)
        started_at = time.time()
        done = self.client.complete(max_new_tokens, messages=messages, prompt=prompt)
        prediction = done.text.strip()
        if self.mode == "multi-turn":
            answer = prediction if (self.own_answers or reference is None) else reference
            if messages is not None:
                self.history = [*messages, {"role": "assistant", "content": answer}]
            else:
                self.prompt_so_far = f"{prompt}{answer}\n\n"
        timings = done.timings
        prefill_s = timings["prompt_ms"] / 1000 if timings.get("prompt_ms") is not None else done.ttft_s
        if timings.get("predicted_per_second"):
            decode_tok_s = float(timings["predicted_per_second"])
        elif done.completion_tokens and done.completion_tokens > 1 and done.latency_s > done.ttft_s:
            decode_tok_s = (done.completion_tokens - 1) / (done.latency_s - done.ttft_s)
        else:
            decode_tok_s = None
        row = {"latency_s": round(done.latency_s, 4), "cached_tokens": done.cached_tokens,
               "finish_reason": done.finish_reason, "attempts": done.attempts,
               "started_at": round(started_at, 3), "finished_at": round(started_at + done.latency_s, 3)}
        if "prompt_n" in timings:
            # llama.cpp: prompt tokens computed (not cached)
            row["server_prompt_tokens"] = timings["prompt_n"]
        return TurnResult(prediction, [], done.prompt_tokens, prefill_s, done.ttft_s, decode_tok_s,
                          done.completion_tokens or 0, None, None, None, stats={"row": row})


class OpenAIBackend:
    """The runner's backend for an OpenAI-compatible server; `concurrency` samples in flight at once."""

    name = "openai"
    tokenizer = None  # the server's own; check() refuses --max-length

    def __init__(self, base_url: str, api_key: str | None = None, concurrency: int = 1,
                 timeout_s: float = 600.0, retries: int = 3, backoff_s: float = 0.5,
                 transport: httpx.BaseTransport | None = None) -> None:
        if concurrency < 1:
            raise BackendError(f"--concurrency must be at least 1, got {concurrency}")
        if timeout_s <= 0:
            raise BackendError(f"--timeout must be positive, got {timeout_s}")
        self.base_url = api_root(base_url)
        self.api_key = api_key
        self.concurrency = concurrency
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.transport = transport
        self.client: OpenAIClient | None = None
        self.served: list[str] | None = None

    def check(self, config: RunSettings, connect: bool = True) -> None:
        if config.method != "dense":
            raise BackendError(f"--method {config.method!r} needs the local backend: a server applies its "
                               "own attention and cache (run --backend openai with the default dense method)")
        if config.max_length:
            raise BackendError("--max-length needs kvlife's tokenizer and is not supported with --backend "
                               "openai; let the server truncate or pick shorter samples")
        if config.recompress:
            raise BackendError("--recompress has no meaning with --backend openai (the server compresses "
                               "nothing)")
        if not connect:
            return
        if self.client is None:
            self.client = OpenAIClient(self.base_url, config.model, self.api_key, self.timeout_s,
                                       self.retries, self.backoff_s, max_connections=self.concurrency,
                                       transport=self.transport)
        self.served = self.client.check_model()

    def describe(self) -> dict[str, Any]:
        return {"backend": {"name": self.name, "base_url": self.base_url, "served_models": self.served,
                            "concurrency": self.concurrency, "timeout_s": self.timeout_s,
                            "retries": self.retries}}

    def prepare(self, config: RunSettings) -> None:
        pass  # the server holds the model

    def open_session(self, config: RunSettings) -> ChatSession:
        assert self.client is not None, "check() first"
        return ChatSession(self.client, config.mode, config.own_answers, config.prompt_format)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
