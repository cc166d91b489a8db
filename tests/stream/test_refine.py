"""Refinement: once every chunk is in, the time left before the deadline fetches the worst chunks again
at a better level, in place, and a fetch that would end late is given up."""

import time

import pytest
import torch
from tests.stream.conftest import CHUNK
from tests.stream.test_fetch import FaultyLink

from kvlife.store.envelope import HEADER
from kvlife.stream import RECOMPUTE, FetchConfig, StreamClient, StreamError
from kvlife.stream.planner import Refinement

RECOMPUTED = 3


@pytest.fixture
def low_first_pass(monkeypatch):
    """The adaptive planner's first pass forced to `extreme`, chunk RECOMPUTED recomputed (so the chunks
    before it are in the cache's tensors when refinement starts, the ones after it still pending)."""
    from kvlife.stream import client as client_module

    class LowFirstPass(client_module.Planner):
        def choose(self, index, *args, **kwargs):
            decision = super().choose(index, *args, **kwargs)
            if self.policy != "adaptive":
                return decision
            decision.option = RECOMPUTE if index == RECOMPUTED and self.allow_recompute else "extreme"
            return decision

    monkeypatch.setattr(client_module, "Planner", LowFirstPass)


def slices(cache, start, stop):
    return [(k[..., start:stop, :], v[..., start:stop, :]) for k, v, _ in cache.to_tensors()]


def test_refinement_puts_the_better_chunks_in_place(stream_url, published, tiny, low_first_pass):
    _, manifest = published
    client = StreamClient(stream_url)
    client.set_trace(None)
    best, _ = client.fetch("tiny-doc", slo=30.0, policy="lossless-ish")
    low, _ = client.fetch("tiny-doc", slo=30.0, model=tiny[0], config=FetchConfig(refine=False))
    cache, report = client.fetch("tiny-doc", slo=30.0, model=tiny[0])
    n = manifest.n_chunks
    assert report.met and report.complete_s <= report.ready_s and report.refine_stopped == ""
    assert [c.planned[-1] for c in report.chunks] == [
        "extreme" if i != RECOMPUTED else RECOMPUTE for i in range(n)
    ]
    assert report.options() == ["lossless-ish" if i != RECOMPUTED else RECOMPUTE for i in range(n)]
    assert all(c.refined == ["lossless-ish"] for i, c in enumerate(report.chunks) if i != RECOMPUTED)
    assert report.chunks[RECOMPUTED].refined == []
    for i, c in enumerate(report.chunks):  # both versions' bytes are counted, each in its envelope
        if i != RECOMPUTED:
            assert c.bytes == manifest.size("extreme", i) + manifest.size("lossless-ish", i) + 2 * HEADER.size
    assert report.bytes > sum(manifest.size("lossless-ish", i) for i in range(n) if i != RECOMPUTED)
    for i in range(
        n
    ):  # chunks held in the cache's tensors (before the recomputed one) and still pending alike
        start, stop = i * CHUNK, min((i + 1) * CHUNK, len(manifest.token_ids))
        # the recomputed chunk is left as it was
        expected = slices(best if i != RECOMPUTED else low, start, stop)
        for (k, v), (ek, ev) in zip(slices(cache, start, stop), expected):
            assert torch.equal(k, ek) and torch.equal(v, ev), (i, (k - ek).abs().max())
    assert cache.next_position == len(manifest.token_ids)
    assert all(
        torch.equal(p, torch.arange(len(manifest.token_ids)).expand_as(p)) for _, _, p in cache.to_tensors()
    )


def test_without_refinement_the_cache_is_handed_over_at_once(stream_url, published, low_first_pass):
    _, manifest = published
    client = StreamClient(stream_url)
    client.set_trace(None)
    _, report = client.fetch("tiny-doc", slo=30.0, config=FetchConfig(refine=False))
    assert report.options() == ["extreme"] * manifest.n_chunks and not any(c.refined for c in report.chunks)
    assert report.ready_s - report.complete_s < 0.05
    _, fixed = client.fetch("tiny-doc", slo=30.0, policy="extreme")  # fixed policies never refine
    assert fixed.options() == ["extreme"] * manifest.n_chunks


def test_a_refinement_lost_or_corrupted_in_transit_is_never_used(stream_url, published, low_first_pass):
    _, manifest = published
    link = FaultyLink(StreamClient(stream_url).transport, {0: [None, "corrupt", "lose"]}, manifest)
    client = StreamClient(link)
    client.set_trace(None)
    _, report = client.fetch("tiny-doc", slo=30.0, config=FetchConfig(max_attempts=2))
    assert report.met
    # both failures spent the refinement's attempts: nothing was put in place, the first pass stands
    assert report.options() == ["extreme"] * manifest.n_chunks and not any(c.refined for c in report.chunks)
    assert [fault for _, fault in link.served[manifest.n_chunks:]] == ["corrupt", "lose"]
    assert report.refine_stopped.startswith("2 refinement fetches failed in transit")


def test_a_refinement_that_would_end_late_is_given_up(stream_url, published, low_first_pass, monkeypatch):
    _, manifest = published
    n = manifest.n_chunks
    client = StreamClient(stream_url)
    asked = []
    get = client.transport.get
    monkeypatch.setattr(
        client.transport, "get", lambda path, *a, **k: asked.append(path) or get(path, *a, **k)
    )
    client.set_trace("constant:400kbit")  # 50 KB/s
    try:
        _, first_pass = client.fetch("tiny-doc", slo=30.0, config=FetchConfig(refine=False))
        # refining proposes chunk 0 at lossless-ish once; the deadline leaves ~60% of the time that needs
        proposals = [Refinement("lossless-ish", [0], 0.0)]
        monkeypatch.setattr(
            "kvlife.stream.planner.Planner.refine", lambda self, *a: proposals.pop() if proposals else None
        )
        needs = manifest.size("lossless-ish", 0) / 50e3
        slo = (first_pass.complete_s + 0.6 * needs) / 0.95
        client.set_trace("constant:400kbit")
        _, report = client.fetch("tiny-doc", slo=slo)
    finally:
        client.set_trace(None)
    assert asked[-1].endswith(manifest.chunk_key("lossless-ish", 0))  # it was asked for
    # given up: chunk 0 kept its version
    assert report.options() == ["extreme"] * n and not report.chunks[0].refined
    assert report.met and report.ready_s <= slo * 0.95 + 0.05
    assert (
        report.refine_stopped.startswith("lossless-ish/0 given up after")
        and "would end late" in report.refine_stopped
    )


def test_the_cutoff_projects_the_end_from_the_rate_after_the_first_piece():
    from kvlife.stream.abandon import Cutoff

    cutoff = Cutoff(100_000, time.perf_counter() + 0.5)
    assert not cutoff(10_000, 0.1)  # the first piece: its wait is latency, no rate yet
    assert not cutoff(60_000, 0.11)  # 5 MB/s: the rest in 8 ms
    late = Cutoff(100_000, time.perf_counter() + 0.5)
    assert not late(1_000, 0.05)
    assert late(2_000, 0.06)  # 100 KB/s: the rest would take ~1 s
    assert Cutoff(100_000, time.perf_counter() - 0.01)(1_000, 0.01)  # past the end: given up at once


def test_the_builder_replaces_only_chunks_it_holds(stream_url, published):
    from kvlife.codec.format import parse_header
    from kvlife.stream.recompute import CacheBuilder

    _, manifest = published
    client = StreamClient(stream_url)
    header = parse_header(client.header(manifest), header_only=True)
    part = {lv: client.chunk(manifest, lv, 0) for lv in ("extreme", "high")}
    builder = CacheBuilder(header)
    with pytest.raises(StreamError, match="not in the cache"):
        builder.replace_encoded(0, part["high"], manifest.chunks["high"][0].crc32)
    builder.add_encoded(0, part["extreme"], manifest.chunks["extreme"][0].crc32)
    before = [(layer[0][0].clone(), layer[0][1].clone()) for layer in builder.pending]
    corrupt = bytearray(part["high"])
    corrupt[len(corrupt) // 2] ^= 0x40
    with pytest.raises(StreamError):
        builder.replace_encoded(0, bytes(corrupt), manifest.chunks["high"][0].crc32)
    assert all(torch.equal(k, bk) and torch.equal(v, bv) for (k, v, _), (bk, bv) in
               zip([layer[0] for layer in builder.pending], before))
    builder.replace_encoded(0, part["high"], manifest.chunks["high"][0].crc32)
    assert not all(torch.equal(k, bk) for (k, _, _), (bk, _) in zip(builder.cache.to_tensors(), before))
