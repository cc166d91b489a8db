"""Tiny random-initialised models built from configs (no weights needed)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from kvlife.attention import KVLIFE_ATTENTION, register

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=256, max_position_embeddings=4096)


def tiny_config(kind: str):
    if kind == "llama":
        return AutoConfig.for_model("llama", **COMMON, head_dim=16)
    if kind == "qwen2":
        return AutoConfig.for_model("qwen2", **COMMON)
    if kind == "gemma3":
        return AutoConfig.for_model(
            "gemma3_text", **COMMON, head_dim=16, sliding_window=8,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=16,
        )
    raise ValueError(kind)


def tiny_model(kind: str = "qwen2", attn: str = KVLIFE_ATTENTION, seed: int = 0):
    register()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind), attn_implementation=attn, dtype=torch.float32)
    return model.eval()


class ByteTokenizer:
    """A minimal tokenizer for tiny models: bytes 0..255 with no special tokens."""

    eos_token_id = 0
    pad_token_id = 0
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [b if b != 0 else 1 for b in text.encode("utf-8")]

    def __call__(self, text, add_special_tokens=False, **_):
        return {"input_ids": self.encode(text)}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i != 0).decode("utf-8", errors="replace")

    def convert_tokens_to_ids(self, token):
        return None


def tiny_tokenizer():
    """A real (fast) word-level tokenizer over a small vocabulary, savable with a model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<eos>"] + [chr(c) for c in range(97, 123)] + [str(d) for d in range(10)]
    vocab = {w: i for i, w in enumerate(words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>")
