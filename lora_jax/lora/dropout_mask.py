"""LoRA dropout's keep-mask: a counter-based stream of bits, the same wherever it is drawn.

The XLA path (`lora_jax.lora.dropout`) and the fused Pallas kernels (`lora_jax.lora.dropout_kernel`)
both draw the mask of element `e` from word `e // 2` of this stream, so the two train the same
adapter; this module is the one definition both import.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

__all__ = ["keep_bits", "unpack_keep", "dropout_keep_mask", "mix32", "key_words"]


def mix32(x):
    """A bijective 32-bit integer hash (C. Wellons' "lowbias32", found by his hash-prospector
    search for low avalanche bias): two multiply-xorshift rounds."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x21F0AAAD)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x735A2D97)
    return x ^ (x >> 15)


def key_words(key) -> tuple[jax.Array, jax.Array]:
    """Two 32-bit words from a key of any PRNG implementation (its words folded by xor)."""
    data = jax.random.key_data(key).reshape(-1)
    return functools.reduce(jnp.bitwise_xor, data[0::2]), functools.reduce(jnp.bitwise_xor, data[1::2])


def keep_bits(key, rate, n: int) -> tuple[jax.Array, jax.Array]:
    """`(bits uint8 [ceil(n/8)], keep probability)`: the keep-mask of `n` elements, eight to a byte
    (element `8j + b` is bit `b` of byte `j`).

    Each 32-bit word `i` of the stream is `mix(mix(i ^ k0) + k1)` for the key's words `k0, k1`, and
    gives two 16-bit draws; an element is dropped when its draw is below `round(rate * 2**16)`.
    Why not `jax.random.bernoulli`: it spends a Threefry hash (20 rounds) per element, and LoRA
    dropout draws a mask over the input of seven projections per layer, so the hashes were a large
    part of a training step (JAX's Philox and RBG implementations cost about the same, see
    experiments/bench/kernel_bench.py); two multiply-xorshift rounds per two elements cost a
    fraction of that, and the masks pass the tests of tests/test_dropout.py (drop rate, independent
    neighbours, rows and keys). The drop probability is `rate` rounded to a multiple of 2**-16 (0.05
    becomes 0.0500031) and kept values are scaled by the exact keep probability, so the layer stays
    unbiased. The stream runs over the flat index, so a mask does not depend on sharding or `vmap`,
    and packed bits are what the backward pass keeps: 1 bit per element instead of a second draw.
    """
    if n >= 2**33:
        raise ValueError(f"a dropout mask of {n} elements is more than the 2**33 its 32-bit word counter covers")
    rate = jnp.asarray(rate, jnp.float32)
    threshold = jnp.round(rate * 65536.0)
    k0, k1 = key_words(key)
    t = threshold.astype(jnp.uint32)
    byte = jax.lax.iota(jnp.uint32, -(-n // 8))
    bits = jnp.zeros_like(byte)
    for w in range(4):  # word 4j + w gives bits 2w (its high half) and 2w + 1 (its low half)
        h = mix32(mix32((byte * 4 + w) ^ k0) + k1)
        bits = (
            bits
            | ((h >> 16) >= t).astype(jnp.uint32) << (2 * w)
            | ((h & 0xFFFF) >= t).astype(jnp.uint32) << (2 * w + 1)
        )
    # one elementwise expression per byte: it fuses into a single loop, with no per-word array
    return bits.astype(jnp.uint8), 1.0 - threshold / 65536.0


def unpack_keep(bits, shape) -> jax.Array:
    """The bool keep-mask `[shape]` from `keep_bits`'s bytes. Unpacked in uint8 so that an
    unfused intermediate costs a byte per element, not four."""
    n = math.prod(shape)
    flat = ((bits[:, None] >> jax.lax.iota(jnp.uint8, 8)[None, :]) & jnp.uint8(1)).reshape(-1)
    if flat.shape[0] != n:
        flat = flat[:n]
    return flat.reshape(shape) != 0


def dropout_keep_mask(key, rate, shape) -> tuple[jax.Array, jax.Array]:
    """`(keep [shape] bool, keep probability)` for inverted dropout at `rate` (a number or a
    traced scalar); see `keep_bits` for how it is drawn."""
    bits, keep_p = keep_bits(key, rate, math.prod(shape))
    return unpack_keep(bits, shape), keep_p
