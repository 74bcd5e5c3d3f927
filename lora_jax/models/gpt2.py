"""A Flax (linen) GPT-2 (`GPT2LMHeadModel`) whose parameter tree mirrors Hugging Face's module names.

Learned positions (`wpe`), pre-LayerNorm blocks (LayerNorms with biases), a fused q/k/v projection
(`attn.c_attn`), tanh-GELU (`gelu_new`) MLP, and an LM head tied to `wte`. The projections are plain
`nn.Dense`s, so adapters enter through the same method interception as the Llama's; their names,
parents and shapes are `lora_jax.models.layout.GPT2_LAYOUT`. HF's Conv1D stores weights `[in, out]`,
which is already the Flax kernel layout. The plumbing it shares with the other families to the letter
(remat policies, the projections' construction, the KV-cache write and mask, scanning the layers) is
`lora_jax.models.common`.

Parameter tree:

    wte/embedding                      [vocab, embed]
    wpe/embedding                      [n_positions, embed]
    h/ln_1/scale, h/ln_1/bias          [layers, embed]                (scan_layers=True)
    h/attn/c_attn/kernel               [layers, embed, 3 * embed]
    h_3/mlp/c_proj/kernel              [4 * embed, embed]             (scan_layers=False)
    ln_f/scale, ln_f/bias
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from lora_jax.models import common
from lora_jax.models.attention import attention
from lora_jax.models.gpt2_config import GPT2Config
from lora_jax.models.llama import KVCache

__all__ = ["GPT2"]

Array = jax.Array


def _dense(cfg: GPT2Config, features: int, name: str) -> nn.Dense:
    return common.dense(cfg, features, name, True)  # every GPT-2 projection has a bias


def _layer_norm(cfg: GPT2Config, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)


class GPT2Attention(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, x_btd, segment_ids, mask, cache):
        cfg = self.config
        b, t, d = x_btd.shape
        n, h = cfg.n_head, cfg.head_dim
        qkv = _dense(cfg, 3 * d, "c_attn")(x_btd)
        q, k, v = (a.reshape(b, t, n, h) for a in jnp.split(qkv, 3, axis=-1))
        q, k, v = (checkpoint_name(a, "qkv") for a in (q, k, v))
        k, v, new_cache = common.write_cache(cache, k, v, q.dtype)  # decoding: into the cache at its index
        if mask is None:  # training and scoring: a flash kernel, packed or not
            out = attention(q, k, v, segment_ids, implementation=cfg.attention, max_segments=cfg.max_segments)
        else:  # decoding against a cache: few queries, XLA's attention with the cache's mask
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
        out = checkpoint_name(out, "attn_out")
        return _dense(cfg, d, "c_proj")(out.reshape(b, t, d)), new_cache


class GPT2MLP(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        hidden = nn.gelu(_dense(cfg, cfg.intermediate_size, "c_fc")(x), approximate=True)
        return _dense(cfg, cfg.n_embd, "c_proj")(hidden)


class GPT2Block(nn.Module):
    """One layer. Signature fits `nn.scan`: `(x, (segment_ids, mask), cache) -> (x, cache)`."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x, seg_mask, cache):
        cfg = self.config
        x = checkpoint_name(x, common.LAYER_INPUT)  # remat_policy "offload" keeps it on the host
        attn, new_cache = GPT2Attention(cfg, name="attn")(_layer_norm(cfg, "ln_1")(x), seg_mask[0], seg_mask[1], cache)
        x = x + attn
        mlp = GPT2MLP(cfg, name="mlp")
        x = x + common.token_chunked(mlp, _layer_norm(cfg, "ln_2")(x), cfg.mlp_chunk_tokens)
        return x, new_cache


class GPT2(nn.Module):
    """GPT-2 causal LM. `__call__(input_ids, positions=None, segment_ids=None)` -> logits.

    - `positions` ([batch, seq]) index the learned position table; default 0..seq-1.
    - `segment_ids` ([batch, seq], 0 = padding) keeps packed documents from attending to each other
      (pass per-document `positions` with them, as packing does).
    - `return_hidden=True` returns the final normed hidden states instead of logits.
    - `cache` (a `KVCache`, `lora_jax.models.llama.init_kv_cache`) with `cache_index` and
      `cache_mask` ([batch, max_len], valid key slots) runs incremental decoding and returns
      `(logits, new_cache)`, as Llama's does.
    """

    config: GPT2Config

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
        mask = None if cache is None else common.decode_mask(t, cache, cache_index, cache_mask)
        seg_mask = (segment_ids if cache is None else None, mask)
        layer_cache = common.stacked_cache(cache, cache_index, cfg.n_layer)
        wte = common.embedding(cfg, cfg.vocab_size, "wte")
        x = wte(input_ids) + common.embedding(cfg, cfg.n_positions, "wpe")(positions)
        block = common.remat_block(GPT2Block, cfg)
        x, new_layer_cache = common.run_layers(block, cfg, "h", cfg.n_layer, x, (seg_mask,), layer_cache)
        x = _layer_norm(cfg, "ln_f")(x)
        out = x if return_hidden else wte.attend(x)
        if cache is None:
            return out
        return out, KVCache(*new_layer_cache)
