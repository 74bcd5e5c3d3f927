"""A Flax (linen) Gemma 3 text model (`Gemma3ForCausalLM`, model_type `gemma3_text`) whose parameter
tree mirrors Hugging Face's module names, so LoRA reaches its plain `nn.Dense` projections (`q_proj`,
`k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj`) through method interception, as
for Llama. Its layout record is `lora_jax.models.layout.GEMMA3_LAYOUT`.

What differs from Llama, each as transformers 5 computes it (`modeling_gemma3`):

- RMSNorm multiplies by `1 + weight` (weights stored zero-centred), in fp32, then casts to the
  input's dtype; the same norm over each head of q and k (`self_attn/q_norm`, `self_attn/k_norm`).
- Embeddings are scaled by `sqrt(hidden_size)`, that constant rounded to the embedding's dtype.
- GeGLU MLP: `down(gelu_tanh(gate(x)) * up(x))`.
- Four norms per layer: `input_layernorm` before attention, `post_attention_layernorm` on its
  output, `pre_feedforward_layernorm` / `post_feedforward_layernorm` around the MLP.
- Local (`sliding_attention`) and global (`full_attention`) layers interleave (`layer_types`): local
  layers attend within `sliding_window` tokens and use RoPE base `rope_local_base_freq`, global ones
  `rope_theta` (linear scaling allowed). A window shorter than the sequence runs on the XLA
  attention only (`lora_jax.models.attention.attention` refuses it on the flash kernels).
- Attention scale `query_pre_attn_scalar ** -0.5`; optional final logit softcapping; tied head.

With scanned layers the layer type is a scanned input: RoPE tables are selected per layer and the
attention runs through `lax.cond` between the windowed and the full call. The plumbing it shares
with Llama to the letter (RoPE application, the KV-cache write and mask, remat policies, scanning the
layers) is `lora_jax.models.common`; the maths above is Gemma's own and stays here.

KV-cache decoding (`cache=`, as Llama's) keeps every slot and masks: a local layer sees the last
`sliding_window` slots of the cache, a global layer all of them.

Parameter tree (Flax kernels are `[in, out]`):

    embed_tokens/embedding                    [vocab, embed]
    layers/self_attn/{q,k,v,o}_proj/kernel    [layers, ...]          (scan_layers=True)
    layers/self_attn/{q,k}_norm/scale         [layers, head_dim]
    layers/{input,post_attention,pre_feedforward,post_feedforward}_layernorm/scale
    layers/mlp/{gate,up,down}_proj/kernel
    norm/scale
    lm_head/kernel                            [embed, vocab]         (absent when tied)
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from lora_jax.models import common
from lora_jax.models.attention import attention
from lora_jax.models.gemma3_config import Gemma3Config
from lora_jax.models.layout import GEMMA3_LAYOUT
from lora_jax.models.llama import KVCache

__all__ = ["Gemma3", "gemma_rms_norm", "gemma3_inv_freq"]

Array = jax.Array


def gemma_rms_norm(x: Array, weight: Array, eps: float) -> Array:
    """Gemma's RMSNorm as transformers computes it: normalise and multiply by `1 + weight`, both in
    fp32, then cast to the input's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    w = 1.0 + weight.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
    return (y * w).astype(x.dtype)


class Gemma3RMSNorm(nn.Module):
    eps: float
    param_dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        weight = self.param("scale", nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
        return gemma_rms_norm(x, weight, self.eps)


def gemma3_inv_freq(cfg: Gemma3Config, local: bool) -> np.ndarray:
    """RoPE inverse frequencies of local (`rope_local_base_freq`) or global (`rope_theta`, divided
    by `rope_factor` when linear) layers, computed in fp32 as transformers does."""
    dim = cfg.head_dim
    base = cfg.rope_local_base_freq if local else cfg.rope_theta
    inv = 1.0 / (np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    if not local and cfg.rope_type == "linear":
        inv = inv / np.float32(cfg.rope_factor)
    return inv.astype(np.float32)


class Gemma3Attention(nn.Module):
    config: Gemma3Config

    @nn.compact
    def __call__(self, x_btd, rope, seg_mask, cache, sliding):
        cfg = self.config
        bias = lambda name: GEMMA3_LAYOUT.projection(name).has_bias(cfg)
        b, t, _ = x_btd.shape
        n, k, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = common.dense(cfg, n * h, "q_proj", bias("q_proj"))(x_btd).reshape(b, t, n, h)
        kk = common.dense(cfg, k * h, "k_proj", bias("k_proj"))(x_btd).reshape(b, t, k, h)
        v = common.dense(cfg, k * h, "v_proj", bias("v_proj"))(x_btd).reshape(b, t, k, h)
        q = Gemma3RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name="q_norm")(q)
        kk = Gemma3RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name="k_norm")(kk)
        cos_g, sin_g, cos_l, sin_l = rope
        if isinstance(sliding, bool):  # unrolled layers: the layer type is known here
            cos, sin = (cos_l, sin_l) if sliding else (cos_g, sin_g)
        else:  # scanned layers: a traced flag per layer
            cos, sin = jax.lax.select(sliding, cos_l, cos_g), jax.lax.select(sliding, sin_l, sin_g)
        q, kk = common.apply_rope(q, cos, sin), common.apply_rope(kk, cos, sin)
        # the kernels scale by head_dim ** -0.5; Gemma scales by query_pre_attn_scalar ** -0.5
        q = q * jnp.asarray(math.sqrt(h) / math.sqrt(cfg.query_pre_attn_scalar), q.dtype)
        q, kk, v = (checkpoint_name(a, "qkv") for a in (q, kk, v))
        segment_ids, mask_global, mask_local = seg_mask
        kk, v, new_cache = common.write_cache(cache, kk, v, q.dtype)  # decoding: into the cache at its index

        def run(window, q, kk, v):
            return attention(
                q,
                kk,
                v,
                segment_ids,
                implementation=cfg.attention,
                max_segments=cfg.max_segments,
                sliding_window=window,
            )

        if mask_global is not None:  # decoding against a cache: XLA's attention with the layer's mask
            if isinstance(sliding, bool):
                mask = mask_local if sliding else mask_global
            else:
                mask = jax.lax.select(sliding, mask_local, mask_global)
            out = jax.nn.dot_product_attention(q, kk, v, mask=mask, implementation="xla")
        elif isinstance(sliding, bool):
            out = run(cfg.sliding_window if sliding else None, q, kk, v)
        elif cfg.sliding_window >= t or not any(cfg.sliding_layers):
            out = run(None, q, kk, v)  # no window cuts anything at this length
        elif all(cfg.sliding_layers):
            out = run(cfg.sliding_window, q, kk, v)
        else:
            out = jax.lax.cond(
                sliding,
                lambda q, kk, v: run(cfg.sliding_window, q, kk, v),
                lambda q, kk, v: run(None, q, kk, v),
                q,
                kk,
                v,
            )
        out = checkpoint_name(out, "attn_out")
        return common.dense(cfg, cfg.hidden_size, "o_proj", bias("o_proj"))(out.reshape(b, t, n * h)), new_cache


class Gemma3MLP(nn.Module):
    config: Gemma3Config

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        gate = common.dense(cfg, cfg.intermediate_size, "gate_proj", False)(x)
        up = common.dense(cfg, cfg.intermediate_size, "up_proj", False)(x)
        return common.dense(cfg, cfg.hidden_size, "down_proj", False)(jax.nn.gelu(gate, approximate=True) * up)


class Gemma3Block(nn.Module):
    """One decoder layer; fits `nn.scan`: `(x, rope, (segment_ids, mask_global, mask_local), cache,
    sliding) -> (x, cache)`."""

    config: Gemma3Config

    @nn.compact
    def __call__(self, x, rope, seg_mask, cache, sliding):
        cfg = self.config
        x = checkpoint_name(x, common.LAYER_INPUT)  # remat_policy "offload" keeps it on the host
        norm = lambda name: Gemma3RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name=name)
        attn, new_cache = Gemma3Attention(cfg, name="self_attn")(
            norm("input_layernorm")(x), rope, seg_mask, cache, sliding
        )
        x = x + norm("post_attention_layernorm")(attn)
        h = norm("pre_feedforward_layernorm")(x)
        mlp = common.token_chunked(Gemma3MLP(cfg, name="mlp"), h, cfg.mlp_chunk_tokens)
        return x + norm("post_feedforward_layernorm")(mlp), new_cache


class Gemma3(nn.Module):
    """Gemma 3 causal LM. `__call__(input_ids, positions=None, segment_ids=None)` -> logits.

    `segment_ids` ([batch, seq], 0 = padding) keeps packed documents apart; `return_hidden=True`
    returns the final normed hidden states, before the head and its final logit softcapping (the
    training loss, `lora_jax.train.loss`, applies both). `cache` (a `KVCache`) with `cache_index`
    and `cache_mask` ([batch, max_len], valid key slots) runs incremental decoding and returns
    `(logits, new_cache)`, as Llama's does.
    """

    config: Gemma3Config

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
        seg_mask = (segment_ids, None, None)
        if cache is not None:  # each layer picks the full or the windowed mask over the cache
            masks = [common.decode_mask(t, cache, cache_index, cache_mask, w) for w in (None, cfg.sliding_window)]
            seg_mask = (None, *masks)
        layer_cache = common.stacked_cache(cache, cache_index, cfg.num_hidden_layers)
        # (cos, sin) of the global layers, then of the local ones
        rope = tuple(a for local in (False, True) for a in common.rope_tables(positions, gemma3_inv_freq(cfg, local)))

        embed = common.embedding(cfg, cfg.vocab_size, "embed_tokens")
        x = embed(input_ids)
        # transformers multiplies by sqrt(hidden_size) rounded to the embedding weight's dtype
        scale = jnp.asarray(cfg.hidden_size**0.5, jnp.float32).astype(cfg.param_dtype)
        x = x * scale.astype(x.dtype)
        block, n = common.remat_block(Gemma3Block, cfg), cfg.num_hidden_layers
        # the layer type is a per-layer input: a traced flag when scanned, a Python bool unrolled
        x, new_layer_cache = common.run_layers(
            block, cfg, "layers", n, x, (rope, seg_mask), layer_cache, (cfg.sliding_layers,)
        )
        x = Gemma3RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, name="norm")(x)
        if return_hidden:
            return x if cache is None else (x, KVCache(*new_layer_cache))
        if cfg.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = common.dense(cfg, cfg.vocab_size, "lm_head", False)(x)
        if cfg.final_logit_softcapping is not None:
            c = cfg.final_logit_softcapping
            logits = jnp.tanh(logits / c) * c
        if cache is None:
            return logits
        return logits, KVCache(*new_layer_cache)
