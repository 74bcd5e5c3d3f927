"""The plumbing the decoder models (`llama.py`, `gemma3.py`, `gpt2.py`) share to the letter, in one
place so that a fix reaches every family: the remat policies, the projections' and embeddings'
construction, rotary tables, the KV-cache write and mask, running the layers scanned or unrolled,
and running a token-wise module (the MLP) over chunks of the sequence.

Only what is the same computation in every family lives here; what differs (the norms, the MLP
activations, RoPE frequencies, the attention scale, the block's wiring) stays in the family's file,
so each model still reads on its own. Nothing here knows of LoRA: adapters reach the `nn.Dense`
projections built by `dense` through method interception, as everywhere (inside `token_chunked`'s
scan too: it broadcasts every variable collection, the adapters' included).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.errors import ConfigError

__all__ = [
    "LAYER_INPUT",
    "remat_block",
    "token_chunked",
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

# The `checkpoint_name` of each layer's input (every family's block names it first thing), which
# remat_policy "offload" keeps in host memory: under scanned layers it is the one activation saved
# per layer for the backward pass, stacked over all layers ([layers, batch, seq, hidden])
LAYER_INPUT = "layer_input"
# where "offload" keeps it: page-locked host memory, which the device copies to and from directly
_OFFLOAD_KIND = "pinned_host"

# `remat_policy` (`lora_jax.models.config_base.REMAT_POLICIES`, "none" aside) -> what a layer keeps
# for the backward pass; "qkv" and "attn_out" are the `checkpoint_name`s each family's attention gives
_POLICIES = {
    "full": lambda: jax.checkpoint_policies.nothing_saveable,
    "dots": lambda: jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": lambda: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv": lambda: jax.checkpoint_policies.save_only_these_names("qkv"),
    "save_qkv_out": lambda: jax.checkpoint_policies.save_only_these_names("qkv", "attn_out"),
    "offload": lambda: jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[],
        names_which_can_be_offloaded=[LAYER_INPUT],
        offload_src="device",
        offload_dst=_OFFLOAD_KIND,
    ),
}


def _check_offload() -> None:
    """Remat policy "offload" needs host memory the device can address; refuse, naming the fix, a
    platform without it. (A CPU has it: there the copy to it compiles to nothing, as the device's
    memory is the host's.)"""
    kinds = {m.kind for m in jax.local_devices()[0].addressable_memories()}
    if _OFFLOAD_KIND not in kinds:
        raise ConfigError(
            f"remat_policy='offload' keeps each layer's input in {_OFFLOAD_KIND!r} memory, but this "
            f"{jax.default_backend()!r} device addresses only {sorted(kinds)}; use remat_policy='full' "
            "(the same numbers, the layer inputs kept on the device)"
        )


def remat_block(block: Any, cfg: Any) -> Any:
    """`block` (a layer's module class) rematerialised as `cfg.remat_policy` says; as it is for "none"."""
    if cfg.remat_policy == "none":
        return block
    if cfg.remat_policy == "offload":
        _check_offload()
    return nn.remat(block, policy=_POLICIES[cfg.remat_policy](), prevent_cse=not cfg.scan_layers)


def token_chunked(module: nn.Module, x: Array, chunk_tokens: int | None) -> Array:
    """`module(x)` for a token-wise `module` (an MLP) of `x [batch, seq, hidden]`, run over chunks of
    `chunk_tokens` tokens of the sequence (an `nn.scan` with every variable collection broadcast,
    so the parameters and adapters keep their paths), each chunk rematerialised: the backward
    pass keeps each chunk's input and recomputes one chunk's activations at a time. The sequence is
    zero-padded to a whole number of chunks. Each chunk draws its own dropout rng. Without
    `chunk_tokens`, or for a sequence no longer than one chunk: `module(x)`."""
    b, t, d = x.shape
    if chunk_tokens is None or t <= chunk_tokens:
        return module(x)
    n = -(-t // chunk_tokens)
    padded = jnp.pad(x, ((0, 0), (0, n * chunk_tokens - t), (0, 0)))
    chunks = padded.reshape(b, n, chunk_tokens, d).swapaxes(0, 1)  # [n, b, chunk, d]

    def body(mdl, carry, xc):
        return carry, mdl(xc)

    scan = nn.scan(
        nn.remat(body, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False),
        variable_broadcast=True,
        split_rngs={"params": False, "dropout": True},
        length=n,
    )
    _, out = scan(module, None, chunks)
    return out.swapaxes(0, 1).reshape(b, n * chunk_tokens, -1)[:, :t]


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
