"""Logits parity with transformers' LlamaForCausalLM on tiny random models (fp32, <= 1e-4)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from tests.helpers import FP32_ATOL, make_hf_llama, max_diff, random_ids, torch_logits

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}

VARIANTS = {
    "gqa_untied": {},
    "mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "llama3_rope": dict(rope_parameters=LLAMA3_ROPE),
    "head_dim_override_bias": dict(head_dim=16, attention_bias=True, mlp_bias=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("scan", [True, False], ids=["scan", "noscan"])
def test_logits_match_transformers(tmp_path, variant, scan):
    model_dir = make_hf_llama(tmp_path / "m", **VARIANTS[variant])
    ids = random_ids(97, (2, 40))
    cfg, params = lj.load_pretrained(model_dir, scan_layers=scan)
    ours = lj.Llama(cfg).apply({"params": params}, jnp.asarray(ids))
    assert ours.dtype == jnp.float32
    diff = max_diff(ours, torch_logits(model_dir, ids))
    assert diff <= FP32_ATOL, f"{variant} scan={scan}: max abs diff {diff:.2e}"


def test_legacy_config_form(tmp_path):
    """A config.json written in the legacy form (rope_theta + rope_scaling) gives the same logits."""
    model_dir = make_hf_llama(tmp_path / "m", rope_parameters=LLAMA3_ROPE)
    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        d = json.load(f)
    rope = d.pop("rope_parameters")
    d["rope_theta"] = rope.pop("rope_theta")
    d["rope_scaling"] = rope
    with open(path, "w") as f:
        json.dump(d, f)
    cfg = lj.LlamaConfig.from_hf(path)
    assert cfg.rope_type == "llama3" and cfg.rope_theta == 500000.0 and cfg.rope_factor == 8.0
    ids = random_ids(97, (1, 40))
    cfg, params = lj.load_pretrained(model_dir)
    ours = lj.Llama(cfg).apply({"params": params}, jnp.asarray(ids))
    assert max_diff(ours, torch_logits(model_dir, ids)) <= FP32_ATOL


def test_sharded_checkpoint(tmp_path):
    model_dir = make_hf_llama(tmp_path / "m", max_shard_size="20KB")
    assert os.path.exists(os.path.join(model_dir, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(model_dir) if f.endswith(".safetensors")]) > 2
    ids = random_ids(97, (2, 17))
    cfg, params = lj.load_pretrained(model_dir)
    ours = lj.Llama(cfg).apply({"params": params}, jnp.asarray(ids))
    assert max_diff(ours, torch_logits(model_dir, ids)) <= FP32_ATOL


def test_segment_ids_isolate_packed_documents(tiny_llama):
    """Two documents packed in one row give the logits each has alone (positions restart)."""
    cfg, params = lj.load_pretrained(tiny_llama)
    model = lj.Llama(cfg)
    a, b = random_ids(97, (1, 7), seed=1), random_ids(97, (1, 5), seed=2)
    packed = np.concatenate([a, b], axis=1)
    seg = np.array([[1] * 7 + [2] * 5])
    pos = np.array([list(range(7)) + list(range(5))])
    out = model.apply({"params": params}, jnp.asarray(packed), jnp.asarray(pos), jnp.asarray(seg))
    alone_a = model.apply({"params": params}, jnp.asarray(a))
    alone_b = model.apply({"params": params}, jnp.asarray(b))
    assert max_diff(out[:, :7], alone_a) <= 1e-5
    assert max_diff(out[:, 7:], alone_b) <= 1e-5


def test_bf16_close_to_fp32(tiny_llama):
    """bf16 parameters and compute stay close to fp32. Tolerance: 5e-2 absolute on logits of size
    ~1, i.e. a dozen bf16 ulps (2^-8 relative each) accumulated over two layers."""
    ids = jnp.asarray(random_ids(97, (2, 23)))
    cfg32, p32 = lj.load_pretrained(tiny_llama)
    cfg16, p16 = lj.load_pretrained(tiny_llama, dtype="bfloat16")
    assert jnp.dtype(p16["layers"]["self_attn"]["q_proj"]["kernel"].dtype) == jnp.bfloat16
    out16 = lj.Llama(cfg16).apply({"params": p16}, ids)
    out32 = lj.Llama(cfg32).apply({"params": p32}, ids)
    assert out16.dtype == jnp.bfloat16
    assert max_diff(out16, out32) <= 5e-2


def test_rms_norm_and_swiglu_vjps_equal_autodiff():
    """The hand-written VJPs of RMSNorm and SwiGLU give autodiff's gradients of the plain formulas
    (both inputs, the norm's weight included: it trains with modules_to_save), forward bit for bit."""
    import flax.linen as nn
    import jax

    from lora_jax.models.llama import _rms_norm, rms_norm, swiglu

    k = jax.random.split(jax.random.key(0), 6)
    x, dy = 2 * jax.random.normal(k[0], (3, 5, 64)), jax.random.normal(k[1], (3, 5, 64))
    scale = 1 + 0.1 * jax.random.normal(k[2], (64,))
    got_y, got_vjp = jax.vjp(lambda x, s: rms_norm(x, s, 1e-6), x, scale)
    ref_y, ref_vjp = jax.vjp(lambda x, s: _rms_norm(x, s, 1e-6), x, scale)
    assert bool(jnp.all(got_y == ref_y))
    for got, ref in zip(got_vjp(dy), ref_vjp(dy)):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    g, u, dh = (
        3 * jax.random.normal(k[3], (4, 256)),
        jax.random.normal(k[4], (4, 256)),
        jax.random.normal(k[5], (4, 256)),
    )
    got_h, got_vjp = jax.vjp(swiglu, g, u)
    ref_h, ref_vjp = jax.vjp(lambda g, u: nn.silu(g) * u, g, u)
    assert bool(jnp.all(got_h == ref_h))
    for got, ref in zip(got_vjp(dh), ref_vjp(dh)):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
