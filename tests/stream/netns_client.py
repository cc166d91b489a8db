"""Run inside the client network namespace by test_netns.py: publish a tiny context, fetch it, print JSON."""

import json
import sys

from tests.tiny import ByteTokenizer, tiny_model

from kvlife.session import Session
from kvlife.stream import StreamClient, publish


def main(url: str) -> None:
    model = tiny_model("qwen2")
    session = Session(model, ByteTokenizer(), mode="multi-request")
    session.prefill("Over a veth pair with a token bucket filter. " * 14)
    publish(session, url, "netns-doc", chunk_tokens=64)
    client = StreamClient(url)
    out = {}
    cache, report = client.fetch("netns-doc", slo=60.0, model=model, policy="lossless-ish")
    out["lossless"] = {"bytes": report.bytes, "ready_s": report.ready_s,
                       "throughputs": [c.throughput for c in report.chunks]}
    slo = report.ready_s * 0.5
    cache, report = StreamClient(url).fetch("netns-doc", slo=slo, model=model)
    error = max(
        (a[0] - b[0]).abs().max().item() for a, b in zip(cache.to_tensors(), session.cache.to_tensors())
    )
    out["adaptive"] = {"slo": slo, "ready_s": report.ready_s, "met": report.met, "options": report.options(),
                       "bytes": report.bytes,
                       "max_key_error": error}
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
