"""Fetching over a real loopback server: levels, recompute, chunks lost or corrupted in transit,
throttling."""

import httpx
import pytest
import torch
from tests.stream.conftest import CHUNK

from kvlife.cache import cache_kwarg
from kvlife.store.envelope import seal_chunk
from kvlife.stream import RECOMPUTE, FetchConfig, StreamClient, StreamError, fetch_into
from kvlife.stream.context import build_context
from kvlife.stream.transport import TransportError


class FaultyLink:
    """Wraps the HTTP transport: corrupts or loses chosen chunks' responses (`faults`: index -> list of
    "corrupt" / "lose", one per fetch of that chunk, consumed in order; `manifest` names the chunks' keys)."""

    def __init__(self, inner, faults, manifest):
        self.inner, self.faults, self.served = inner, {k: list(v) for k, v in faults.items()}, []
        self.index = {
            manifest.chunk_key(level, i): i for level in manifest.levels for i in range(manifest.n_chunks)
        }

    def get(self, path, timeout_s=None, deadline=None, give_up=None):
        data = self.inner.get(path, timeout_s)
        index = self.index.get(path.rsplit("/", 1)[1])
        if index is not None:
            fault = self.faults.get(index, []).pop(0) if self.faults.get(index) else None
            self.served.append((path, fault))
            if fault == "lose":
                raise TransportError(f"GET {path}: connection reset (injected)")
            if fault == "corrupt":
                data = bytearray(data)
                data[len(data) // 2] ^= 0x40
                return bytes(data)
        return data

    def __getattr__(self, name):
        return getattr(self.inner, name)


def layers_of(cache):
    return [(k.float(), v.float(), p) for k, v, p in cache.to_tensors()]


def max_error(cache, reference, start=0, stop=None):
    return max(
        max((a[..., start:stop, :] - b[..., start:stop, :]).abs().max().item() for a, b in zip(x[:2], y[:2]))
        for x, y in zip(layers_of(cache), layers_of(reference))
    )


def test_fixed_level_fetch_rebuilds_the_context(stream_url, published, tiny):
    session, manifest = published
    client = StreamClient(stream_url)
    client.set_trace(None)
    cache, report = client.fetch("tiny-doc", slo=30.0, model=tiny[0], policy="lossless-ish")
    assert report.met and report.options() == ["lossless-ish"] * manifest.n_chunks
    assert cache.tokens_held() == [len(manifest.token_ids)] * len(cache.layers)
    assert cache.next_position == len(manifest.token_ids)
    for _, _, positions in cache.to_tensors():
        assert torch.equal(positions, torch.arange(len(manifest.token_ids)).expand_as(positions))
    assert 0 < max_error(cache, session.cache) < 0.01
    lossy, _ = client.fetch("tiny-doc", slo=30.0, policy="extreme")
    assert max_error(lossy, session.cache) > max_error(cache, session.cache)


def test_adaptive_takes_the_best_level_when_the_link_allows(stream_url, published, tiny):
    client = StreamClient(stream_url)
    client.set_trace(None)
    _, report = client.fetch("tiny-doc", slo=30.0, model=tiny[0])
    assert report.met and set(report.options()) == {"lossless-ish"}


def test_the_planner_settings_reach_the_planner(stream_url, published, monkeypatch):
    from kvlife.stream import client as client_module

    made = []

    class Recording(client_module.Planner):
        def __init__(self, *args, **kwargs):
            made.append(kwargs["config"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(client_module, "Planner", Recording)
    config = FetchConfig(discount=1.3, drop_factor=1.5, step_up_margin=0.0)
    StreamClient(stream_url).fetch("tiny-doc", slo=30.0, config=config)
    assert made[-1] is config
    StreamClient(stream_url).fetch("tiny-doc", slo=30.0)
    assert made[-1].discount == "wide" and made[-1].step_up_margin == 0.1  # the defaults: wide steps, 10%


def test_recompute_policy_equals_one_dense_prefill(stream_url, published, tiny):
    session, manifest = published
    cache, report = StreamClient(stream_url).fetch("tiny-doc", slo=30.0, model=tiny[0], policy=RECOMPUTE)
    assert report.options() == [RECOMPUTE] * manifest.n_chunks and report.bytes < 100_000
    assert max_error(cache, session.cache) < 1e-4


def test_corrupted_chunk_is_fetched_again_never_used(stream_url, published, tiny):
    session, manifest = published
    clean, _ = StreamClient(stream_url).fetch("tiny-doc", slo=30.0, policy="balanced")
    link = FaultyLink(StreamClient(stream_url).transport, {3: ["corrupt"], 5: ["lose"]}, manifest)
    cache, report = StreamClient(link).fetch("tiny-doc", slo=30.0, model=tiny[0], policy="balanced")
    assert report.options() == ["balanced"] * manifest.n_chunks
    assert "SHA-256" in report.chunks[3].failures[0] and "injected" in report.chunks[5].failures[0]
    assert len(report.chunks[3].planned) == 2 and [f for _, f in link.served].count(None) == manifest.n_chunks
    for a, b in zip(cache.to_tensors(), clean.to_tensors()):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_chunk_lost_every_time_is_recomputed_on_the_decoded_prefix(stream_url, published, tiny):
    from tests.tiny import tiny_model
    from transformers import DynamicCache

    session, manifest = published
    lost = 4
    link = FaultyLink(StreamClient(stream_url).transport, {lost: ["lose", "corrupt"]}, manifest)
    cache, report = StreamClient(link).fetch("tiny-doc", slo=30.0, model=tiny[0], policy="balanced",
                                             config=FetchConfig(max_attempts=2))
    assert report.chunks[lost].option == RECOMPUTE and len(report.chunks[lost].failures) == 2
    assert all(c.option == "balanced" for i, c in enumerate(report.chunks) if i != lost)
    # reference: transformers' own sdpa attention and DynamicCache, prefilled with the same decoded prefix
    reference_model = tiny_model("qwen2", attn="sdpa")
    start, stop = lost * CHUNK, (lost + 1) * CHUNK
    prefix = DynamicCache()
    for index, (keys, values, _) in enumerate(cache.to_tensors()):
        prefix.update(keys[..., :start, :].clone(), values[..., :start, :].clone(), index)
    with torch.no_grad():
        reference_model(input_ids=torch.tensor([manifest.token_ids[start:stop]]),
                        position_ids=torch.arange(start, stop)[None], **cache_kwarg(reference_model, prefix),
                        use_cache=True)
    for index, (keys, values, _) in enumerate(cache.to_tensors()):
        ref_k, ref_v = prefix.layers[index].keys, prefix.layers[index].values
        assert torch.allclose(keys[..., start:stop, :], ref_k[..., start:stop, :], atol=1e-5)
        assert torch.allclose(values[..., start:stop, :], ref_v[..., start:stop, :], atol=1e-5)
    # and the recomputed chunk is not the stored lossy one
    assert max_error(cache, session.cache, start, stop) < max_error(cache, session.cache, 0, start)


def test_without_a_model_a_lost_chunk_fails_the_fetch(stream_url, published):
    link = FaultyLink(StreamClient(stream_url).transport, {2: ["lose", "lose"]}, published[1])
    with pytest.raises(StreamError, match="no model to recompute"):
        StreamClient(link).fetch("tiny-doc", slo=30.0, policy="high", config=FetchConfig(max_attempts=2))


def test_the_link_really_is_throttled(stream_url, published):
    _, manifest = published
    client = StreamClient(stream_url)
    client.set_trace("constant:4mbit")  # 500 KB/s
    try:
        _, report = client.fetch("tiny-doc", slo=30.0, policy="lossless-ish")
    finally:
        client.set_trace(None)
    moved = report.bytes
    assert moved > 150_000
    # a cap can only slow the transfer down: never faster than the trace allows (timing lower bound)
    assert report.ready_s >= moved / 500_000 * 0.98
    assert all(c.throughput <= 500_000 * 1.05 for c in report.chunks)


def test_a_chunk_slowed_by_a_drop_is_abandoned_for_a_cheaper_option(stream_url, published):
    from kvlife.stream.abandon import Abandonment
    from kvlife.stream.estimate import SpeedEstimate
    from kvlife.stream.fetch import Fetch
    from kvlife.stream.planner import Planner
    from kvlife.stream.transport import Abandoned

    _, manifest = published
    n = manifest.n_chunks
    sizes = {lv: [manifest.size(lv, i) for i in range(n)] for lv in manifest.levels}
    planner = Planner(sizes, [CHUNK] * n, slo=1.0, allow_recompute=False)

    def rule():
        fetch = Fetch(manifest, planner, SpeedEstimate(fp16_chunk_bytes=1e5), clock=lambda: 0.1)
        return Abandonment(fetch, 1, "lossless-ish", 2e6, fetch_started=0.0, probe=False)

    size = manifest.size("lossless-ish", 1)
    assert not rule()(size // 4, 0.004)  # on time (predicted 9 ms)
    slow = rule()
    assert not slow(1024, 0.1)
    assert slow(2048, 0.2)  # 10 KB/s: finishing costs ~1.6 s, a smaller level ~0.3 s
    assert not rule()(size - 100, 0.3)  # late, but almost there
    # the transport drops a request its caller gives up on, reporting what had arrived
    client = StreamClient(stream_url)
    client.set_trace("constant:400kbit")
    try:
        with pytest.raises(Abandoned) as caught:
            client.transport.get(f"/v1/chunks/{manifest.chunk_key('lossless-ish', 1)}",
                                 give_up=lambda got, s: got >= 4096)
    finally:
        client.set_trace(None)
    assert 4096 <= caught.value.received < size and caught.value.seconds >= 4096 / 50_000 * 0.9


def test_an_abort_time_bounds_a_hopeless_fetch(stream_url, published):
    from kvlife.stream.client import FetchAborted

    client = StreamClient(stream_url)
    client.set_trace("constant:200kbit")
    try:
        with pytest.raises(FetchAborted):
            client.fetch("tiny-doc", slo=0.2, policy="lossless-ish", config=FetchConfig(abort_after_s=0.3))
    finally:
        client.set_trace(None)


def test_wrong_model_and_missing_context_are_clear_errors(stream_url, published):
    from tests.tiny import tiny_model

    with pytest.raises(StreamError, match="another model"):
        StreamClient(stream_url).fetch("tiny-doc", slo=5.0, model=tiny_model("qwen2", seed=1))
    with pytest.raises(StreamError, match="no context 'absent'"):
        StreamClient(stream_url).fetch("absent", slo=5.0)


def test_a_context_is_listed_only_once_its_chunks_are_stored(stream_url, published):
    session, _ = published
    context = build_context(
        session.cache, session.context_ids, "checked", "fp", ["balanced"], chunk_tokens=CHUNK
    )
    manifest, payloads = context.manifest, context.payloads()
    body = {"manifest": manifest.to_json(), "chunks": list(payloads)}
    response = httpx.put(f"{stream_url}/v1/contexts/checked", json=body)
    assert response.status_code == 409 and "upload them first" in response.json()["error"]
    key, part = next(iter(payloads.items()))
    bad = bytearray(seal_chunk(key, part))
    bad[-1] ^= 1
    response = httpx.put(f"{stream_url}/v1/chunks/{key}", content=bytes(bad))
    assert response.status_code == 400 and "checksum" in response.json()["error"]
    assert "checked" not in httpx.get(f"{stream_url}/v1/contexts").json()["contexts"]
    client = StreamClient(stream_url)
    client.put(context)
    assert "checked" in client.contexts()
    assert client.manifest("checked") == manifest
    assert client.header(manifest) == context.header
    assert client.chunk(manifest, "balanced", 1) == context.chunks["balanced"][1]
    response = httpx.delete(f"{stream_url}/v1/contexts/checked")  # its chunks go with it
    assert response.json()["chunks_deleted"] == len(payloads) and "checked" not in client.contexts()
    assert httpx.get(f"{stream_url}/v1/chunks/{key}").status_code == 404


def test_a_streamed_context_is_store_chunks_under_one_namespace_per_level(published):
    _, manifest = published
    from kvlife.store import chunk_keys

    for level in manifest.levels:
        namespace = manifest.namespace(level)
        assert namespace.encoding == f"kvlife:{level}" and namespace.chunk_size == manifest.chunk_tokens
        keys = chunk_keys(manifest.token_ids, namespace, tail=True)
        assert [manifest.chunk_key(level, i) for i in range(manifest.n_chunks)] == keys
        assert chunk_keys(manifest.token_ids, namespace) == keys[:len(manifest.token_ids) // CHUNK]
    assert len(set(manifest.keys())) == 1 + len(manifest.levels) * manifest.n_chunks


def test_a_session_asks_on_a_streamed_context(stream_url, published, tiny):
    from kvlife.session import Session

    session, _ = published
    model, tokenizer = tiny
    expected = session.ask("How many boats?", max_new_tokens=6)
    streamed = Session(model, tokenizer, mode="multi-request")
    report = fetch_into(streamed, stream_url, "tiny-doc", slo=30.0, policy=RECOMPUTE)
    assert report.met and streamed.loaded
    turn = streamed.ask("How many boats?", max_new_tokens=6)
    assert turn.output_ids == expected.output_ids
    assert streamed.ask("How many boats?", max_new_tokens=6).output_ids == expected.output_ids  # cut back
    with pytest.raises(Exception, match="dense prefill"):
        fetch_into(
            Session(model, tokenizer, "snapkv(ratio=0.5)", mode="multi-request"), stream_url, "tiny-doc", 5.0
        )
