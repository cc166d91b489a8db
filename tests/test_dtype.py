"""The model dtype: `auto` follows the hardware, bad values are one-line errors, runs record it."""

import json

import pytest
import torch

from kvlife import models
from kvlife.cli import main
from kvlife.errors import ModelError


def test_auto_is_bfloat16_only_on_cuda_or_a_cpu_with_native_bf16(monkeypatch):
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)
    assert models.resolve_dtype("auto", "cpu") is torch.float32
    assert models.resolve_dtype("auto", "cuda") is torch.bfloat16
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    assert models.resolve_dtype("auto", "cpu") is torch.bfloat16
    assert models.resolve_dtype("float32", "cuda") is torch.float32
    assert models.resolve_dtype(torch.bfloat16) is torch.bfloat16


def test_native_bf16_is_read_from_the_cpu_not_guessed(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert models.cpu_has_native_bf16()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert not models.cpu_has_native_bf16()


def test_unknown_dtype_is_refused():
    with pytest.raises(ModelError, match="unknown dtype 'fp8'"):
        models.resolve_dtype("fp8")


@pytest.mark.parametrize("argv,message", [
    (["bench", "--dtype", "fp8"], "unknown --dtype 'fp8'"),
    (["bench", "--context-tokens", "0"], "--context-tokens must be a positive"),
    (["bench", "--context-tokens", "-5"], "--context-tokens must be a positive"),
    (["bench", "--tasks", "kv", "--context-tokens", "40000"], "does not fit the model's 32768-token window"),
])
def test_bad_sizes_and_dtypes_are_one_line_errors(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_a_run_records_its_dtype_in_config_and_rows(tmp_path):
    from kvlife.bench import runner
    from kvlife.bench.runner import BenchConfig
    from tiny import ByteTokenizer, tiny_model

    config = BenchConfig(model="tiny", tasks=["kv"], mode="multi-request", profile="default", samples=1,
                         prompt_format="plain", max_turns=1, context_tokens=60)
    model = tiny_model().to(torch.bfloat16)
    out = runner.run(config, out=tmp_path / "run", model=model, tokenizer=ByteTokenizer(), progress=False)
    saved = json.loads((out / "config.json").read_text())
    assert saved["dtype"] == "bfloat16" and saved["identity"]["dtype"] == "bfloat16"
    assert saved["identity"]["context_tokens"] == 60
    rows = runner.read_rows(out / "predictions.jsonl")
    assert rows and all(row["dtype"] == "bfloat16" for row in rows)
    # float32 runs keep the identity (and run id) they had before the option existed
    assert "dtype" not in BenchConfig(model="m", tasks=["kv"], dtype="float32").identity()
