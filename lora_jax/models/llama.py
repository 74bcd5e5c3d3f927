"""A Flax (linen) Llama whose parameter tree mirrors Hugging Face's module names; it also runs the
Llama-like families (Qwen2, Qwen3, Mistral), whose differences its config's layout records
(`lora_jax.models.layout.layout_of`): which projections carry biases, Qwen3's per-head q/k norms
(`self_attn/q_norm/scale`, `self_attn/k_norm/scale`, `[head_dim]`), and Mistral's sliding window.

The model knows nothing of LoRA: adapters enter only through method interception of the plain
`nn.Dense` projections (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj`).
Their names, parents, shapes and sharding axes are written once, in `lora_jax.models.layout.LLAMA_LAYOUT`,
which targeting, the HF key table, sharding, quantisation and FLOPs read (tests/test_layout.py checks
this module's tree against it). The plumbing every family shares to the letter (remat policies, the
projections' construction, RoPE tables, the KV-cache write and mask, scanning the layers) is
`lora_jax.models.common`; the maths particular to Llama (RMSNorm, SwiGLU, llama3 RoPE) is here.

Parameter tree (Flax kernels are `[in, out]`; HF weights are `[out, in]`):

    embed_tokens/embedding            [vocab, embed]
    layers/self_attn/q_proj/kernel    [layers, embed, heads*head_dim]   (scan_layers=True)
    layers_3/mlp/down_proj/kernel     [mlp, embed]                       (scan_layers=False)
    layers/input_layernorm/scale, layers/post_attention_layernorm/scale, norm/scale
    lm_head/kernel                    [embed, vocab]                     (absent when tied)
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from lora_jax.models import common
from lora_jax.models.attention import attention
from lora_jax.models.layout import layout_of
from lora_jax.models.llama_config import LlamaConfig

__all__ = ["Llama", "KVCache", "init_kv_cache", "rope_inv_freq", "rms_norm", "swiglu"]

Array = jax.Array


class KVCache(NamedTuple):
    """Keys/values for incremental decoding: `[layers, batch, max_len, kv_heads, head_dim]`."""

    k: Array
    v: Array


def init_kv_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    dtype = jnp.dtype(dtype or cfg.dtype)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """Inverse frequencies of rotary embeddings, with llama3 scaling where configured (as HF does)."""
    dim = cast(int, cfg.head_dim)  # LlamaConfig.__post_init__ fills in a None head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if cfg.rope_type == "llama3":
        factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old_len = cfg.rope_original_max_position_embeddings
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


class RMSNorm(nn.Module):
    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        return rms_norm(x, scale.astype(self.dtype), self.eps)


# The two functions below are written out with their VJPs by hand because autodiff saves fp32 or
# extra full-size intermediates for the backward pass (RMSNorm's fp32 copy of its input; SiLU's
# sigmoid and product), and with scanned layers (the default) `nn.scan` stacks every one of them
# over all layers. These save only their inputs (which exist anyway) and recompute the cheap
# elementwise rest in a fused backward. The forward values are the same operations, bit for bit.
# This makes scanned layers faster and lowers their peak memory; with unrolled layers XLA sees
# through the intermediates already, so nothing changes there (figures in docs/performance.md).
def _rms_norm(x: Array, scale: Array, eps: float) -> Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.reshape((1,) * (x.ndim - 1) + (-1,)) * y.astype(scale.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x: Array, scale: Array, eps: float) -> Array:
    """Llama's RMSNorm as transformers computes it: normalise in fp32, cast, multiply by the
    weight (in the weight's dtype)."""
    return _rms_norm(x, scale, eps)


def _rms_norm_fwd(x, scale, eps):
    return _rms_norm(x, scale, eps), (x, scale)


def _rms_norm_bwd(eps, res, dy):
    x, scale = res
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    n = x32 * inv
    lead = tuple(range(x.ndim - 1))
    dscale = jnp.sum(dy.astype(jnp.float32) * n.astype(scale.dtype).astype(jnp.float32), axis=lead)
    g = (dy * scale.reshape((1,) * (x.ndim - 1) + (-1,))).astype(jnp.float32)
    dx = inv * (g - n * jnp.mean(g * n, axis=-1, keepdims=True))
    return dx.astype(x.dtype), dscale.astype(scale.dtype)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def _swiglu(gate: Array, up: Array) -> Array:
    return nn.silu(gate) * up


@jax.custom_vjp
def swiglu(gate: Array, up: Array) -> Array:
    """`silu(gate) * up`, the Llama MLP's activation, in the inputs' dtype."""
    return _swiglu(gate, up)


def _swiglu_fwd(gate, up):
    return _swiglu(gate, up), (gate, up)


def _swiglu_bwd(res, dh):
    gate, up = res
    g, u, d = gate.astype(jnp.float32), up.astype(jnp.float32), dh.astype(jnp.float32)
    sig = jax.nn.sigmoid(g)
    dgate = d * u * sig * (1.0 + g * (1.0 - sig))
    return dgate.astype(gate.dtype), (d * g * sig).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class LlamaAttention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x_btd, cos, sin, segment_ids, mask, cache):
        cfg = self.config
        layout = layout_of(cfg)
        bias = lambda name: layout.projection(name).has_bias(cfg)
        b, t, _ = x_btd.shape
        n, k, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = common.dense(cfg, n * h, "q_proj", bias("q_proj"))(x_btd).reshape(b, t, n, h)
        kk = common.dense(cfg, k * h, "k_proj", bias("k_proj"))(x_btd).reshape(b, t, k, h)
        v = common.dense(cfg, k * h, "v_proj", bias("v_proj"))(x_btd).reshape(b, t, k, h)
        if layout.head_norms:  # Qwen3: RMSNorm over each head of q and k, before RoPE
            q_norm, k_norm = layout.head_norms
            q = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name=q_norm)(q)
            kk = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name=k_norm)(kk)
        q, kk = common.apply_rope(q, cos, sin), common.apply_rope(kk, cos, sin)
        q, kk, v = (checkpoint_name(a, "qkv") for a in (q, kk, v))
        kk, v, new_cache = common.write_cache(cache, kk, v, q.dtype)
        if mask is None:  # training and scoring: a flash kernel, packed or not
            out = attention(
                q,
                kk,
                v,
                segment_ids,
                implementation=cfg.attention,
                max_segments=cfg.max_segments,
                sliding_window=cfg.sliding_window,
            )
        else:  # decoding against a cache: few queries, XLA's attention with the cache's mask
            out = jax.nn.dot_product_attention(q, kk, v, mask=mask, implementation="xla")
        out = checkpoint_name(out, "attn_out")
        out = common.dense(cfg, cfg.hidden_size, "o_proj", bias("o_proj"))(out.reshape(b, t, n * h))
        return out, new_cache


class LlamaMLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        bias = lambda name: layout_of(cfg).projection(name).has_bias(cfg)
        gate = common.dense(cfg, cfg.intermediate_size, "gate_proj", bias("gate_proj"))(x)
        up = common.dense(cfg, cfg.intermediate_size, "up_proj", bias("up_proj"))(x)
        return common.dense(cfg, cfg.hidden_size, "down_proj", bias("down_proj"))(swiglu(gate, up))


class LlamaBlock(nn.Module):
    """One decoder layer. Signature fits `nn.scan`: `(x, rope, (segment_ids, mask), cache) -> (x, cache)`."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, rope, seg_mask, cache):
        cfg = self.config
        x = checkpoint_name(x, common.LAYER_INPUT)  # remat_policy "offload" keeps it on the host
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name=name)
        attn, new_cache = LlamaAttention(cfg, name="self_attn")(
            norm("input_layernorm")(x), rope[0], rope[1], seg_mask[0], seg_mask[1], cache
        )
        x = x + attn
        mlp = LlamaMLP(cfg, name="mlp")
        x = x + common.token_chunked(mlp, norm("post_attention_layernorm")(x), cfg.mlp_chunk_tokens)
        return x, new_cache


class Llama(nn.Module):
    """Llama causal LM. `__call__(input_ids, positions=None, segment_ids=None)` -> logits.

    - `segment_ids` ([batch, seq], 0 = padding) keeps packed documents from attending to each other.
    - `return_hidden=True` returns the final normed hidden states instead of logits (for a loss
      that never materialises `[tokens, vocab]` logits).
    - `cache` (a `KVCache`) with `cache_index` and `cache_mask` ([batch, max_len], valid key slots)
      runs incremental decoding and returns `(logits, new_cache)`.
    """

    config: LlamaConfig

    @nn.compact
    def __call__(
        self,
        input_ids,
        positions=None,
        segment_ids=None,
        *,
        return_hidden=False,
        cache: KVCache | None = None,
        cache_index=None,
        cache_mask=None,
    ):
        cfg = self.config
        b, t = input_ids.shape
        if positions is None:
            positions = common.default_positions(b, t, None if cache is None else cache_index)
        rope = common.rope_tables(positions, rope_inv_freq(cfg))
        # the attention kernels take segment ids; only decoding builds a mask (over the cache)
        mask = None if cache is None else common.decode_mask(t, cache, cache_index, cache_mask, cfg.sliding_window)
        seg_mask = (segment_ids if cache is None else None, mask)

        embed = common.embedding(cfg, cfg.vocab_size, "embed_tokens")
        x = embed(input_ids)
        layer_cache = common.stacked_cache(cache, cache_index, cfg.num_hidden_layers)
        x, new_layer_cache = common.run_layers(
            common.remat_block(LlamaBlock, cfg), cfg, "layers", cfg.num_hidden_layers, x, (rope, seg_mask), layer_cache
        )
        x = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name="norm")(x)
        if return_hidden:
            out = x
        elif cfg.tie_word_embeddings:
            out = embed.attend(x)
        else:
            out = common.dense(cfg, cfg.vocab_size, "lm_head", False)(x)
        if cache is None:
            return out
        return out, KVCache(*new_layer_cache)
