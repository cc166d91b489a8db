"""What the planner predicts from: the link's throughput and the client's decode and recompute speeds.

- `ThroughputEstimate`: each fetched object gives a sample (bytes / seconds from request to last byte).
  The prediction is the harmonic mean of the last `window` samples, or the last sample if lower: a
  drop is believed at once, a rise only once it lasts (CacheGen predicts from the previous chunk;
  the harmonic mean is what MPC-style video players use against spikes).
- `SpeedEstimate`: seconds to decode one chunk at a level (priors from the codec's measured speeds,
  scaled by what this machine shows), and seconds to recompute a chunk of `n` tokens after a prefix
  of `p` tokens: `n * per_token * (1 + p / attention_knee)` (the MLP costs the same per token, the
  attention grows with the prefix; on Qwen2.5-Coder-0.5B a 2K prefill runs at 164 tokens/s and an
  8K one at 110, which this shape with a knee of 5,000 tokens fits).
"""

from __future__ import annotations

from collections import deque

from kvlife.stream.config import FetchConfig
from kvlife.stream.context import StreamError

# fp16 MB/s the codec (format version 2) decodes at, one core (benchmarks/results/codec.json); only their
# ratios matter once this machine's speed has been measured. "raw" (a compressed context's exact pieces)
# is a safetensors load: a guess, replaced by the first measurement
DECODE_PRIOR_BYTES_S = {"raw": 2e9, "lossless-ish": 220e6, "high": 300e6, "balanced": 318e6, "compact": 324e6,
                        "aggressive": 337e6, "extreme": 349e6}
ATTENTION_KNEE_TOKENS = 5000.0


class ThroughputEstimate:
    def __init__(
        self, prior_bytes_s: float | None = None, window: int = FetchConfig.throughput_window
    ) -> None:
        if window < 1:
            raise StreamError(f"the throughput window must be >= 1 sample, not {window}")
        self.samples: deque[float] = deque(maxlen=window)
        self.prior = prior_bytes_s
        self.history: list[tuple[int, float]] = []  # (bytes, seconds) of every sample

    def add(self, n_bytes: int, seconds: float) -> None:
        seconds = max(seconds, 1e-6)
        self.history.append((n_bytes, seconds))
        self.samples.append(n_bytes / seconds)

    def predict(self) -> float | None:
        """Bytes per second expected for the next fetch (None before any sample and without a prior)."""
        if not self.samples:
            return self.prior
        harmonic = len(self.samples) / sum(1.0 / s for s in self.samples)
        return min(harmonic, self.samples[-1])


class SpeedEstimate:
    def __init__(self, fp16_chunk_bytes: float, recompute_tokens_s: float = 100.0,
                 attention_knee: float = ATTENTION_KNEE_TOKENS) -> None:
        self.fp16_chunk_bytes = fp16_chunk_bytes  # what one full chunk decodes to, as fp16
        self.decode_scale = 1.0  # measured / prior decode time, all levels alike until a level is measured
        self.decode_measured: dict[str, float] = {}
        self.per_token_s = 1.0 / recompute_tokens_s
        self.recompute_measured = False
        self.attention_knee = attention_knee

    def decode_s(self, level: str, fraction: float = 1.0) -> float:
        """Predicted seconds to decode a chunk at `level` (`fraction`: its tokens over a full chunk's)."""
        if level in self.decode_measured:
            return self.decode_measured[level] * fraction
        prior = self.fp16_chunk_bytes / DECODE_PRIOR_BYTES_S.get(level, 300e6)
        return prior * self.decode_scale * fraction

    def add_decode(self, level: str, seconds: float, fraction: float = 1.0) -> None:
        full = seconds / max(fraction, 1e-6)
        old = self.decode_measured.get(level)
        self.decode_measured[level] = full if old is None else 0.5 * old + 0.5 * full
        prior = self.fp16_chunk_bytes / DECODE_PRIOR_BYTES_S.get(level, 300e6)
        self.decode_scale = self.decode_measured[level] / prior

    def recompute_s(self, tokens: int, prefix_tokens: int) -> float:
        return tokens * self.per_token_s * (1.0 + prefix_tokens / self.attention_knee)

    def add_recompute(self, tokens: int, prefix_tokens: int, seconds: float, fraction: float = 1.0) -> None:
        """A chunk of `tokens` recomputed after `prefix_tokens` in `seconds`; `fraction`: its tokens over a
        full chunk's. A short chunk moves the estimate less: its fixed cost per forward pass (measured: 19
        tokens after 1,792 took 0.35 s, 73 tokens/s against 110 for full chunks) would otherwise read as a
        slow machine."""
        per_token = seconds / max(tokens, 1) / (1.0 + prefix_tokens / self.attention_knee)
        weight = 1.0 if not self.recompute_measured else 0.5 * min(max(fraction, 0.0), 1.0)
        self.per_token_s = (1.0 - weight) * self.per_token_s + weight * per_token
        self.recompute_measured = True
