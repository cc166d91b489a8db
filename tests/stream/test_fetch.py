"""Fetching over a real loopback server: levels, recompute, chunks lost or corrupted in transit, throttling."""

import hashlib
import json
import struct

import httpx
import pytest
import torch
from tests.stream.conftest import CHUNK

from kvlife.cache import cache_kwarg
from kvlife.stream import RECOMPUTE, StreamClient, StreamError, fetch_into
from kvlife.stream.context import build_context, bundle_parts
from kvlife.stream.transport import TransportError


class FaultyLink:
    """Wraps the HTTP transport: corrupts or loses chosen chunks' responses (`faults`: index -> list of
    "corrupt" / "lose", one per fetch of that chunk, consumed in order)."""

    def __init__(self, inner, faults):
        self.inner, self.faults, self.served = inner, {k: list(v) for k, v in faults.items()}, []

    def get(self, path, timeout_s=None, deadline=None, give_up=None):
        data = self.inner.get(path, timeout_s)
        if "/chunks/" in path:
            index = int(path.rsplit("/", 1)[1])
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
    return max(max((a[..., start:stop, :] - b[..., start:stop, :]).abs().max().item() for a, b in zip(x[:2], y[:2]))
               for x, y in zip(layers_of(cache), layers_of(reference)))


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
            made.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(client_module, "Planner", Recording)
    StreamClient(stream_url).fetch("tiny-doc", slo=30.0, discount=1.3, drop_factor=1.5, step_up_margin=0.0)
    assert made[-1]["discount"] == 1.3 and made[-1]["drop_factor"] == 1.5 and made[-1]["step_up_margin"] == 0.0
    StreamClient(stream_url).fetch("tiny-doc", slo=30.0)
    assert made[-1]["discount"] == "wide" and made[-1]["step_up_margin"] == 0.1  # the defaults: wide steps, 10%


def test_recompute_policy_equals_one_dense_prefill(stream_url, published, tiny):
    session, manifest = published
    cache, report = StreamClient(stream_url).fetch("tiny-doc", slo=30.0, model=tiny[0], policy=RECOMPUTE)
    assert report.options() == [RECOMPUTE] * manifest.n_chunks and report.bytes < 100_000
    assert max_error(cache, session.cache) < 1e-4


def test_corrupted_chunk_is_fetched_again_never_used(stream_url, published, tiny):
    session, manifest = published
    clean, _ = StreamClient(stream_url).fetch("tiny-doc", slo=30.0, policy="balanced")
    link = FaultyLink(StreamClient(stream_url).transport, {3: ["corrupt"], 5: ["lose"]})
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
    link = FaultyLink(StreamClient(stream_url).transport, {lost: ["lose", "corrupt"]})
    cache, report = StreamClient(link).fetch("tiny-doc", slo=30.0, model=tiny[0], policy="balanced", max_attempts=2)
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
    link = FaultyLink(StreamClient(stream_url).transport, {2: ["lose", "lose"]})
    with pytest.raises(StreamError, match="no model to recompute"):
        StreamClient(link).fetch("tiny-doc", slo=30.0, policy="high", max_attempts=2)


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
    from kvlife.stream.client import _Abandonment, _Backlog
    from kvlife.stream.estimate import SpeedEstimate
    from kvlife.stream.planner import Planner
    from kvlife.stream.transport import Abandoned

    _, manifest = published
    n = manifest.n_chunks
    sizes = {lv: [manifest.size(lv, i) for i in range(n)] for lv in manifest.levels}
    planner = Planner(sizes, [CHUNK] * n, slo=1.0, allow_recompute=False)
    speeds = SpeedEstimate(fp16_chunk_bytes=1e5)
    def rule():
        return _Abandonment(1, "lossless-ish", manifest, planner, speeds, _Backlog(), lambda: 0.1, 2e6,
                            [CHUNK] * n, fetch_started=0.0, probe=False)

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
            client.transport.get("/v1/contexts/tiny-doc/chunks/lossless-ish/1", give_up=lambda got, s: got >= 4096)
    finally:
        client.set_trace(None)
    assert 4096 <= caught.value.received < size and caught.value.seconds >= 4096 / 50_000 * 0.9


def test_an_abort_time_bounds_a_hopeless_fetch(stream_url, published):
    from kvlife.stream.client import FetchAborted

    client = StreamClient(stream_url)
    client.set_trace("constant:200kbit")
    try:
        with pytest.raises(FetchAborted):
            client.fetch("tiny-doc", slo=0.2, policy="lossless-ish", abort_after_s=0.3)
    finally:
        client.set_trace(None)


def test_wrong_model_and_missing_context_are_clear_errors(stream_url, published):
    from tests.tiny import tiny_model

    with pytest.raises(StreamError, match="another model"):
        StreamClient(stream_url).fetch("tiny-doc", slo=5.0, model=tiny_model("qwen2", seed=1))
    with pytest.raises(StreamError, match="no context 'absent'"):
        StreamClient(stream_url).fetch("absent", slo=5.0)


def test_uploads_are_checked_before_they_are_stored(stream_url, published):
    session, _ = published
    context = build_context(session.cache, session.context_ids, "checked", "fp", ["balanced"], chunk_tokens=CHUNK)
    parts = bundle_parts(context)
    bad = list(parts)
    bad[-2] = bad[-2][:-1] + bytes([bad[-2][-1] ^ 1])
    response = httpx.put(f"{stream_url}/v1/contexts/checked", content=b"".join(bad))
    assert response.status_code == 400 and "SHA-256" in response.json()["error"]
    response = httpx.put(f"{stream_url}/v1/contexts/checked", content=b"".join(parts)[:-10])
    assert response.status_code == 400
    assert "checked" not in httpx.get(f"{stream_url}/v1/contexts").json()["contexts"]
    manifest = json.loads(parts[1])
    manifest["context_id"] = "other"
    blob = json.dumps(manifest).encode()
    response = httpx.put(f"{stream_url}/v1/contexts/checked", content=struct.pack("<I", len(blob)) + blob)
    assert response.status_code == 400 and "names context" in response.json()["error"]
    assert hashlib.sha256(parts[2]).hexdigest() == manifest["header_sha256"]


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
        fetch_into(Session(model, tokenizer, "snapkv(ratio=0.5)", mode="multi-request"), stream_url, "tiny-doc", 5.0)
