"""Shared test helpers: tiny random HF Llamas, torch reference logits, tolerances."""

from __future__ import annotations

import os

import numpy as np

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rms_norm_eps=1e-5, tie_word_embeddings=False)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli_env() -> dict:
    """The environment for a `lora-jax` subprocess: the suite's compilation cache and this checkout."""
    env = dict(os.environ)
    env["JAX_COMPILATION_CACHE_DIR"] = os.environ.get("LORA_JAX_TEST_CACHE",
                                                      os.path.expanduser("~/.cache/lora_jax_test_xla"))
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


# fp32 parity bound from DESIGN.md; bf16 has 8 mantissa bits (rel. step 2^-8 = 0.0039).
FP32_ATOL = 1e-4


def make_hf_llama(out_dir, seed: int = 0, max_shard_size=None, **overrides):
    """Build a random transformers LlamaForCausalLM, perturb every weight (norms included, so a
    mix-up of norm scales cannot pass), save it with save_pretrained, return the directory."""
    import torch
    import transformers

    kw = dict(TINY)
    kw.update(overrides)
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**kw)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(os.fspath(out_dir), **kwargs)
    return os.fspath(out_dir)


def torch_logits(model_dir, input_ids: np.ndarray, dtype="float32") -> np.ndarray:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, dtype), attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(torch.from_numpy(np.asarray(input_ids)).long()).logits
    return out.float().numpy()


def random_ids(vocab: int, shape=(2, 11), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=shape).astype(np.int32)


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
