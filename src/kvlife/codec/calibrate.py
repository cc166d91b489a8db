"""Per-channel importance weights of a model's K/V, measured once per model (an encoder-side profile).

A key error e shifts the attention logit by q . e / sqrt(d): channels where queries carry energy
need fine steps, channels queries ignore can be coarse. For keys coded before RoPE the weight of
channel c is E[q_c^2 + q_c'^2] over the rotation pair (c, c') (RoPE rotates q and k by the same
pair angles, so the pair energy is what survives), summed over the query heads sharing the KV head.
A value error reaches the residual stream through o_proj, so the weight of value channel c is the
energy of o_proj's input column c, summed over the query heads of the group.

With weights w the step minimizing the weighted squared error at a given size is proportional to
1 / sqrt(w) (reverse water-filling at high rate); `encode(..., weights=...)` applies that inside
each head, keeping the head's geometric-mean step (and so its size) as without weights. The result
is stored in the stream as per-channel step multipliers, so decoding needs no profile.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvlife.codec.format import CodecError


def _attention_modules(model: Any) -> list[Any]:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise CodecError("calibration needs a decoder with model.layers[i].self_attn "
                         "(Llama/Qwen/Mistral style)")
    attns = [layer.self_attn for layer in layers]
    if not all(hasattr(a, "q_proj") and hasattr(a, "o_proj") for a in attns):
        raise CodecError("calibration needs q_proj and o_proj in every attention module")
    return attns


@torch.no_grad()
def channel_weights(model: Any, input_ids: torch.Tensor,
                    rotary_dim: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer (key weights [kv_heads, head_dim], value weights [kv_heads, head_dim]).

    `input_ids` [1, T]: calibration text (not the text you will encode). `rotary_dim`: pair the key
    channels as RoPE does (default: the whole head), or 0 to keep channels unpaired (post-RoPE coding).
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    attns = _attention_modules(model)
    energy: dict[int, torch.Tensor] = {}

    def hook(index):
        def record(module, args, output):
            q = output.detach().float().reshape(-1, heads, head_dim)
            energy[index] = q.pow(2).mean(0)  # [heads, head_dim]
        return record

    handles = [a.q_proj.register_forward_hook(hook(i)) for i, a in enumerate(attns)]
    try:
        model(input_ids)
    finally:
        for handle in handles:
            handle.remove()
    group = heads // kv_heads
    out = []
    for index, attn in enumerate(attns):
        q2 = energy[index].reshape(kv_heads, group, head_dim).sum(1)
        if rotary_dim:
            half = rotary_dim // 2
            pair = q2[:, :half] + q2[:, half:rotary_dim]
            q2 = q2.clone()
            q2[:, :half] = pair
            q2[:, half:rotary_dim] = pair
        w_o = attn.o_proj.weight.detach().float()  # [hidden, heads * head_dim]
        col = w_o.pow(2).sum(0).reshape(kv_heads, group, head_dim).sum(1)
        out.append((q2.numpy().astype(np.float64), col.numpy().astype(np.float64)))
    return out


def save_weights(path, weights: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Write a profile as .npz (plain arrays; loaded with allow_pickle=False)."""
    arrays = {}
    for index, (keys, values) in enumerate(weights):
        arrays[f"k{index}"], arrays[f"v{index}"] = np.asarray(keys), np.asarray(values)
    with open(path, "wb") as handle:
        np.savez(handle, layers=np.array(len(weights)), **arrays)


def load_weights(path) -> list[tuple[np.ndarray, np.ndarray]]:
    """A profile's weights, from a .json profile (`save_profile`) or an .npz (`save_weights`)."""
    if str(path).endswith(".json"):
        return read_profile(path)["weights"]
    try:
        with np.load(path, allow_pickle=False) as data:
            return [(data[f"k{i}"], data[f"v{i}"]) for i in range(int(data["layers"]))]
    except (OSError, KeyError, ValueError) as exc:
        raise CodecError(f"{path} is not a codec weights profile (.npz from `kvlife codec calibrate`): "
                         f"{exc}") from None


PROFILE_FORMAT = "kvlife-codec-weights/1"


def save_profile(path, weights: list[tuple[np.ndarray, np.ndarray]], model: str, signature: str,
                 calibration: dict[str, Any]) -> None:
    """Write a profile as JSON, one layer per line (6 significant digits), with the model it was measured
    on and its signature (`kvlife.models.model_signature`), which is how a store finds a model's profile:

        {"format": "kvlife-codec-weights/1", "model": "qwen2.5-coder-0.5b", "signature": "3f0c...",
         "calibration": {...}, "n_layers": 24, "kv_heads": 2, "head_dim": 64,
         "keys": [[[...head_dim], ...kv_heads], ...layers], "values": [...]}
    """
    keys = np.stack([np.asarray(k, dtype=np.float64) for k, _ in weights])
    values = np.stack([np.asarray(v, dtype=np.float64) for _, v in weights])
    head = {"format": PROFILE_FORMAT, "model": model, "signature": signature, "calibration": calibration,
            "n_layers": int(keys.shape[0]), "kv_heads": int(keys.shape[1]), "head_dim": int(keys.shape[2])}

    def rows(array: np.ndarray) -> str:
        return ",\n".join("    " + json.dumps([[float(f"{v:.6g}") for v in head_row] for head_row in layer])
                          for layer in array)

    text = json.dumps(head, indent=2)[:-2] + ',\n  "keys": [\n' + rows(keys) + '\n  ],\n  "values": [\n'
    Path(path).write_text(text + rows(values) + "\n  ]\n}\n")


def read_profile(path) -> dict[str, Any]:
    """A JSON profile's model, signature, weights (per layer (keys, values) [kv_heads, head_dim]) and
    digest (of the weights); any problem is a one-line CodecError."""
    where = f"codec weights profile {path}"
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CodecError(f"cannot read {where}: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict) or raw.get("format") != PROFILE_FORMAT:
        raise CodecError(f"{where} is not a kvlife codec profile (expected \"format\": \"{PROFILE_FORMAT}\")")
    try:
        shape = (int(raw["n_layers"]), int(raw["kv_heads"]), int(raw["head_dim"]))
        keys = np.asarray(raw["keys"], dtype=np.float64)
        values = np.asarray(raw["values"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as exc:
        raise CodecError(f"{where} lacks a valid {exc} field") from None
    for name, array in (("keys", keys), ("values", values)):
        if array.shape != shape or not np.isfinite(array).all() or (array < 0).any():
            raise CodecError(f"{where}: {name} must be {shape[0]} layers x {shape[1]} heads x {shape[2]} "
                             "finite numbers >= 0")
    digest = hashlib.sha256(keys.astype("<f8").tobytes() + values.astype("<f8").tobytes()).hexdigest()[:16]
    return {"model": str(raw.get("model", "?")), "signature": str(raw.get("signature", "")), "digest": digest,
            "weights": [(keys[i], values[i]) for i in range(shape[0])]}


@torch.no_grad()
def calibrate(model: Any, tokenizer: Any, text: str,
              tokens: int = 2048) -> list[tuple[np.ndarray, np.ndarray]]:
    """A loaded model's channel weights measured on the first `tokens` tokens of `text`."""
    from kvlife.codec.rope import rope_from_config

    ids = tokenizer(text, return_tensors="pt").input_ids[:, :tokens].to(next(model.parameters()).device)
    rope = rope_from_config(model.config)
    return channel_weights(model, ids, rotary_dim=rope.rotary_dim if rope else 0)
