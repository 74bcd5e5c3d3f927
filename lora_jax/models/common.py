"""The plumbing the decoder models (`llama.py`, `gemma3.py`, `gpt2.py`) share to the letter, in one
place so that a fix reaches every family: the remat policies, the projections' and embeddings'
construction, rotary tables, the KV-cache write and mask, and running the layers scanned or unrolled.

Only what is the same computation in every family lives here; what differs (the norms, the MLP
activations, RoPE frequencies, the attention scale, the block's wiring) stays in the family's file,
so each model still reads on its own. Nothing here knows of LoRA: adapters reach the `nn.Dense`
projections built by `dense` through method interception, as everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "remat_block",
    "dense",
    "embedding",
    "default_positions",
    "rope_tables",
    "apply_rope",
    "write_cache",
    "decode_mask",
    "stacked_cache",
    "run_layers",
]

Array = jax.Array

# `remat_policy` (`lora_jax.models.config_base.REMAT_POLICIES`, "none" aside) -> what a layer keeps
# for the backward pass; "qkv" and "attn_out" are the `checkpoint_name`s each family's attention gives
_POLICIES = {
    "full": lambda: jax.checkpoint_policies.nothing_saveable,
    "dots": lambda: jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": lambda: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv": lambda: jax.checkpoint_policies.save_only_these_names("qkv"),
    "save_qkv_out": lambda: jax.checkpoint_policies.save_only_these_names("qkv", "attn_out"),
}


def remat_block(block: Any, cfg: Any) -> Any:
    """`block` (a layer's module class) rematerialised as `cfg.remat_policy` says; as it is for "none"."""
    if cfg.remat_policy == "none":
        return block
    return nn.remat(block, policy=_POLICIES[cfg.remat_policy](), prevent_cse=not cfg.scan_layers)


def dense(cfg: Any, features: int, name: str, bias: bool) -> nn.Dense:
    """A projection in the config's dtypes, initialised as transformers does (normal, 0.02)."""
    return nn.Dense(
        features,
        use_bias=bias,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=nn.initializers.normal(0.02),
        name=name,
    )


def embedding(cfg: Any, num_embeddings: int, name: str) -> nn.Embed:
    """An embedding table `[num_embeddings, hidden_size]` in the config's dtypes."""
    return nn.Embed(
        num_embeddings,
        cfg.hidden_size,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        embedding_init=nn.initializers.normal(0.02),
        name=name,
    )


def default_positions(b: int, t: int, cache_index=None) -> Array:
    """`[b, t]` positions 0..t-1, or from `cache_index` on when decoding against a cache."""
    start = 0 if cache_index is None else cache_index
    return jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))


def rope_tables(positions: Array, inv_freq: np.ndarray) -> tuple[Array, Array]:
    """cos, sin of shape `[batch, seq, head_dim]` in fp32 (split-halves layout, as HF)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_bthd: Array, cos: Array, sin: Array) -> Array:
    half = x_bthd.shape[-1] // 2
    rotated = jnp.concatenate([-x_bthd[..., half:], x_bthd[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x_bthd.dtype), sin[:, :, None, :].astype(x_bthd.dtype)
    return x_bthd * cos + rotated * sin


def write_cache(cache, k: Array, v: Array, dtype) -> tuple[Array, Array, Any]:
    """Decoding: this call's keys and values `[b, t, kv_heads, head_dim]` go into one layer's cache
    `(k, v, index)` at `index`; returns the whole cache's keys and values in `dtype` (the query's)
    and the new cache `(k, v)`. Without a cache: `(k, v, None)`, as they are."""
    if cache is None:
        return k, v, None
    cache_k, cache_v, index = cache
    k = jax.lax.dynamic_update_slice_in_dim(cache_k, k.astype(cache_k.dtype), index, axis=1)
    v = jax.lax.dynamic_update_slice_in_dim(cache_v, v.astype(cache_v.dtype), index, axis=1)
    return k.astype(dtype), v.astype(dtype), (k, v)


def decode_mask(t, cache, cache_index, cache_mask, sliding_window=None):
    """`[batch, 1, q, max_len]` boolean: each query sees the cache slots up to its own (and, with a
    `sliding_window`, only the last `sliding_window` of them, as transformers counts cache slots),
    and only the valid ones (`cache_mask`)."""
    max_len = cache.k.shape[2]
    q_slot = cache_index + jnp.arange(t)
    k_slot = jnp.arange(max_len)[None, :]
    allowed = k_slot <= q_slot[:, None]  # [q, k]
    if sliding_window is not None:
        allowed = allowed & (k_slot > q_slot[:, None] - sliding_window)
    if cache_mask is not None:
        allowed = allowed[None] & cache_mask[:, None, :].astype(bool)
    return jnp.broadcast_to(allowed, (cache.k.shape[1], t, max_len))[:, None]


def stacked_cache(cache, cache_index, num_layers: int):
    """The per-layer inputs of a `KVCache` (`(k, v, index)`, stacked over layers), or None."""
    if cache is None:
        return None
    return (cache.k, cache.v, jnp.broadcast_to(cache_index, (num_layers,)))


def run_layers(block, cfg, name: str, num_layers: int, x, shared: tuple, layer_cache, per_layer: Sequence = ()):
    """Runs `num_layers` layers `block(cfg)(x, *shared, cache, per_layer[i]) -> (x, cache)`: one
    `nn.scan` named `name` when `cfg.scan_layers` (every variable collection stacked per layer: the
    frozen "params" and whatever a caller adds beside them, e.g. adapters, so the model names none but
    its own), else modules `name_0`, `name_1`, ... Returns `(x, the layers' new caches stacked)`."""
    if cfg.scan_layers:
        scanned = nn.scan(
            block,
            variable_axes={True: 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,) * len(shared) + (0,) * (1 + len(per_layer)),
            length=num_layers,
        )
        return scanned(cfg, name=name)(x, *shared, layer_cache, *(jnp.asarray(p) for p in per_layer))
    outs = []
    for i in range(num_layers):
        li = None if layer_cache is None else jax.tree.map(lambda c: c[i], layer_cache)
        x, out = block(cfg, name=f"{name}_{i}")(x, *shared, li, *(p[i] for p in per_layer))
        outs.append(out)
    return x, None if layer_cache is None else jax.tree.map(lambda *c: jnp.stack(c), *outs)
