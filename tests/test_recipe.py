import pytest

from kvlife.errors import SpecError
from kvlife.recipe import parse


def test_dense_and_none_are_the_empty_recipe():
    for spec in ("dense", None, " dense "):
        recipe = parse(spec)
        assert recipe.is_dense and recipe.spec == "dense"
    recipe = parse("dense+streamingllm")  # the dense prefill, then a compress method
    assert recipe.prefill is None and recipe.compress.name == "streamingllm"


def test_parameters_are_parsed_and_typed():
    recipe = parse("streamingllm(n_sink=4, n_local=1024)")
    assert recipe.compress.n_sink == 4 and recipe.compress.n_local == 1024
    assert recipe.spec == "streamingllm"  # defaults are not repeated
    recipe = parse("streamingllm(ratio=0.25)")
    assert recipe.compress.ratio == 0.25 and recipe.spec == "streamingllm(ratio=0.25)"
    assert parse(recipe.spec).compress == recipe.compress


@pytest.mark.parametrize("spec,message", [
    ("nope", "unknown method 'nope'; valid:"),
    ("streamingllm(window=3)", "unknown parameter 'window'; valid: ratio, budget, n_sink, n_local"),
    ("streamingllm(n_sink)", "needs key=value"),
    ("streamingllm(n_sink=4", "unbalanced"),
    ("streamingllm)", "unbalanced"),
    ("streamingllm+streamingllm", "one method per stage"),
    ("streamingllm(ratio=2)", "ratio must be in"),
    ("streamingllm(ratio=0.5,budget=10)", "not both"),
    ("streamingllm(n_local=abc)", "must be a number"),
    ("streamingllm+", "empty method"),
    ("Stream-LLM", "cannot parse"),
    ("snapkv(ratio=0.5,ratio=0.3)", "parameter 'ratio' is given twice"),
    ("streamingllm(n_sink=4, n_sink=4)", "given twice"),
    ("dense+dense", "two prefill methods"),
    ("", "empty method spec"),
    ("  ", "empty method spec"),
])
def test_bad_specs_give_one_line_errors(spec, message):
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        parse(spec)
    assert "\n" not in str(info.value)
