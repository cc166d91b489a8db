"""Named quality levels of the kvlife scheme, from near-lossless to aggressive.

A level sets the quantization step of every (layer, K/V, head) as a multiple of that head's RMS
(after the channel means are removed; keys before RoPE when the RoPE is known): `alpha_k` for keys,
`alpha_v` for values (values tolerate coarser steps: their errors average over the attended tokens),
optionally finer by `early_factor` in the first `early_fraction` of the layers (CacheGen's layer
groups; on Qwen2.5-Coder-0.5B finer early layers bought less quality per bit than a finer step
everywhere, so the presets do not use it). The first `exact_tokens` tokens (the attention sink)
are kept exact: dropping that on Qwen2.5 multiplied the continuation's KL divergence by 5.
The presets were tuned with a weights profile (`calibrate.channel_weights`); without one the same
level is about as large and of lower quality. Each chunk stores its level id *and* the steps it
used, so a stream stays decodable whatever these presets become; the ids below are part of the
format (docs/codec-format.md).

The error bound of a level is per element: |decoded - original| <= step / 2 for values and for
keys coded post-RoPE, and <= step * sqrt(2) / 2 for keys coded pre-RoPE, plus the rounding of the
output dtype (`codec.error_bound` returns the bound of each (layer, K/V, head)).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Level:
    name: str
    id: int
    alpha_k: float
    alpha_v: float
    early_fraction: float = 0.0
    early_factor: float = 1.0
    exact_tokens: int = 1

    def alpha(self, kind: str, layer: int, n_layers: int) -> float:
        base = self.alpha_k if kind == "k" else self.alpha_v
        if layer < round(self.early_fraction * n_layers):
            base *= self.early_factor
        return base


LEVELS: dict[str, Level] = {
    level.name: level
    for level in (
        Level("lossless-ish", 0, alpha_k=0.01, alpha_v=0.01),
        Level("high", 1, alpha_k=0.5, alpha_v=0.7),
        Level("balanced", 2, alpha_k=0.8, alpha_v=1.1),
        Level("compact", 3, alpha_k=1.0, alpha_v=1.5),
        Level("aggressive", 4, alpha_k=1.3, alpha_v=1.8),
        Level("extreme", 5, alpha_k=1.7, alpha_v=2.4),
    )
}
# Levels for a use rather than rungs of the size/quality ladder above (streams, which step through the
# ladder, never pick them; the store's kvlife:LEVEL encodings and `encode` take them by name).
# "sparse": for caches already pruned to the tokens that matter (kvzip, snapkv, ... in multi-request
# mode), where a key error moves the attention between the few kept tokens and a value error still
# averages: keys finer than `high`, values coarser than `balanced`. On kvzip(ratio=0.25) contexts of
# repoqa (8 samples, Qwen2.5-Coder-0.5B, with the model's profile) the largest rise of an answer's
# NLL over the exact cache was +0.043 at 475 bytes per context token, against +0.120 for `balanced`
# (412 bytes) and +0.082 for `high` (526); keys at balanced's step with values at high's: +0.200
# (benchmarks/codec_sparse.py). Accuracy did not follow: with the model's profile it scored at or below
# balanced on repoqa, kv and prefix_suffix at 15% more bytes (docs/lifecycle.md), so balanced with the
# profile is the level for pruned caches; sparse stays as the measured alternative.
OTHER_LEVELS: dict[str, Level] = {
    level.name: level for level in (Level("sparse", 6, alpha_k=0.4, alpha_v=1.3),)
}
LEVEL_NAMES = {level.id: level.name for level in (*LEVELS.values(), *OTHER_LEVELS.values())}
DEFAULT_LEVEL = "balanced"


def named_level(name: str) -> Level | None:
    """A ladder level or another named level, None if there is none of that name."""
    return LEVELS.get(name) or OTHER_LEVELS.get(name)
