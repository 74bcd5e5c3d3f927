"""Benchmark model shapes as plain dicts of Hugging Face `LlamaConfig` kwargs.

No jax/torch import, so the JAX and PyTorch benchmarks share one definition of each shape
(`transformers.LlamaConfig(**SHAPES[name])` or `lora_jax.LlamaConfig.from_hf(...)`). The GPU
machine has no internet, so models are random-initialised from these configs, never downloaded;
only the architecture matters for throughput.
"""

from __future__ import annotations

_LLAMA3_COMMON = dict(
    model_type="llama",  # accepted by transformers.LlamaConfig; required by LlamaConfig.from_hf
    vocab_size=128256,
    num_key_value_heads=8,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    attention_bias=False,
    mlp_bias=False,
    bos_token_id=128000,
    eos_token_id=128001,
)

SHAPES: dict[str, dict] = {
    # meta-llama/Llama-3.2-1B: tied embeddings, llama3 RoPE scaling.
    "1b": dict(
        _LLAMA3_COMMON,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        head_dim=64,
        max_position_embeddings=131072,
        rope_scaling=dict(
            rope_type="llama3",
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        tie_word_embeddings=True,
    ),
    # meta-llama/Meta-Llama-3-8B: untied LM head, plain RoPE.
    "8b": dict(
        _LLAMA3_COMMON,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        head_dim=128,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    ),
    # Minutes-free smoke test of the benchmark scripts on CPU.
    "tiny": dict(
        model_type="llama",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
}


def get_shape(name: str) -> dict:
    """A fresh copy of the kwargs for `name`, so callers may add or override keys safely."""
    try:
        shape = SHAPES[name]
    except KeyError:
        raise KeyError(f"unknown shape {name!r}; choose from {sorted(SHAPES)}") from None
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in shape.items()}
