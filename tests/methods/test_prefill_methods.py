"""Every sparse prefill method: fast path equals its reference, dense where it must be, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn.attention.flex_attention import flex_attention

from kvlife.attention import AttnCall, StepContext, dense_attention, reference_attention
from kvlife.errors import SpecError
from kvlife.methods import registry
from kvlife.methods.prefill import flex, matmul_kernel, patterns
from kvlife.methods.prefill import sparse as sparse_module
from kvlife.methods.prefill.a_shape import AShape
from kvlife.methods.prefill.sparse import SparsePrefill, density
from kvlife.recipe import parse
from kvlife.session import Session
from tiny import ByteTokenizer, tiny_model

from .test_prefill_kernels import random_call

PREFILL = sorted(name for name, cls in registry.METHODS.items() if cls.stage == "prefill" and name != "dense")
TOL = dict(atol=2e-5, rtol=2e-5)


def config_file(tmp_path, n_layers=1, q_heads=6, max_tokens=4096, heads=None, **extra) -> str:
    heads = heads or [
        {"pattern": "vertical_slash", "vertical_size": 9, "slash_size": 3},
        {"pattern": "block_sparse", "top_k": 1},
        {"pattern": "a_shape", "n_init": 2, "n_local": 21},
        {"pattern": "dense"},
        {"pattern": "vertical_slash", "vertical_size": 40, "slash_size": 120},
        {"pattern": "block_sparse", "top_k": 2},
    ]
    config = {"format": patterns.FORMAT, "model": "tiny", "n_layers": n_layers, "q_heads": q_heads,
              "max_tokens": max_tokens, "layers": [heads] * n_layers, **extra}
    path = tmp_path / "patterns.json"
    path.write_text(json.dumps(config))
    return str(path)


# Small sizes, so that ~200-token inputs really are sparse.
SPECS = {
    "a_shape": ["a_shape(n_init=4,n_local=40)", "a_shape(n_init=0,n_local=70)"],
    "tri_shape": ["tri_shape(n_init=4,n_local=40,n_last=30)"],
    "minference": [
        "minference(vertical_size=30,slash_size=100)",
        "minference(pattern=block_sparse,top_k=2)",
        "minference(config={config})",
    ],
    "flexprefill": [
        "flexprefill(gamma=0.8)",
        "flexprefill(gamma=0.8,tau=1.0)",
        "flexprefill(gamma=0.5,tau=0)",
    ],
}


def test_every_registered_prefill_method_is_tested():
    assert sorted(SPECS) == PREFILL


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(matmul_kernel, "CHUNK_ELEMENTS", 8192)
    monkeypatch.setattr(matmul_kernel, "LONG_RUN", 16)
    # Small inputs make dense-ish patterns: keep them sparse here (the fallback has its own test).
    monkeypatch.setattr(SparsePrefill, "DENSE_ABOVE", 1.0)
    monkeypatch.setattr(AShape, "DENSE_ABOVE", 1.0)
    yield  # one torch thread: conftest.py's one_thread


@pytest.mark.parametrize("spec", [s for specs in SPECS.values() for s in specs])
@pytest.mark.parametrize("n", [197, 333])
def test_fast_path_equals_reference(spec, n, tmp_path):
    method = parse(spec.format(config=config_file(tmp_path))).prefill
    call = random_call(n, heads=6, kv_heads=2, dim=8, seed=n)
    mask = method.mask(call)
    assert mask is not None and mask.shape == (6, n, n)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    assert bool((mask <= causal).all()) and bool(mask.diagonal(dim1=1, dim2=2).all())  # causal, sees itself
    assert int(mask.sum()) < 6 * int(causal.sum())  # really sparse
    torch.testing.assert_close(method.attend(call), method.reference(call), **TOL)
    torch.testing.assert_close(method.reference(call), reference_attention(call, mask=mask), **TOL)


def with_kernel(spec: str, kernel: str) -> str:
    return spec.replace(")", f",kernel={kernel})") if "(" in spec else f"{spec}(kernel={kernel})"


@pytest.mark.parametrize("spec", [s for specs in SPECS.values() for s in specs])
def test_flex_kernel_equals_reference(spec, tmp_path, monkeypatch):
    """kernel=flex (what CUDA runs by default) on every method's layouts, uncompiled here: compiling
    flex_attention for CPU takes ~30 s per shape (tests/methods/test_prefill_flex.py compiles one)."""
    monkeypatch.setattr(flex, "_compiled", lambda: flex_attention)
    method = parse(with_kernel(spec.format(config=config_file(tmp_path)), "flex")).prefill
    call = random_call(197, heads=6, kv_heads=2, dim=8, seed=5)
    calls = []
    monkeypatch.setattr(sparse_module, "flex_sparse_attention",
                        lambda *args, **kw: calls.append(1) or flex.flex_sparse_attention(*args, **kw))
    torch.testing.assert_close(method.attend(call), method.reference(call), **TOL)
    assert calls  # the flex kernel ran


def test_auto_kernel_is_flex_on_cuda_only():
    assert sparse_module.pick_kernel("auto", torch.device("cuda")) == "flex"
    assert sparse_module.pick_kernel("auto", torch.device("cpu")) == "kvlife"
    assert sparse_module.pick_kernel("flex", torch.device("cpu")) == "flex"
    assert sparse_module.pick_kernel("kvlife", torch.device("cuda")) == "kvlife"
    with pytest.raises(SpecError, match="unknown kernel 'triton'; valid: auto, kvlife, flex"):
        parse("minference(kernel=triton)")


def test_costs_are_recorded_in_the_step_stats():
    step = StepContext(cache=None, query_positions=torch.arange(200))
    method = parse("a_shape(n_init=4,n_local=40)").prefill
    for n in (200, 30):  # a sparse layer, then one too short to be sparse
        call = random_call(n)
        call.step = step
        method.attend(call)
    figures = step.stats["sparse_prefill"]
    assert (figures["sparse_layers"], figures["dense_layers"]) == (1, 1)
    assert figures["estimate_s"] > 0 and figures["attention_s"] > 0


def test_tri_shape_last_rows_are_dense():
    call = random_call(200)
    method = parse("tri_shape(n_init=4,n_local=40,n_last=30)").prefill
    torch.testing.assert_close(method.attend(call)[:, :, -30:], dense_attention(call)[:, :, -30:], **TOL)


@pytest.mark.parametrize("spec", ["a_shape(n_init=64,n_local=150)", "tri_shape(n_init=0,n_local=200)",
                                  "minference(vertical_size=200,slash_size=50)", "minference(slash_size=200)",
                                  "minference(pattern=block_sparse,top_k=4)", "flexprefill(gamma=1.0,tau=0)"])
def test_patterns_covering_everything_reproduce_dense(spec):
    call = random_call(200)
    method = parse(spec).prefill
    mask = method.mask(call)
    assert mask is None or bool(mask.equal(torch.ones(200, 200, dtype=torch.bool).tril().expand_as(mask)))
    torch.testing.assert_close(method.attend(call), dense_attention(call), **TOL)


def test_dense_patterns_fall_back_to_dense_attention(monkeypatch):
    call = random_call(250)
    method = parse("minference(vertical_size=30,slash_size=100)").prefill
    assert density(method.layouts(call), 250) > 0.5
    for threshold, sparse in ((1.0, True), (0.35, False)):
        monkeypatch.setattr(SparsePrefill, "DENSE_ABOVE", threshold)
        assert (method.mask(call) is not None) == sparse
    torch.testing.assert_close(method.attend(call), dense_attention(call), **TOL)


@pytest.mark.parametrize("case", ["sliding", "extend", "short"])
@pytest.mark.parametrize("name", PREFILL)
def test_dense_where_the_layout_is_not_a_plain_first_prefill(case, name):
    call = random_call(150)
    if case == "sliding":
        call.sliding_window = 20
    elif case == "extend":  # 50 new queries on top of 100 cached keys
        call = AttnCall(**{**call.__dict__, "query": call.query[:, :, 100:], "q_pos": call.q_pos[100:]})
    else:
        call = random_call(40)
    method = registry.get(name)()
    assert method.mask(call) is None
    torch.testing.assert_close(method.attend(call), dense_attention(call), **TOL)


@pytest.mark.parametrize("spec,message", [
    ("minference(config=/no/such/file.json)", "pattern config '/no/such/file.json' not found"),
    ("minference(config=nosuchmodel)", "not a shipped config"),
    ("minference(pattern=diagonal)", "unknown pattern 'diagonal'"),
    ("minference(vertical_size=0)", "vertical_size must be a positive integer"),
    ("a_shape(n_local=0)", "n_local must be"),
    ("tri_shape(n_last=-1)", "n_last must be"),
    ("flexprefill(gamma=1.5)", "gamma must be in"),
])
def test_bad_specs_are_one_line_spec_errors(spec, message):
    with pytest.raises(SpecError, match=message) as info:
        parse(spec)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("change,message", [
    (dict(heads=[{"pattern": "zigzag"}] * 6), "unknown pattern 'zigzag'"),
    (dict(heads=[{"pattern": "vertical_slash", "vertical_size": 100, "slash_size": 99999}] * 6),
     "slash_size=99999 is larger than the sequence"),
    (dict(heads=[{"pattern": "block_sparse", "top_k": 65}] * 6, max_tokens=4096), "top_k=65 is larger"),
    (dict(heads=[{"pattern": "a_shape", "n_init": 4}] * 6), "needs an integer n_local"),
    (dict(heads=[{"pattern": "dense"}] * 5), "must list 6 heads"),
    (dict(format="other"), "is not a kvlife pattern config"),
])
def test_bad_configs_are_one_line_spec_errors(tmp_path, change, message):
    path = config_file(tmp_path, **change)
    with pytest.raises(SpecError, match=message) as info:
        parse(f"minference(config={path})")
    assert "\n" not in str(info.value)


def test_config_for_another_model_shape_fails_clearly(tmp_path):
    method = parse(f"minference(config={config_file(tmp_path, n_layers=2)})").prefill
    with pytest.raises(SpecError, match="is for a model with 2 layers x 6 query heads"):
        method.attend(random_call(150))


def test_unreadable_config_is_a_spec_error(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(SpecError, match="cannot read pattern config"):
        parse(f"minference(config={path})")


# ---- integration with a tiny model ------------------------------------------------------------------

CONTEXT = " ".join(f"item{i} = {i * 7 % 13};" for i in range(40))  # ~500 byte tokens


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2")


def session(model, recipe, mode):
    return Session(model, ByteTokenizer(), recipe, mode=mode, prompt_format="plain")


@pytest.mark.parametrize("mode", ["multi-turn", "multi-request"])
def test_a_shape_session_runs_and_large_windows_equal_dense(model, mode):
    results = {}
    for recipe in (None, "a_shape(n_init=4,n_local=8)", "a_shape(n_init=4,n_local=100000)"):
        chat = session(model, recipe, mode)
        chat.prefill(CONTEXT)
        results[recipe] = [chat.ask(q, max_new_tokens=5, reference="item3") for q in ("item3?", "item9?")]
    dense, sparse, large = results.values()
    for want, got in zip(dense, large):
        assert got.output_ids == want.output_ids and got.reference_nll == want.reference_nll
    assert any(got.reference_nll != want.reference_nll for want, got in zip(dense, sparse))


@pytest.mark.parametrize("mode", ["multi-turn", "multi-request"])
@pytest.mark.parametrize(
    "spec",
    [
        "tri_shape(n_init=4,n_local=64,n_last=16)",
        "minference(vertical_size=40,slash_size=100)",
        "minference(pattern=block_sparse,top_k=3)",
        "flexprefill",
        "a_shape(n_init=4,n_local=64)+snapkv(ratio=0.5)",
    ],
)
def test_sparse_prefill_sessions_stay_close_to_dense(model, mode, spec):
    dense, sparse = session(model, None, mode), session(model, spec, mode)
    dense.prefill(CONTEXT)
    sparse.prefill(CONTEXT)
    for query in ("item3?", "item9?"):
        want = dense.ask(query, max_new_tokens=3, reference="item3")
        got = sparse.ask(query, max_new_tokens=3, reference="item3")
        assert abs(got.reference_nll - want.reference_nll) < 0.5
        if "snapkv" not in spec:  # the cache itself is complete: same bytes as dense
            assert got.cache_bytes == want.cache_bytes


def test_search_writes_a_config_minference_runs(model, tmp_path):
    from kvlife.methods.prefill.search import search

    ids = ByteTokenizer().encode(CONTEXT)[:300]
    config = search(
        model, ByteTokenizer(), "tiny-qwen2", ids=ids, rows=64, target_recall=0.9, log=lambda *_: None
    )
    assert len(config["layers"]) == 4 and all(len(heads) == 4 for heads in config["layers"])
    for heads in config["layers"]:
        for entry in heads:
            assert entry["pattern"] in patterns.PATTERNS
            assert entry["recall"] >= 0.9 and 0 < entry["density"] <= 1
    path = tmp_path / "tiny.json"
    patterns.write(path, config)
    chat = session(model, f"minference(config={path})", "multi-request")
    chat.prefill(CONTEXT)
    assert chat.ask("item3?", max_new_tokens=2).output_ids


def test_search_patterns_command(tmp_path, capsys):
    from kvlife.cli import main
    from tiny import tiny_tokenizer

    tiny_model("qwen2", attn="sdpa").save_pretrained(tmp_path / "tiny")
    tiny_tokenizer().save_pretrained(tmp_path / "tiny")
    out = tmp_path / "patterns.json"
    args = [
        "search-patterns",
        "--model",
        str(tmp_path / "tiny"),
        "--out",
        str(out),
        "--tokens",
        "200",
        "--rows",
        "32",
    ]
    assert main([*args, "--recall", "1.5"]) == 2
    assert "--recall must be in (0, 1]" in capsys.readouterr().err
    assert main(args) == 0
    config = patterns.load(str(out))
    assert (config.n_layers, config.q_heads) == (4, 4)
    assert parse(f"minference(config={out})").prefill.config == str(out)
