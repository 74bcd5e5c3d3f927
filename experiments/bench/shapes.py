"""Benchmark model shapes as plain dicts of Hugging Face config kwargs (the keys of a `config.json`).

No jax/torch import, so the JAX and PyTorch benchmarks share one definition of each shape. Every
shape names its `model_type` (llama, qwen3, gemma3_text): `config_for(name)` builds the family's
transformers config (`AutoConfig.for_model`), and a saved model of it loads in lora_jax through
`lora_jax.models.registry`. The GPU machine has no internet, so models are random-initialised from
these configs, never downloaded; only the architecture matters for throughput.

    llama:       tiny, 1b (Llama-3.2-1B), 8b (Meta-Llama-3-8B)
    qwen3:       qwen3-tiny, qwen3-1.7b (Qwen/Qwen3-1.7B)
    gemma3_text: gemma3-tiny, gemma-3-1b (google/gemma-3-1b-it's text config)
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


def _every_sixth_global(layers: int) -> list[str]:
    """Gemma 3's layer types: five sliding-window layers, then a global one (`sliding_window_pattern` 6)."""
    return ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(layers)]


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
    # Qwen/Qwen3-1.7B's config.json: per-head q/k RMSNorm, head_dim 128 (= hidden / heads here),
    # tied embeddings, no sliding window.
    "qwen3-1.7b": dict(
        model_type="qwen3",
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        hidden_act="silu",
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        attention_bias=False,
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=28,
        tie_word_embeddings=True,
        bos_token_id=151643,
        eos_token_id=151645,
    ),
    # google/gemma-3-1b-it's config.json (Gemma3ForCausalLM, text only): 512-token sliding window on
    # five layers in six, every sixth layer global (layer_types spelled out, so a FLOP count read off
    # this dict sees them too); local RoPE base 1e4, global 1e6; no logit softcapping.
    "gemma-3-1b": dict(
        model_type="gemma3_text",
        vocab_size=262144,
        hidden_size=1152,
        intermediate_size=6912,
        num_hidden_layers=26,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        rope_local_base_freq=10000.0,
        query_pre_attn_scalar=256,
        sliding_window=512,
        layer_types=_every_sixth_global(26),
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        attention_bias=False,
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_id=[1, 106],
        pad_token_id=0,
    ),
    # Minutes-free smoke tests of the benchmark scripts on CPU, one per family.
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
    "qwen3-tiny": dict(
        model_type="qwen3",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # heads * head_dim = 128 != hidden: as Qwen3-0.6B / 4B / 8B
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        use_sliding_window=False,
        sliding_window=None,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "gemma3-tiny": dict(
        model_type="gemma3_text",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,  # five local layers, then one global
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        rope_local_base_freq=10000.0,
        query_pre_attn_scalar=32,
        sliding_window=32,  # shorter than a smoke test's rows, so the window is exercised
        layer_types=_every_sixth_global(6),
        final_logit_softcapping=None,
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    ),
}


def get_shape(name: str) -> dict:
    """A fresh copy of the kwargs for `name`, so callers may add or override keys safely."""
    try:
        shape = SHAPES[name]
    except KeyError:
        raise KeyError(f"unknown shape {name!r}; choose from {sorted(SHAPES)}") from None
    return {k: (type(v)(v) if isinstance(v, (dict, list)) else v) for k, v in shape.items()}


def model_type(name: str) -> str:
    """The family of shape `name` (its HF `model_type`)."""
    return get_shape(name).get("model_type", "llama")


def config_for(name: str, **overrides):
    """The transformers config of shape `name` for its family (`LlamaConfig`, `Qwen3Config`,
    `Gemma3TextConfig`), with `overrides` (e.g. `attn_implementation`, `use_cache`). Imports
    transformers, so only callers that build a torch model use it."""
    import transformers

    kwargs = get_shape(name)
    family = kwargs.pop("model_type", "llama")
    return transformers.AutoConfig.for_model(family, **kwargs, **overrides)
