"""Codec weights profiles in the store: the `kvlife:LEVEL+profile` encodings.

The codec can weight each key channel's step by the energy queries put on it (`kvlife.codec.calibrate`:
a key error moves a logit by q . e, so a channel queries ignore can be coarse). On
Qwen2.5-Coder-0.5B's dense caches that cut the continuation's KL divergence about 4x at the same size
(docs/codec-format.md). A profile is measured once per model; the stream stores the resulting step
multipliers, so a decoder needs no profile.

    kvlife:balanced             the level's steps, no profile
    kvlife:balanced+profile     with the profile shipped for the running model (matched by
                                `models.model_signature`), kvlife/configs/codec_weights/<model>.json
    kvlife:balanced+profile=F   with the profile in file F (`kvlife codec calibrate ... -o F.json`)

A profile changes the stored bytes, so store keys hold its digest (`CodecSetup.namespace_encoding`):
entries coded with another profile, or none, are never served for this one.

The file format is `kvlife.codec.calibrate`'s JSON profile.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kvlife.models import CONFIG_ROOT, model_signature, shipped_files, shipped_for
from kvlife.store.base import StoreError

if TYPE_CHECKING:
    from collections.abc import Sequence

SUFFIX = "+profile"
PROFILE_DIR = CONFIG_ROOT / "codec_weights"
Weights = list[tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Profile:
    path: str
    model: str
    signature: str
    digest: str  # of the file's weights: what store keys hold
    weights: tuple[tuple[np.ndarray, np.ndarray], ...]  # per layer (keys, values) [kv_heads, head_dim]


@dataclass(frozen=True)
class CodecSetup:
    """What a store needs to code for one model: the encoding its keys hold (the encoding as named, with
    the profile's digest in place of a file), the model's RoPE for keys coded before it, and the
    profile's weights."""

    namespace_encoding: str
    rope: Any = None
    weights: Weights | None = None


def split_encoding(encoding: str) -> tuple[str, str | None]:
    """("kvlife:LEVEL", None | "" (the shipped profile) | a file) from an encoding name."""
    base, sep, rest = encoding.partition(SUFFIX)
    if not sep:
        return encoding, None
    if rest and (not rest.startswith("=") or rest == "="):
        raise StoreError(f"bad encoding {encoding!r}: after {SUFFIX!r} comes nothing or '=FILE'")
    return base, rest[1:] if rest else ""


def check_profile_suffix(encoding: str) -> None:
    """A one-line StoreError for a profile on a non-codec encoding or a profile file that is missing."""
    base, source = split_encoding(encoding)
    if source is None:
        return
    if not base.startswith("kvlife:"):
        raise StoreError(f"encoding {encoding!r}: a weights profile applies to kvlife:LEVEL encodings only")
    if source and not Path(source).expanduser().is_file():
        raise StoreError(f"encoding {encoding!r}: no codec weights profile at {source}")


def shipped() -> list[str]:
    return shipped_files(PROFILE_DIR)


def load(path: str | Path) -> Profile:
    """Read and check a profile file; any problem is a one-line StoreError."""
    path = Path(path).expanduser()
    try:
        return _load(str(path.resolve()), path.stat().st_mtime_ns)
    except OSError as exc:
        raise StoreError(f"cannot read codec weights profile {path}: {exc.strerror or exc}") from None


@lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int) -> Profile:
    from kvlife.codec.calibrate import read_profile

    found = read_profile(path)
    return Profile(path, found["model"], found["signature"], found["digest"], tuple(found["weights"]))


def for_model(model: Any) -> Profile:
    """The shipped profile made for `model` (matched by signature), or a StoreError saying what to do."""
    profile = shipped_for(model, PROFILE_DIR, load)
    if profile is None:
        raise StoreError(f"no shipped codec weights profile for this model (signature "
                         f"{model_signature(model)}; shipped: {', '.join(shipped()) or 'none'}); write one "
                         "with `kvlife codec calibrate --model NAME -o FILE.json` and use "
                         "kvlife:LEVEL+profile=FILE.json")
    return profile


def codec_setup(model: Any, encoding: str) -> CodecSetup:
    """How a store codes for `model`: RoPE for a kvlife encoding, and the profile when one is named (its
    layer and head counts checked against the model)."""
    base, source = split_encoding(encoding)
    if not base.startswith("kvlife:"):
        return CodecSetup(encoding)
    from kvlife.codec import rope_from_config

    rope = rope_from_config(model.config)
    if source is None:
        return CodecSetup(encoding, rope)
    profile = for_model(model) if source == "" else load(source)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    want = (config.num_hidden_layers, config.num_key_value_heads, head_dim)
    have = (len(profile.weights), *profile.weights[0][0].shape)
    if have != want:
        raise StoreError(f"codec weights profile {profile.path} is for {have[0]} layers x {have[1]} KV "
                         f"heads x {have[2]} channels ({profile.model}); this model has "
                         f"{want[0]} x {want[1]} x {want[2]}")
    return CodecSetup(f"{base}{SUFFIX}:{profile.digest}", rope, list(profile.weights))


def piece_weights(weights: Weights, layers: Sequence[Any]) -> Weights:
    """The profile's weights for each float piece of `layers` (`entries.StoredLayer`s), in `encode_entry`'s
    order: a piece holding every KV head takes its layer's weights, a head-ragged layer's pieces (one per
    KV head) take their head's; any other piece is coded with equal weights (the profile does not say
    which heads it holds)."""
    if len(weights) != len(layers):
        raise StoreError(f"the codec weights profile covers {len(weights)} layers, the cache has "
                         f"{len(layers)}")
    out = []
    for index, layer in enumerate(layers):
        keys_w, values_w = weights[index]
        heads = keys_w.shape[0]
        for j, (keys, _, _) in enumerate(layer.pieces):
            held = keys.shape[1]
            if keys.shape[-1] != keys_w.shape[-1]:
                raise StoreError(f"the codec weights profile has {keys_w.shape[-1]} channels a head, layer "
                                 f"{index} of the cache {keys.shape[-1]}")
            if held == heads:
                out.append((keys_w, values_w))
            elif held == 1 and len(layer.pieces) == heads:
                out.append((keys_w[j:j + 1], values_w[j:j + 1]))
            else:
                ones = np.ones((held, keys.shape[-1]))
                out.append((ones, ones))
    return out
