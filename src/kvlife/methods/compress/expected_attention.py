"""Expected attention: score tokens by the attention that future queries are expected to pay them."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from kvlife.attention import AttnCall
from kvlife.cache import KVLayer
from kvlife.errors import SpecError
from kvlife.methods.base import ScoreCompressMethod
from kvlife.methods.compress.keep import real_slots
from kvlife.methods.compress.snapkv import PROTECTED


def rope_angles(positions: torch.Tensor, theta: float, rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [tokens, rotary_dim // 2] of RoPE at `positions` (float32, as transformers computes them)."""
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    inv_freq = 1.0 / (theta ** exponent)
    angles = positions.float().cpu()[:, None] * inv_freq[None]
    return angles.cos().to(positions.device), angles.sin().to(positions.device)


def unrotate(queries: torch.Tensor, positions: torch.Tensor, theta: float, rotary_dim: int) -> torch.Tensor:
    """Undo RoPE (rotate_half layout) on queries [heads, tokens, head_dim] taken at `positions`."""
    cos, sin = rope_angles(positions, theta, rotary_dim)
    half = rotary_dim // 2
    x1, x2 = queries[..., :half], queries[..., half:rotary_dim]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin, queries[..., rotary_dim:]], dim=-1)


def mean_rotation(positions: torch.Tensor, theta: float, rotary_dim: int, head_dim: int) -> torch.Tensor:
    """The average over `positions` of RoPE's rotation matrix [head_dim, head_dim] (rotate_half layout)."""
    cos, sin = rope_angles(positions, theta, rotary_dim)
    c, s = cos.mean(dim=0), sin.mean(dim=0)
    half = rotary_dim // 2
    index = torch.arange(half, device=c.device)
    rotation = torch.eye(head_dim, device=c.device)
    rotation[index, index] = c
    rotation[index + half, index + half] = c
    rotation[index, index + half] = -s
    rotation[index + half, index] = s
    return rotation


def query_statistics(call: AttnCall, rows: slice, future: torch.Tensor,
                     rope: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [q_heads, d] and covariance [q_heads, d, d] of the queries at `future` positions, from
    the RoPE'd queries of the call's `rows`: un-rotated to position 0, averaged, then rotated by
    RoPE's average rotation over the future positions. Without a known RoPE, the rows' own statistics."""
    queries = call.query[0, :, rows].float()
    if rope is not None:
        queries = unrotate(queries, call.q_pos[rows], rope.theta, rope.rotary_dim)
    mean = queries.mean(dim=1)
    centered = queries - mean[:, None]
    cov = centered.transpose(1, 2) @ centered / max(1, queries.shape[1])
    if rope is not None:
        rotation = mean_rotation(future, rope.theta, rope.rotary_dim, queries.shape[-1])
        mean = mean @ rotation.T
        cov = rotation @ cov @ rotation.T
    return mean, cov


@dataclasses.dataclass
class ExpectedAttention(ScoreCompressMethod):
    """Keep the tokens that queries at the next positions are expected to attend to most.

    Devoto et al., 2025 ("Expected Attention: KV Cache Compression by Estimating Attention from
    Future Queries Distribution", NVIDIA kvpress's ExpectedAttentionPress) model future queries as
    a Gaussian whose mean and covariance come from the queries seen so far, moved to the next
    positions by RoPE's rotation. For q ~ N(mu, Sigma), E[exp(s q.k)] = exp(s mu.k + s^2 k'Sigma k / 2),
    so each key's expected attention is a softmax of that exponent over the keys; it is averaged
    over the GQA group and scaled by the norm of the token's value.

    The statistics come from the RoPE'd queries of the prefill's last `window_size` positions
    (sinks excluded), un-rotated with the model's RoPE, and are rotated by the mean rotation over
    the next `n_future_positions` positions. Where the model's RoPE is not plain (scaled variants),
    the queries' own statistics are used without extrapolation. Needs no attention weights.

    Parameters:
        ratio / budget (None): tokens kept per KV head, as a fraction of the tokens seen or in tokens.
        window_size (512): recent query positions whose statistics estimate the future queries.
        n_future_positions (512): future positions the expected attention is averaged over.
        n_sink (4): first tokens always kept and left out of the statistics and the softmax.
        use_covariance (true): include the covariance term (false: the mean query only).
        use_vnorm (true): multiply each token's score by its value's L2 norm.
        epsilon (0.0): added to the expected attention before the value-norm scaling.
    """

    name: ClassVar[str] = "expected_attention"
    paper: ClassVar[str] = (
        "Devoto et al., 2025, Expected Attention: KV Cache Compression by Estimating Attention from Future "
        "Queries Distribution"
    )
    window_size: int = 512
    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0

    def validate(self) -> None:
        super().validate()
        if self.window_size < 1 or self.n_future_positions < 1:
            raise SpecError(f"expected_attention: window_size and n_future_positions must be >= 1, got "
                            f"{self.window_size} and {self.n_future_positions}")
        if self.n_sink < 0 or self.epsilon < 0:
            raise SpecError(f"expected_attention: n_sink and epsilon must be >= 0, "
                            f"got {self.n_sink} and {self.epsilon}")

    def score(self, call: AttnCall, layer: KVLayer) -> torch.Tensor:
        from kvlife.codec.rope import rope_from_config

        rope = rope_from_config(call.config) if call.config is not None else None
        q_pos = call.q_pos
        usable = int((q_pos >= self.n_sink).sum())  # the call's newest queries that are not sinks
        rows = slice(q_pos.shape[0] - min(self.window_size, max(1, usable)), None)
        future = torch.arange(layer.next_position, layer.next_position + self.n_future_positions,
                              device=q_pos.device)
        mean, cov = query_statistics(call, rows, future, rope)
        keys, values = layer.dense_kv()
        keys, values = keys[0].float(), values[0].float()
        kv_heads, groups = keys.shape[0], mean.shape[0] // keys.shape[0]
        keys = keys.repeat_interleave(groups, dim=0)  # [q_heads, slots, d]
        logits = call.scaling * (keys @ mean[:, :, None])[..., 0]
        if self.use_covariance:
            logits = logits + call.scaling**2 / 2 * ((keys @ cov) * keys).sum(dim=-1)
        sinks, real = layer.positions < self.n_sink, real_slots(layer)
        hidden = (sinks | ~real).repeat_interleave(groups, dim=0)
        expected = torch.softmax(logits.masked_fill(hidden, float("-inf")), dim=-1).nan_to_num(0.0)
        scores = expected.view(kv_heads, groups, -1).mean(dim=1)
        if self.use_vnorm:
            scores = (scores + self.epsilon) * values.norm(dim=-1)
        return scores.masked_fill(sinks, PROTECTED).masked_fill(~real, float("-inf"))
