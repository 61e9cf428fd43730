"""The testbed architecture: a small standard ``Qwen3ForCausalLM`` (GQA + RoPE + q/k RMSNorm)."""

from __future__ import annotations

from kvpolicy.lab.testbed.tokenizer import VOCAB

ARCH = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=3,
    num_attention_heads=8,
    # 4, not 2: with 2 KV heads (64 value dimensions in all) four values read at once in multi_value came out
    # as values absent from the context; 4 cost no attention compute (docs/testbed.md, "Four KV heads")
    num_key_value_heads=4,
    head_dim=32,
    max_position_embeddings=8192,
    rope_theta=10000.0,
)


def make_config(**overrides):
    from transformers import Qwen3Config

    kwargs = dict(ARCH, **overrides)
    return Qwen3Config(
        vocab_size=VOCAB.size,
        tie_word_embeddings=True,
        bos_token_id=VOCAB.bos,
        eos_token_id=VOCAB.eos,
        pad_token_id=VOCAB.pad,
        attention_dropout=0.0,
        use_sliding_window=False,
        attention_bias=True,
        **kwargs,
    )
