"""The OpenAI-compatible backend against a fake server on loopback (fast, deterministic)."""

from __future__ import annotations

import json

import pytest
from tests.backends.fake_openai import FakeOpenAI, kv_oracle

from kvlife import cli
from kvlife.backends.loopback import free_port
from kvlife.backends.openai import ChatSession, OpenAIBackend, OpenAIClient, api_root, cached_tokens_of
from kvlife.bench import runner
from kvlife.bench.report import write_html
from kvlife.bench.runner import BenchConfig
from kvlife.errors import BackendError


@pytest.fixture
def small_profile(monkeypatch):
    from kvlife.bench.tasks.kv import KVRetrieval

    monkeypatch.setitem(KVRetrieval.profiles, "test",
                        {"samples": 3, "pairs": 2, "turns": 2, "context_tokens": 60, "dense_json": False})


def _config(url: str, mode: str = "multi-turn", **kwargs) -> BenchConfig:
    return BenchConfig(
        model="fake-model", tasks=["kv"], mode=mode, profile="test", backend="openai", base_url=url, **kwargs
    )


def _run(fake: FakeOpenAI, tmp_path, mode="multi-turn", out=None, concurrency=1, retries=0, **kwargs):
    backend = OpenAIBackend(fake.url, concurrency=concurrency, retries=retries, backoff_s=0.01,
                            api_key=kwargs.pop("api_key", None), timeout_s=kwargs.pop("timeout_s", 10.0))
    return runner.run(
        _config(fake.url, mode, **kwargs), out=out or tmp_path / "run", progress=False, backend=backend
    )


def _user_texts(request: dict) -> list[str]:
    return [m["content"] for m in request["body"]["messages"] if m["role"] == "user"]


def test_api_root_accepts_both_spellings():
    assert api_root("http://127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert api_root("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000/v1"
    with pytest.raises(BackendError, match="http://"):
        api_root("127.0.0.1:8000")


def test_cached_tokens_prefers_the_openai_field_then_llama_cpp_timings():
    assert cached_tokens_of({"prompt_tokens_details": {"cached_tokens": 7}}, {"cache_n": 3}) == 7
    assert cached_tokens_of({"prompt_tokens": 9}, {"cache_n": 3}) == 3
    assert cached_tokens_of({"prompt_tokens": 9, "prompt_tokens_details": None}, {}) is None


def test_multi_turn_is_a_growing_chat_and_writes_a_run(tmp_path, small_profile):
    with FakeOpenAI() as fake:
        out = _run(fake, tmp_path)
    samples = runner.get_task("kv").samples("test")
    assert len(fake.requests) == 6
    first, second = fake.requests[0]["body"], fake.requests[1]["body"]
    context, turns = samples[0].context, samples[0].turns
    assert first["messages"] == [{"role": "user", "content": f"{context}\n\n{turns[0].query}"}]
    # turn 2 carries turn 1 and the reference answer (golden, SCBench's default) as the assistant's
    assert second["messages"] == [*first["messages"], {"role": "assistant", "content": turns[0].answer},
                                  {"role": "user", "content": turns[1].query}]
    assert (
        first["stream"] is True
        and first["temperature"] == 0.0
        and first["max_tokens"] == samples[0].max_new_tokens
    )
    config = json.loads((out / "config.json").read_text())
    assert config["identity"]["backend"] == "openai" and config["identity"]["base_url"] == fake.url
    assert config["backend"]["served_models"] == ["fake-model"] and "torch" in config["versions"]
    rows = runner.read_rows(out / "predictions.jsonl")
    # the fake reads the answer from the prompt
    assert len(rows) == 6 and all(r["score"] == 1.0 for r in rows)
    for row in rows:
        assert (
            row["ttft_s"] <= row["latency_s"] and row["cache_bytes"] is None and row["reference_nll"] is None
        )
        assert row["prompt_tokens"] > 0 and row["new_tokens"] == 1 and row["attempts"] == 1
    # turn 2 of a chat repeats turn 1's prompt: the (fake) engine reports it as cached
    assert all(r["cached_tokens"] > 0 for r in rows if r["turn"] == 2)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tasks"]["kv"]["all_turns"] == 1.0 and summary["overall"]["requests_per_s"] > 0
    assert set(summary["tasks"]["kv"]["ttft_s_per_turn"]) == {"1", "2"}
    page = write_html([out], tmp_path / "report.html")  # `kvlife report` works on it unchanged
    assert "openai" in page.read_text()


def test_own_answers_feed_back_the_servers_answer(tmp_path, small_profile):
    with FakeOpenAI(answer=lambda prompt: "not sure") as fake:
        _run(fake, tmp_path, own_answers=True)
    assert fake.requests[1]["body"]["messages"][1] == {"role": "assistant", "content": "not sure"}


def _shared_words(a: str, b: str) -> int:
    """Whitespace words two texts open with, the fake server's unit of prefix caching."""
    count = 0
    for x, y in zip(a.split(), b.split()):
        if x != y:
            break
        count += 1
    return count


def test_multi_request_sends_separate_requests_that_share_the_context(tmp_path, small_profile):
    with FakeOpenAI(prefill_s_per_token=0.002) as fake:
        out = _run(fake, tmp_path, mode="multi-request")
    samples = runner.get_task("kv").samples("test")
    for request, (sample, turn) in zip(fake.requests, [(s, t) for s in samples for t in s.turns]):
        assert request["body"]["messages"] == [
            {"role": "user", "content": f"{sample.context}\n\n{turn.query}"}
        ]
    rows = runner.read_rows(out / "predictions.jsonl")
    first_of_sample = [r for r in rows if r["turn"] == 1]
    later = [r for r in rows if r["turn"] == 2]
    assert first_of_sample[0]["cached_tokens"] == 0  # the first request: nothing cached
    # a new context: only the words every kv context opens with (its instruction) can be cached
    for i, row in enumerate(first_of_sample[1:], start=1):
        opening = max(_shared_words(samples[i].context, samples[j].context) for j in range(i))
        assert 0 < opening < 0.5 * row["prompt_tokens"]
        assert row["cached_tokens"] <= opening
    assert all(r["cached_tokens"] > 0.8 * r["prompt_tokens"] for r in later)  # the shared context
    # the fake holds the first token for 2 ms per uncached word: TTFT comes from the stream
    for row in rows:
        assert row["ttft_s"] >= 0.002 * (row["prompt_tokens"] - row["cached_tokens"])


def test_ttft_is_the_first_content_chunk_not_the_end(tmp_path, small_profile):
    with FakeOpenAI(answer=lambda prompt: "one two three four", chunk_delay_s=0.05) as fake:
        out = _run(fake, tmp_path, mode="multi-request", max_turns=1, samples=1)
    row = runner.read_rows(out / "predictions.jsonl")[0]
    assert row["prediction"] == "one two three four" and row["new_tokens"] == 4
    # three 50 ms gaps follow the first chunk (10% slack: rows round times to 0.1 ms, clocks differ)
    assert row["latency_s"] - row["ttft_s"] >= 3 * 0.05 * 0.9
    assert row["decode_tok_s"] is not None and row["decode_tok_s"] <= 3 / (3 * 0.05 * 0.9)


def test_plain_format_uses_completions_and_grows_the_text(tmp_path, small_profile):
    with FakeOpenAI() as fake:
        out = _run(fake, tmp_path, prompt_format="plain", samples=1)
    sample = runner.get_task("kv").samples("test", 1)[0]
    first, second = (r["body"]["prompt"] for r in fake.requests)
    assert all(r["path"] == "/v1/completions" for r in fake.requests)
    assert first == f"{sample.context}\n\n{sample.turns[0].query}\n"
    assert second == f"{first}{sample.turns[0].answer}\n\n{sample.turns[1].query}\n"
    assert all(r["score"] == 1.0 for r in runner.read_rows(out / "predictions.jsonl"))


def test_llama_cpp_timings_give_server_prompt_time_and_cache(tmp_path, small_profile):
    with FakeOpenAI(llama_timings=True) as fake:
        out = _run(fake, tmp_path, mode="multi-request", samples=1)
    rows = runner.read_rows(out / "predictions.jsonl")
    assert rows[1]["server_prompt_tokens"] == rows[1]["prompt_tokens"] - rows[1]["cached_tokens"]
    assert all(r["decode_tok_s"] == 123.0 for r in rows)


def test_concurrency_keeps_n_samples_in_flight(tmp_path, small_profile):
    with FakeOpenAI(prefill_s_per_token=0.003) as fake:
        out = _run(fake, tmp_path, concurrency=2, samples=4)
    assert fake.max_in_flight == 2
    rows = runner.read_rows(out / "predictions.jsonl")
    assert sorted((r["sample_id"], r["turn"]) for r in rows) == [
        (f"kv-{i}", t) for i in range(4) for t in (1, 2)
    ]
    # each sample's chat still grows turn by turn, whatever ran beside it
    by_context = {}
    for request in fake.requests:
        by_context.setdefault(_user_texts(request)[0], []).append(len(request["body"]["messages"]))
    assert sorted(by_context.values()) == [[1, 3]] * 4


def test_resume_sends_only_missing_samples_and_needs_no_server_when_done(tmp_path, small_profile):
    with FakeOpenAI() as fake:
        out = _run(fake, tmp_path, mode="multi-request")
        path = out / "predictions.jsonl"
        rows = runner.read_rows(path)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["sample_id"] != "kv-2"))
        fake.requests.clear()
        _run(fake, tmp_path, mode="multi-request")
        assert len(fake.requests) == 2 and "kv-2" not in {r["sample_id"] for r in rows[:4]}
        port = fake.port
    assert len(runner.read_rows(path)) == 6
    # complete: rerunning with the server gone recomputes nothing and contacts nothing
    backend = OpenAIBackend(f"http://127.0.0.1:{port}/v1", retries=0)
    runner.run(
        _config(f"http://127.0.0.1:{port}/v1", "multi-request"), out=out, progress=False, backend=backend
    )


def test_transient_errors_are_retried_with_backoff(tmp_path, small_profile):
    with FakeOpenAI(fail_first=2, fail_status=503) as fake:
        out = _run(fake, tmp_path, samples=1, retries=3)
    rows = runner.read_rows(out / "predictions.jsonl")
    assert rows[0]["attempts"] == 3 and rows[1]["attempts"] == 1 and len(fake.requests) == 4
    with FakeOpenAI(fail_first=1, fail_status=429, retry_after="0") as fake:
        assert OpenAIClient(fake.url, "fake-model", retries=1).complete(4, prompt="hi").attempts == 2


def test_errors_after_the_last_retry_say_so(small_profile):
    with FakeOpenAI(fail_first=5, fail_status=502) as fake:
        client = OpenAIClient(fake.url, "fake-model", retries=2, backoff_s=0.01)
        with pytest.raises(BackendError, match="failed after 3 attempts: HTTP 502: overloaded"):
            client.complete(4, messages=[{"role": "user", "content": "hi"}])
        assert len(fake.requests) == 3


def test_a_hung_server_times_out(small_profile):
    with FakeOpenAI(hang_s=1.0) as fake:
        client = OpenAIClient(fake.url, "fake-model", timeout_s=0.3, retries=0)
        with pytest.raises(BackendError, match="timed out"):
            client.complete(4, messages=[{"role": "user", "content": "hi"}])


def test_an_error_mid_stream_is_reported(small_profile):
    with FakeOpenAI(error_mid_stream=True) as fake:
        client = OpenAIClient(fake.url, "fake-model", retries=0)
        with pytest.raises(BackendError, match="slot crashed"):
            client.complete(4, messages=[{"role": "user", "content": "hi"}])


def test_a_server_without_a_model_list_is_still_usable(tmp_path, small_profile):
    with FakeOpenAI(list_models=False) as fake:
        out = _run(fake, tmp_path, samples=1)
        assert len(runner.read_rows(out / "predictions.jsonl")) == 2
        with pytest.raises(BackendError, match="HTTP 404.*check --model 'other'"):
            OpenAIClient(fake.url, "other", retries=0).complete(4, prompt="hi")


def test_methods_other_than_dense_are_refused_before_writing(tmp_path, small_profile):
    with FakeOpenAI() as fake, pytest.raises(BackendError, match="local backend"):
        _run(fake, tmp_path, method="snapkv(ratio=0.5)")
    assert not (tmp_path / "run").exists() and fake.requests == []


def test_chat_session_alone():
    key, value = "11111111-1111-4111-8111-111111111111", "22222222-2222-4222-8222-222222222222"
    with FakeOpenAI() as fake:
        session = ChatSession(OpenAIClient(fake.url, "fake-model"), mode="multi-request")
        assert session.prefill(f'Filler. Record: {{"{key}": "{value}"}}. More filler.') is None
        result = session.ask(f'What is the value associated with the key "{key}"?')
    assert result.prediction == value and kv_oracle("nothing asked") == "I do not know."
    assert result.stats["row"]["latency_s"] > 0 and result.cache_bytes is None


# ---- the command line: one line and exit status 2 --------------------------------------------------

def _cli(capsys, *argv) -> tuple[int, str]:
    code = cli.main(
        ["bench", "--backend", "openai", "--tasks", "kv", "--profile", "test", "--no-progress", *argv]
    )
    return code, capsys.readouterr().err


def test_cli_runs_against_the_server(tmp_path, capsys, small_profile):
    with FakeOpenAI() as fake:
        code, err = _cli(capsys, "--base-url", fake.url, "--model", "fake-model", "--mode", "both",
                         "--concurrency", "2", "--out", str(tmp_path / "runs"))
    assert code == 0 and err == ""
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all(name.startswith("openai-fake-model-dense-") for name in runs)
    assert (
        cli.main(["report", *(str(tmp_path / "runs" / r) for r in runs), "--out", str(tmp_path / "r.html")])
        == 0
    )


def test_cli_wrong_model_name_is_one_line(tmp_path, capsys, small_profile):
    with FakeOpenAI(models=["a-model", "b-model"]) as fake:
        code, err = _cli(
            capsys, "--base-url", fake.url, "--model", "fake-model", "--out", str(tmp_path / "run")
        )
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "does not serve model 'fake-model'; it serves: a-model, b-model" in err
    assert not (tmp_path / "run").exists()


def test_cli_unreachable_server_is_one_line(tmp_path, capsys, small_profile):
    port = free_port()  # a port that nothing listens on
    code, err = _cli(capsys, "--base-url", f"http://127.0.0.1:{port}", "--model", "m", "--retries", "1",
                     "--out", str(tmp_path / "run"))
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"http://127.0.0.1:{port}/v1 failed after 2 attempts: ConnectError" in err and "--base-url" in err


def test_cli_api_key(tmp_path, capsys, small_profile, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with FakeOpenAI(api_key="sesame") as fake:
        code, err = _cli(
            capsys, "--base-url", fake.url, "--model", "fake-model", "--out", str(tmp_path / "a")
        )
        assert code == 2 and "--api-key" in err
        monkeypatch.setenv("OPENAI_API_KEY", "sesame")
        code, err = _cli(capsys, "--base-url", fake.url, "--model", "fake-model", "--samples", "1",
                         "--out", str(tmp_path / "b"))
        assert code == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "needs --base-url"),
        (["--base-url", "http://127.0.0.1:1"], "needs --model"),
        (["--base-url", "http://127.0.0.1:1", "--model", "m", "--concurrency", "0"], "at least 1"),
        (
            ["--base-url", "http://127.0.0.1:1", "--model", "m", "--store", "memory"],
            "--store needs the local backend",
        ),
    ],
)
def test_cli_option_errors(capsys, argv, message):
    code, err = _cli(capsys, *argv)
    assert code == 2 and message in err and err.count("\n") == 1
