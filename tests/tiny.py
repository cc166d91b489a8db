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
    if kind in HYBRID:
        return AutoConfig.for_model(kind, hidden_size=64, vocab_size=256, num_hidden_layers=4,
                                    max_position_embeddings=4096, **HYBRID[kind])
    raise ValueError(kind)


# State-space and hybrid models (kvlife/recurrent.py): 4 layers, recurrent ones and (except mamba2) attention
# ones; tests/test_hybrid.py runs every one of them.
ATTN = dict(intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
HYBRID = {
    "mamba2": dict(
        num_heads=4, head_dim=32, state_size=16, n_groups=1, expand=2, conv_kernel=4, chunk_size=16
    ),
    "jamba": dict(
        **ATTN,
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=100,
        expert_layer_offset=99,
        num_experts=1,
        mamba_d_state=8,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_dt_rank=8,
    ),
    "zamba2": dict(
        num_attention_heads=4,
        num_key_value_heads=4,
        attention_head_dim=16,
        intermediate_size=128,
        layers_block_type=["mamba", "hybrid", "mamba", "hybrid"],
        mamba_d_state=8,
        mamba_headdim=16,
        mamba_ngroups=1,
        n_mamba_heads=8,
        chunk_size=16,
        use_mem_rope=True,
        num_mem_blocks=1,
    ),
    "lfm2": dict(**ATTN, full_attn_idxs=[1, 3], conv_L_cache=3),
    "qwen3_next": dict(
        **ATTN,
        head_dim=16,
        layer_types=["linear_attention", "full_attention"] * 2,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        decoder_sparse_step=1,
    ),
}


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
