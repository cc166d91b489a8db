"""Model registry: checksums, clear errors, local directories."""

import hashlib

import pytest

from kvlife import models
from kvlife.errors import ModelError


def _fake_spec(tmp_path, content=b"GGUF-fake-model-bytes", sha=None, size=None):
    package_dir = tmp_path / "packages"
    (package_dir / "pkg_a" / "data").mkdir(parents=True)
    (package_dir / "pkg_b" / "data").mkdir(parents=True)
    half = len(content) // 2
    (package_dir / "pkg_a" / "data" / "part01.bin").write_bytes(content[:half])
    (package_dir / "pkg_b" / "data" / "part02.bin").write_bytes(content[half:])
    spec = models.ModelSpec(
        name="fake", description="", packages=(), parts=("pkg_a/data/part01.bin", "pkg_b/data/part02.bin"),
        gguf_name="fake.gguf", sha256=sha or hashlib.sha256(content).hexdigest(), size=size,
    )
    return spec, package_dir


def test_assemble_concatenates_parts_and_checks_sha(tmp_path):
    spec, package_dir = _fake_spec(tmp_path)
    out = models.assemble(spec, package_dir, tmp_path / "fake.gguf")
    assert out.read_bytes() == b"GGUF-fake-model-bytes"


def test_checksum_mismatch_is_refused_and_removed(tmp_path):
    spec, package_dir = _fake_spec(tmp_path, sha="0" * 64)
    with pytest.raises(ModelError, match="sha256"):
        models.assemble(spec, package_dir, tmp_path / "fake.gguf")
    assert not (tmp_path / "fake.gguf").exists()
    assert not (tmp_path / "fake.gguf.tmp").exists()


def test_size_mismatch_is_refused(tmp_path):
    spec, package_dir = _fake_spec(tmp_path, size=3)
    with pytest.raises(ModelError, match="bytes"):
        models.assemble(spec, package_dir, tmp_path / "fake.gguf")


def test_missing_parts_say_what_to_run(tmp_path):
    spec, package_dir = _fake_spec(tmp_path)
    (package_dir / "pkg_b" / "data" / "part02.bin").unlink()
    with pytest.raises(ModelError, match="kvlife models pull fake"):
        models.assemble(spec, package_dir, tmp_path / "fake.gguf")


def test_registry_checksums_are_the_published_ones():
    assert models.REGISTRY["qwen2.5-coder-0.5b"].sha256.startswith("1d9614638d18")
    assert models.REGISTRY["qwen2.5-coder-0.5b"].size == 491_400_064
    assert models.REGISTRY["smollm2-135m"].sha256.startswith("b179c9523d0e")
    assert models.REGISTRY["gemma3-270m"].sha256.startswith("a5fd3b62230a")
    assert models.DEFAULT_MODEL in models.REGISTRY


def test_unknown_and_unpulled_models_give_one_line_errors(tmp_path):
    with pytest.raises(ModelError, match="unknown model 'nope'"):
        models.resolve("nope")
    with pytest.raises(ModelError, match="kvlife models pull smollm2-135m"):
        models.resolve("smollm2-135m")  # KVLIFE_HOME is an empty temporary dir here


def test_broken_directory_is_refused(tmp_path):
    (tmp_path / "broken").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        models.resolve(str(tmp_path / "broken"))
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="cannot load"):
        models.load(str(tmp_path / "broken"))


def test_local_hf_directory_loads_and_a_session_switches_it_to_kvlife_attention(tmp_path):
    import torch

    from kvlife.session import Session
    from tiny import tiny_model, tiny_tokenizer

    reference = tiny_model("qwen2", attn="sdpa")
    reference.save_pretrained(tmp_path / "tiny")
    tiny_tokenizer().save_pretrained(tmp_path / "tiny")
    model, tokenizer = models.load(str(tmp_path / "tiny"), dtype="float32")
    assert tokenizer.encode("a b", add_special_tokens=False)
    assert model.config._attn_implementation != "kvlife"  # models.py knows nothing of kvlife's attention
    session = Session(model, tokenizer, "dense")
    assert model.config._attn_implementation == "kvlife"
    ids = list(range(1, 48))
    session.cache = session.new_cache()
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0]
    got = session.forward(ids, "prefill", all_logits=True)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_listing_marks_pulled_state():
    rows = {row["name"]: row for row in models.listing()}
    assert set(rows) == set(models.REGISTRY)
    assert all(not row["pulled"] for row in rows.values())
