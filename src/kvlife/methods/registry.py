"""Every kvlife method by name. Adding a method: its file, a line here, a README row.

The generic tests run over everything listed here, per stage: tests/methods/test_compress_matrix.py
(compress), tests/methods/test_prefill_methods.py (prefill), tests/methods/test_stage_matrix.py
(load and prompt).
"""

from __future__ import annotations

from kvlife.errors import SpecError
from kvlife.methods.assemble.ape import Ape
from kvlife.methods.assemble.cacheblend import CacheBlend
from kvlife.methods.assemble.concat import Concat
from kvlife.methods.assemble.epic import Epic
from kvlife.methods.base import Dense, Method
from kvlife.methods.compress.adakv import AdaKV
from kvlife.methods.compress.chunkkv import ChunkKV
from kvlife.methods.compress.duo_attention import DuoAttention
from kvlife.methods.compress.expected_attention import ExpectedAttention
from kvlife.methods.compress.h2o import H2O
from kvlife.methods.compress.keydiff import KeyDiff
from kvlife.methods.compress.kivi import Kivi
from kvlife.methods.compress.kvzip import KVzip
from kvlife.methods.compress.pyramidkv import PyramidKV
from kvlife.methods.compress.snapkv import SnapKV
from kvlife.methods.compress.streamingllm import StreamingLLM
from kvlife.methods.compress.tova import TOVA
from kvlife.methods.load.quest import Quest
from kvlife.methods.load.retrieval_attention import RetrievalAttention
from kvlife.methods.prefill.a_shape import AShape
from kvlife.methods.prefill.flexprefill import FlexPrefill
from kvlife.methods.prefill.minference import MInference
from kvlife.methods.prefill.tri_shape import TriShape
from kvlife.methods.prompt.lingua import Lingua

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in [Dense, StreamingLLM, SnapKV, PyramidKV, H2O, TOVA, AdaKV, Kivi, KVzip,
                             ExpectedAttention, KeyDiff, DuoAttention, ChunkKV,
                             Quest, RetrievalAttention, Lingua, AShape, TriShape, MInference, FlexPrefill,
                             Concat, CacheBlend, Epic, Ape]
}


def get(name: str) -> type[Method]:
    if name not in METHODS:
        raise SpecError(f"unknown method {name!r}; valid: {', '.join(sorted(METHODS))}")
    return METHODS[name]

