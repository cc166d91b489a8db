"""`kvlife codec encode|decode|inspect`: the codec on cache files written by `KVCache.save`.

    kvlife codec encode cache.safetensors -o cache.kvc [--level balanced] [--scheme kvlife]
                        [--model-dir DIR | --rope-theta 1e6 --rotary-dim 64] [--chunk-tokens 256]
                        [--weights weights.json|weights.npz]
    kvlife codec decode cache.kvc -o cache.safetensors
    kvlife codec inspect cache.kvc [--chunks]
    kvlife codec calibrate (--model NAME | --model-dir DIR) -o weights.json|weights.npz [--text FILE]
        (once per model; a .json profile names its model, so a store's kvlife:LEVEL+profile=FILE uses it)

The main CLI calls `add_parser(subparsers)` and, for the parsed arguments, `run(args)`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvlife.codec.api import BASELINES, decode, encode, encode_baseline, inspect
from kvlife.codec.calibrate import calibrate, load_weights, save_profile, save_weights
from kvlife.codec.format import CodecError
from kvlife.codec.levels import DEFAULT_LEVEL, LEVELS, OTHER_LEVELS
from kvlife.codec.rope import RopeSpec, rope_from_config


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("codec", help="encode, decode or inspect KV cache files with the codec")
    actions = parser.add_subparsers(dest="codec_action", required=True)

    enc = actions.add_parser("encode", help="encode a saved cache (.safetensors from KVCache.save)")
    enc.add_argument("cache", type=Path)
    enc.add_argument("-o", "--output", type=Path, required=True)
    enc.add_argument("--scheme", default="kvlife", choices=("kvlife", *BASELINES))
    enc.add_argument("--level", default=DEFAULT_LEVEL, choices=[*LEVELS, *OTHER_LEVELS])
    enc.add_argument("--chunk-tokens", type=int, default=256)
    enc.add_argument("--model-dir", type=Path,
                     help="HF model dir whose config.json gives the RoPE (keys coded pre-RoPE)")
    enc.add_argument("--rope-theta", type=float, help="RoPE base, to code keys pre-RoPE without a model dir")
    enc.add_argument("--rotary-dim", type=int, help="dims RoPE rotates (default: head_dim)")
    enc.add_argument("--delta", default="auto", choices=("auto", "off"))
    enc.add_argument("--weights", type=Path,
                     help="channel weights profile (.json or .npz from `kvlife codec calibrate`)")

    cal = actions.add_parser("calibrate",
                             help="measure a model's K/V channel weights once (an encoder profile)")
    which = cal.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="an embedded model's name (`kvlife models`) or a model directory")
    which.add_argument("--model-dir", type=Path, help="Hugging Face model directory")
    cal.add_argument("--text", type=Path, default=Path("/usr/share/common-licenses/LGPL-2.1"),
                     help="calibration text (not the text you will encode)")
    cal.add_argument("--tokens", type=int, default=2048)
    cal.add_argument("-o", "--output", type=Path, required=True,
                     help=".json: the profile with its model's signature (what stores read); else .npz")

    dec = actions.add_parser("decode", help="decode a stream back to a cache file")
    dec.add_argument("stream", type=Path)
    dec.add_argument("-o", "--output", type=Path, required=True)

    ins = actions.add_parser("inspect", help="print what a stream holds, as JSON")
    ins.add_argument("stream", type=Path)
    ins.add_argument("--chunks", action="store_true", help="list every chunk's size and level")
    return parser


def _read(path: Path) -> bytes:
    if not path.is_file():
        raise CodecError(f"no file at {path}")
    return path.read_bytes()


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _rope(args, head_dim: int) -> RopeSpec | None:
    if args.model_dir is not None:
        config_path = args.model_dir / "config.json"
        if not config_path.is_file():
            raise CodecError(f"no config.json in {args.model_dir}")
        rope = rope_from_config(json.loads(config_path.read_text()))
        if rope is None:
            print(f"note: {args.model_dir} does not use plain RoPE; keys are coded post-RoPE")
        return rope
    if args.rope_theta is not None:
        return RopeSpec(args.rope_theta, args.rotary_dim or head_dim)
    return None


def run(args: argparse.Namespace) -> int:
    from kvlife.cache import KVCache

    if args.codec_action == "encode":
        cache, metadata = KVCache.load(args.cache)
        del metadata
        if args.scheme == "kvlife":
            head_dim = min(k.shape[-1] for k, _, _ in cache.to_tensors())
            weights = load_weights(args.weights) if args.weights else None
            blob = encode(cache, level=args.level, chunk_tokens=args.chunk_tokens, rope=_rope(args, head_dim),
                          delta=args.delta, weights=weights)
        else:
            blob = encode_baseline(args.scheme, cache, chunk_tokens=args.chunk_tokens)
        _write(args.output, blob)
        info = inspect(blob)
        print(f"{args.output}: {info['total_bytes']} bytes, {info['bits_per_element']:.3f} bits/element, "
              f"{16 / info['bits_per_element']:.2f}x smaller than fp16 ({info['scheme']}"
              f"{', ' + args.level if args.scheme == 'kvlife' else ''}, {info['chunks']} chunks)")
        return 0
    if args.codec_action == "calibrate":
        if not args.text.is_file():
            raise CodecError(f"no calibration text at {args.text}")
        return _calibrate(args)
    if args.codec_action == "decode":
        cache = decode(_read(args.stream))
        cache.save(args.output, {"decoded_from": str(args.stream)})
        print(f"{args.output}: {len(cache.layers)} layers, {max(cache.tokens_held(), default=0)} tokens")
        return 0
    info = inspect(_read(args.stream))
    if not args.chunks:
        info = {k: v for k, v in info.items() if k not in ("chunk_bytes", "chunk_levels", "shapes")}
    print(json.dumps(info, indent=1))
    return 0


def _calibrate(args) -> int:
    from kvlife import models

    name = str(args.model or args.model_dir)
    model, tokenizer = models.load(name, device="cpu", dtype="float32")
    text = args.text.read_text(errors="replace")
    weights = calibrate(model, tokenizer, text, args.tokens)
    if args.output.suffix == ".json":
        calibration = {"text": args.text.name, "tokens": args.tokens, "dtype": "float32",
                       "how": "kvlife codec calibrate: query energy per key channel (RoPE pairs, query heads "
                              "of a group summed), o_proj column energy per value channel"}
        save_profile(args.output, weights, models.model_name(name), models.model_signature(model),
                     calibration)
    else:
        save_weights(args.output, weights)
    print(f"{args.output}: channel weights of {len(weights)} layers")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m kvlife.codec.cli`), printing errors in one line."""
    import sys

    from kvlife.errors import KvlifeError

    parser = argparse.ArgumentParser(prog="kvlife")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return run(args)
    except KvlifeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
