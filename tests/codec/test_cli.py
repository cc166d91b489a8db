"""`kvlife codec encode|decode|inspect` on files written by KVCache.save."""

import json

import torch

from kvlife.cache import KVCache
from kvlife.codec import error_bound
from kvlife.codec.cli import main

from .helpers import assert_within_bound, real_like_layers


def test_encode_inspect_decode(tmp_path, capsys):
    layers = [(k, v, torch.arange(k.shape[2]).expand(k.shape[1], -1))
              for k, v, _ in real_like_layers(tokens=70)]
    cache = KVCache.from_tensors(layers)
    cache.save(tmp_path / "c.safetensors")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(
        {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "hidden_size": 32,
         "num_attention_heads": 2}))
    assert main(["codec", "encode", str(tmp_path / "c.safetensors"), "-o", str(tmp_path / "c.kvc"),
                 "--level", "high", "--model-dir", str(tmp_path / "model")]) == 0
    assert "bits/element" in capsys.readouterr().out
    assert main(["codec", "inspect", str(tmp_path / "c.kvc"), "--chunks"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rope"] == {"theta": 10000.0, "rotary_dim": 16} and info["chunk_levels"] == ["high"]
    assert main(["codec", "decode", str(tmp_path / "c.kvc"), "-o", str(tmp_path / "d.safetensors")]) == 0
    decoded, _ = KVCache.load(tmp_path / "d.safetensors")
    for (_, _, p), (_, _, p2) in zip(cache.to_tensors(), decoded.to_tensors()):
        assert torch.equal(p, p2)
    bounds = error_bound((tmp_path / "c.kvc").read_bytes())
    assert_within_bound(cache.to_tensors(), decoded.to_tensors(), bounds)
    assert main(["codec", "encode", str(tmp_path / "c.safetensors"), "-o", str(tmp_path / "b.kvc"),
                 "--scheme", "int8+zstd"]) == 0


def test_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "bad.kvc").write_bytes(b"nonsense")
    assert main(["codec", "inspect", str(tmp_path / "bad.kvc")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "magic" in err and err.count("\n") == 1
    assert main(["codec", "decode", str(tmp_path / "missing.kvc"), "-o", str(tmp_path / "x")]) == 2


def test_encode_with_weights_profile(tmp_path):
    import numpy as np

    from kvlife.codec.calibrate import save_weights

    layers = [(k, v, torch.arange(k.shape[2]).expand(k.shape[1], -1))
              for k, v, _ in real_like_layers(tokens=40)]
    KVCache.from_tensors(layers).save(tmp_path / "c.safetensors")
    weights = [(np.ones((2, 16)), np.linspace(0.1, 2, 32).reshape(2, 16)) for _ in layers]
    save_weights(tmp_path / "w.npz", weights)
    assert main(["codec", "encode", str(tmp_path / "c.safetensors"), "-o", str(tmp_path / "c.kvc"),
                 "--weights", str(tmp_path / "w.npz")]) == 0
    (tmp_path / "bad.npz").write_bytes(b"junk")
    assert main(["codec", "encode", str(tmp_path / "c.safetensors"), "-o", str(tmp_path / "c.kvc"),
                 "--weights", str(tmp_path / "bad.npz")]) == 2


def test_calibrate_writes_a_json_profile_a_store_encoding_reads(tmp_path, capsys):
    from kvlife.codec.calibrate import read_profile
    from kvlife.models import model_signature
    from kvlife.store.profiles import codec_setup
    from tiny import tiny_model, tiny_tokenizer

    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path / "tiny")
    tiny_tokenizer().save_pretrained(tmp_path / "tiny")
    (tmp_path / "text.txt").write_text("a calibration text that is not the one encoded later. " * 20)
    out = tmp_path / "tiny.json"
    tiny = str(tmp_path / "tiny")
    assert main(["codec", "calibrate", "--model", tiny, "--text", str(tmp_path / "text.txt"),
                 "--tokens", "128", "-o", str(out)]) == 0
    layers = model.config.num_hidden_layers
    assert f"channel weights of {layers} layers" in capsys.readouterr().out
    found = read_profile(out)
    assert found["signature"] == model_signature(model) and len(found["weights"]) == layers
    setup = codec_setup(model, f"kvlife:balanced+profile={out}")
    assert setup.namespace_encoding == f"kvlife:balanced+profile:{found['digest']}"
    assert setup.weights is not None
    assert main(["codec", "calibrate", "--model", tiny, "--text", str(tmp_path / "none.txt"),
                 "-o", str(out)]) == 2
