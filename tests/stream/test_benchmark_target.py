"""The quality half of issue 8's target as benchmarks/stream.py judges it: synthetic runs, no model."""

import importlib.util
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "stream.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("stream_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def runs(scores: list[list[float]], nll_shift: float = 0.0, tokens: int = 40) -> list[dict]:
    """One run per sample: its answers' scores, and reference NLLs = the dense ones (`dense`) +
    `nll_shift`."""
    nll = [0.5 + nll_shift + 0.1 * (t % 5) for t in range(tokens)]
    return [{"scores": s, "accuracy": sum(s) / len(s), "token_nll": nll} for s in scores]


def dense(samples: int, tokens: int = 40) -> list[dict]:
    return [{"token_nll": [0.5 + 0.1 * (t % 5) for t in range(tokens)]} for _ in range(samples)]


ALL_RIGHT = [[1.0] * 4 for _ in range(9)]


def test_the_same_answers_and_nlls_pass(bench):
    picked = {"adaptive": runs(ALL_RIGHT), "high": runs(ALL_RIGHT)}
    out = bench.quality_test("adaptive", ["high"], picked, dense(9))
    assert out["quality_ok"] and out["accuracy_strict_ok"]
    assert out["accuracy_diff"]["diff"] == 0 and out["accuracy_diff"]["answers"] == 36


def test_one_answer_lost_fails_only_the_strict_comparison(bench):
    lost = [row[:] for row in ALL_RIGHT]
    lost[3][1] = 0.0
    picked = {"adaptive": runs(lost), "high": runs(ALL_RIGHT)}
    out = bench.quality_test("adaptive", ["high"], picked, dense(9))
    assert out["accuracy_ok"] and not out["accuracy_strict_ok"]
    assert out["accuracy_diff"]["losses"] == 1 and out["accuracy_diff"]["wins"] == 0
    assert out["accuracy_diff"]["diff"] == pytest.approx(-1 / 36)


def test_many_answers_lost_fail_the_accuracy_test(bench):
    lost = [[0.0, 0.0, 1.0, 1.0] for _ in range(9)]  # 18 of 36 lost, none won
    picked = {"adaptive": runs(lost), "high": runs(ALL_RIGHT), "extreme": runs(lost)}
    out = bench.quality_test("adaptive", ["high", "extreme"], picked, dense(9))
    assert not out["accuracy_ok"] and not out["quality_ok"] and out["accuracy_vs"] == "high"
    assert out["accuracy_diff"]["high"] < 0


def test_a_higher_perplexity_beyond_noise_fails(bench):
    picked = {"adaptive": runs(ALL_RIGHT, nll_shift=0.2), "high": runs(ALL_RIGHT, nll_shift=0.01)}
    out = bench.quality_test("adaptive", ["high"], picked, dense(9))
    assert out["accuracy_ok"] and not out["ppl_ok"] and not out["quality_ok"]
    assert out["ppl_diff"]["diff"] == pytest.approx(math.exp(0.2) - math.exp(0.01))
    assert out["ppl_diff"]["low"] > 0


def test_a_lower_perplexity_passes_against_every_meeting_level(bench):
    picked = {"adaptive": runs(ALL_RIGHT, nll_shift=0.01), "high": runs(ALL_RIGHT, nll_shift=0.02),
              "extreme": runs(ALL_RIGHT, nll_shift=0.3)}
    out = bench.quality_test("adaptive", ["high", "extreme"], picked, dense(9))
    assert out["ppl_ok"] and out["ppl_vs"] == "high"


def test_results_without_per_answer_scores_count_one_figure_per_sample(bench):
    old = [{"accuracy": 0.5, "token_nll": [0.5]}, {"accuracy": 1.0, "token_nll": [0.5]}]
    assert bench.answer_scores(old) == [0.5, 1.0]
