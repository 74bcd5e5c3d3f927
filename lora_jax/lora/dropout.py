"""LoRA dropout at PEFT's place, the adapter's input: `dropout(x) @ A`, drawn cheaply and never stored.

PEFT draws an independent mask over the input of every adapted projection, so a step draws one
mask element per input element of seven projections per layer: the mask's cost is a visible part
of a training step, which is why its bits and its backward pass are hand-made here.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.extend.random import threefry2x32_p

__all__ = ["dropout_keep_mask", "dropped", "dropout_project"]


def _mm(x, w):
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _mm_t(a, b):
    """`a @ b.T` over the last axes: `[..., n] x [m, n] -> [..., m]`."""
    return jax.lax.dot_general(a, b, (((a.ndim - 1,), (1,)), ((), ())))


def _over_tokens(a, b):
    """`a^T b` summed over every leading (token) axis: `[..., m] x [..., n] -> [m, n]`."""
    lead = tuple(range(a.ndim - 1))
    return jax.lax.dot_general(a, b, ((lead, lead), ((), ())))


def dropout_keep_mask(key, rate, shape) -> tuple[jax.Array, jax.Array]:
    """`(keep [shape] bool, keep probability)` for inverted dropout at `rate` (a number or a
    traced scalar).

    Four masks elements come from each 64-bit Threefry output: a 16-bit draw each, dropped below
    `round(rate * 2**16)`. `jax.random.bernoulli` spends one Threefry hash per element and keeps
    32 of its 64 bits, and LoRA dropout draws a mask over the input of every adapted projection,
    so the hashes were a visible part of a training step; a quarter of them makes that small. The
    drop probability is `rate` rounded to a multiple of 2**-16 (0.05 becomes 0.0500031) and the
    kept values are scaled by the exact keep probability, so the layer stays unbiased. The count
    runs over the flat index, as JAX's partitionable Threefry does, so the mask does not depend on
    sharding or on `vmap`. Keys of other PRNG implementations take `jax.random.bernoulli`.
    """
    rate = jnp.asarray(rate, jnp.float32)
    data = jax.random.key_data(key)
    if data.shape != (2,) or data.dtype != jnp.uint32:
        keep_p = 1.0 - rate
        return jax.random.bernoulli(key, keep_p, shape), keep_p
    n = math.prod(shape)
    words = -(-n // 4)
    counts = jax.lax.iota(jnp.uint32, words)
    hi, lo = threefry2x32_p.bind(data[0], data[1], jnp.zeros_like(counts), counts)
    u16 = jax.lax.bitcast_convert_type(jnp.stack([hi, lo], axis=-1), jnp.uint16).reshape(-1)
    threshold = jnp.round(rate * 65536.0)
    keep = u16[:n].reshape(shape).astype(jnp.int32) >= threshold.astype(jnp.int32)
    return keep, 1.0 - threshold / 65536.0


def dropped(x, key, rate):
    keep, keep_p = dropout_keep_mask(key, rate, x.shape)
    return keep, keep_p.astype(x.dtype)


@jax.custom_vjp
def dropout_project(x, a, key, rate):
    """`dropout(x) @ a`, the adapter's first product under LoRA dropout, keeping only its inputs
    for the backward pass: the mask is drawn again from `key` there, so no dropped copy of each
    projection's input (nor its mask) is stored; autodiff would keep one per adapted projection."""
    keep, keep_p = dropped(x, key, rate)
    return _mm(jnp.where(keep, x / keep_p, 0).astype(x.dtype), a)


def _dropout_project_fwd(x, a, key, rate):
    return dropout_project(x, a, key, rate), (x, a, key, rate)


def _dropout_project_bwd(res, g):
    x, a, key, rate = res
    # The mask depends on the key alone, so XLA could draw it once for both passes and keep it,
    # or draw every layer's at the start of the backward pass: tying the key to the incoming
    # gradient makes it drawn here, when this projection's gradient is due.
    key, g = jax.lax.optimization_barrier((key, g))
    keep, keep_p = dropped(x, key, rate)
    xd = jnp.where(keep, x / keep_p, 0).astype(x.dtype)
    dx = jnp.where(keep, _mm_t(g, a) / keep_p, 0).astype(x.dtype)
    return dx, _over_tokens(xd, g).astype(a.dtype), None, jnp.zeros_like(rate)


dropout_project.defvjp(_dropout_project_fwd, _dropout_project_bwd)
