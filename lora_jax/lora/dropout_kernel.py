"""`dropout(x) @ A` as fused Pallas (Triton) kernels: the keep-mask is drawn inside the kernels that
read x, so no dropped copy of x is ever written to memory.

XLA draws the mask in one fusion and hands the dropped input to the GEMM, so each adapted projection
writes and reads a `[tokens, in]` copy of x in the forward pass and again in the backward pass (for
dA). Here:

- forward: one program per block of tokens loops over `in` and accumulates
  `where(keep, x, 0) @ A` in fp32, scaled by `1 / keep_p` once at the end;
- backward: one program per (block of `in`, slice of tokens) recomputes the mask of its x tile,
  accumulates `where(keep, x, 0)^T @ g` (dA, summed over the token slices in XLA) and, by default,
  writes `dx = where(keep, g @ A^T, 0) / keep_p` from the same tile: the backward reads x once and
  draws the mask once (`fuse_dx=False` leaves dx to XLA, with the mask drawn as packed bits again).

The mask is `keep_bits`'s stream exactly (lora_jax/lora/dropout_mask.py): element `e` of the flat
input takes the high half of word `e // 2` when `e` is even and its low half when odd, so a tile
hashes its `[rows, cols / 2]` words once and interleaves the two halves (`stack` + `reshape`, a
register shuffle in Triton). Triton's integers are signless: uint32 multiplies wrap, `>>` on uint32
lowers to a logical shift and `>=` to an unsigned compare, which is what the hash needs.

`fits` says when the kernels apply (16-bit inputs on a GPU, `in` a multiple of 32, rank at most
128); `interpret=True` runs the same kernels on the CPU, for tests.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from lora_jax.lora.dropout_mask import dropout_keep_mask, key_words, mix32

__all__ = ["Blocks", "fits", "blocks_for", "dropout_project_fused"]

_MAX_RANK = 128


class Blocks(NamedTuple):
    """Tile sizes (powers of two): `tokens` rows and `features` columns of x per step, the number
    of token slices the backward pass splits its reduction into, and Triton's warps and stages."""

    tokens: int = 64
    features: int = 128
    splits: int = 1
    num_warps: int = 4
    num_stages: int = 3


def _rank_padded(r: int) -> int:
    """Triton's dot wants every dimension a power of two of at least 16."""
    return max(16, 1 << (r - 1).bit_length())


def fits(x_shape, a_shape, dtype) -> bool:
    """Whether the fused kernels take `x [..., in] @ a [in, r]` in `dtype` (on a GPU; the tests run
    any float dtype in interpret mode)."""
    k, r = a_shape
    n = math.prod(x_shape)
    return (
        jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and x_shape[-1] == k
        and k % 32 == 0
        and 0 < r <= _MAX_RANK
        and 0 < n < 2**31  # Triton's offsets are int32
    )


def blocks_for(tokens: int, features: int, *, target_programs: int = 512) -> Blocks:
    """Tile sizes for `[tokens, features]`: 128 feature columns where they divide, and the backward
    reduction split over enough token slices to give about `target_programs` programs."""
    if features % 32:
        raise ValueError(f"the fused dropout kernels take an input width that is a multiple of 32, not {features}")
    bk = next(b for b in (128, 64, 32) if features % b == 0)
    bt = 64
    n_t = -(-tokens // bt)
    splits = max(1, min(n_t, -(-target_programs // (features // bk))))
    return Blocks(tokens=bt, features=bk, splits=splits)


def _keep_tile(k0, k1, threshold, row0, col0, blocks: Blocks, features: int):
    """The keep-mask of the x tile at (row0, col0): `keep_bits`'s stream over the flat index."""
    bt, bk = blocks.tokens, blocks.features
    rows = (row0 + jnp.arange(bt, dtype=jnp.int32)).astype(jnp.uint32)
    cols = (col0 // 2 + jnp.arange(bk // 2, dtype=jnp.int32)).astype(jnp.uint32)
    words = rows[:, None] * jnp.uint32(features // 2) + cols[None, :]  # word e // 2, mod 2**32
    h = mix32(mix32(words ^ k0) + k1)
    draws = jnp.stack([h >> 16, h & jnp.uint32(0xFFFF)], axis=-1).reshape(bt, bk)  # even e: high half
    return draws >= threshold


def _fwd_kernel(k0_ref, k1_ref, t_ref, s_ref, x_ref, a_ref, y_ref, *, blocks: Blocks):
    tokens, features = x_ref.shape
    bt, bk = blocks.tokens, blocks.features
    row0 = pl.program_id(0) * bt
    rows_ok = (row0 + jnp.arange(bt, dtype=jnp.int32) < tokens)[:, None]
    k0, k1, t = k0_ref[...], k1_ref[...], t_ref[...]

    def body(j, acc):
        col0 = pl.multiple_of(j * bk, bk)
        x = plgpu.load(x_ref.at[pl.ds(row0, bt), pl.ds(col0, bk)], mask=rows_ok, other=0)
        xd = jnp.where(_keep_tile(k0, k1, t, row0, col0, blocks, features), x, jnp.zeros_like(x))
        a = a_ref[pl.ds(col0, bk), :]
        return acc + jax.lax.dot_general(xd, a, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, features // bk, body, jnp.zeros((bt, a_ref.shape[1]), jnp.float32))
    plgpu.store(y_ref.at[pl.ds(row0, bt), :], (acc * s_ref[...]).astype(y_ref.dtype), mask=rows_ok)


def _bwd_kernel(k0_ref, k1_ref, t_ref, s_ref, x_ref, a_ref, g_ref, *out_refs, blocks: Blocks, per_split: int):
    da_ref, dx_ref = out_refs if len(out_refs) == 2 else (out_refs[0], None)
    tokens, features = x_ref.shape
    bt, bk = blocks.tokens, blocks.features
    col0 = pl.multiple_of(pl.program_id(0) * bk, bk)
    first = pl.program_id(1) * per_split
    k0, k1, t, s = k0_ref[...], k1_ref[...], t_ref[...], s_ref[...]
    a = a_ref[pl.ds(col0, bk), :]

    def body(n, acc):
        row0 = (first + n) * bt
        rows_ok = (row0 + jnp.arange(bt, dtype=jnp.int32) < tokens)[:, None]
        x = plgpu.load(x_ref.at[pl.ds(row0, bt), pl.ds(col0, bk)], mask=rows_ok, other=0)
        g = plgpu.load(g_ref.at[pl.ds(row0, bt), :], mask=rows_ok, other=0)
        keep = _keep_tile(k0, k1, t, row0, col0, blocks, features)
        xd = jnp.where(keep, x, jnp.zeros_like(x))
        if dx_ref is not None:
            ga = jax.lax.dot_general(g, a, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            dx = jnp.where(keep, ga * s, jnp.zeros_like(ga)).astype(dx_ref.dtype)
            plgpu.store(dx_ref.at[pl.ds(row0, bt), pl.ds(col0, bk)], dx, mask=rows_ok)
        return acc + jax.lax.dot_general(xd, g, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, per_split, body, jnp.zeros((bk, g_ref.shape[1]), jnp.float32))
    da_ref[pl.program_id(1), pl.ds(col0, bk), :] = acc * s


def _stream(key, rate):
    """The scalars the kernels take: the key's two words, the drop threshold (uint32) and the scale
    `1 / keep_p` (0 at rate 1, where every element is dropped)."""
    threshold = jnp.round(jnp.asarray(rate, jnp.float32) * 65536.0)
    keep_p = 1.0 - threshold / 65536.0
    scale = jnp.where(keep_p > 0, 1.0 / jnp.maximum(keep_p, 2.0**-16), 0.0)
    k0, k1 = key_words(key)
    return k0, k1, threshold.astype(jnp.uint32), scale


def _pad_rank(m, r_pad):
    r = m.shape[-1]
    return m if r == r_pad else jnp.pad(m, ((0, 0), (0, r_pad - r)))


def _pallas_call(*args, **kwargs):
    """`pl.pallas_call`, quiet about newer JAX's deprecation of its Triton backend (the kernels are
    still JAX's own; one warning per traced projection would flood a training log)."""
    call = pl.pallas_call(*args, **kwargs)

    def run(*operands):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return call(*operands)

    return run


def _forward(x2, a, key, rate, blocks: Blocks, interpret: bool):
    tokens, features = x2.shape
    r = a.shape[1]
    a = _pad_rank(a, _rank_padded(r))
    y = _pallas_call(
        functools.partial(_fwd_kernel, blocks=blocks),
        out_shape=jax.ShapeDtypeStruct((tokens, a.shape[1]), x2.dtype),
        grid=(pl.cdiv(tokens, blocks.tokens),),
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=interpret,
        name="dropout_project_fwd",
    )(*_stream(key, rate), x2, a)
    return y[:, :r]


def _backward(x2, a, key, rate, g2, blocks: Blocks, interpret: bool, fuse_dx: bool):
    tokens, features = x2.shape
    r = a.shape[1]
    r_pad = _rank_padded(r)
    a_p, g_p = _pad_rank(a, r_pad), _pad_rank(g2, r_pad)
    n_t = pl.cdiv(tokens, blocks.tokens)
    splits = min(blocks.splits, n_t)
    per_split = pl.cdiv(n_t, splits)
    out_shape = [jax.ShapeDtypeStruct((splits, features, r_pad), jnp.float32)]
    if fuse_dx:
        out_shape.append(jax.ShapeDtypeStruct((tokens, features), x2.dtype))
    outs = _pallas_call(
        functools.partial(_bwd_kernel, blocks=blocks, per_split=per_split),
        out_shape=out_shape,
        grid=(features // blocks.features, splits),
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=interpret,
        name="dropout_project_bwd",
    )(*_stream(key, rate), x2, a_p, g_p)
    da = jnp.sum(outs[0], axis=0)[:, :r].astype(a.dtype)
    if fuse_dx:
        return outs[1], da
    keep, keep_p = dropout_keep_mask(key, rate, x2.shape)
    ga = jax.lax.dot_general(g2, a, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return jnp.where(keep, ga / keep_p, 0).astype(x2.dtype), da


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def dropout_project_fused(x, a, key, rate, blocks: Blocks | None = None, interpret: bool = False, fuse_dx=True):
    """`dropout(x) @ a` for `x [..., in]`, `a [in, r]`, with `keep_bits`'s mask at `rate` (a number
    or a traced scalar), by the fused kernels. `blocks` defaults to `blocks_for` the shape;
    `interpret` runs the kernels on the CPU; `fuse_dx=False` computes dx in XLA instead.
    Residuals: x, a, the key and the rate (the mask is drawn again in the backward kernel)."""
    return _fused_fwd(x, a, key, rate, blocks, interpret, fuse_dx)[0]


def _flat(x, a, blocks):
    """x as `[tokens, in]`, and the tile sizes, checked against the shapes."""
    x2 = x.reshape(-1, x.shape[-1])
    blocks = blocks or blocks_for(*x2.shape)
    if a.ndim != 2 or a.shape[0] != x2.shape[1] or x2.shape[1] % blocks.features or a.shape[1] > _MAX_RANK:
        raise ValueError(
            f"dropout_project_fused takes x [..., in] and a [in, r <= {_MAX_RANK}] with `in` a multiple of "
            f"the feature block {blocks.features}; got x {x.shape} and a {a.shape} "
            "(dropout_project runs the XLA path for shapes the kernels do not take)"
        )
    return x2, blocks


def _fused_fwd(x, a, key, rate, blocks, interpret, fuse_dx):
    x2, blocks = _flat(x, a, blocks)
    y = _forward(x2, a, key, rate, blocks, interpret)
    return y.reshape(*x.shape[:-1], a.shape[1]), (x, a, key, rate)


def _fused_bwd(blocks, interpret, fuse_dx, res, g):
    x, a, key, rate = res
    x2, blocks = _flat(x, a, blocks)
    dx, da = _backward(x2, a, key, rate, g.reshape(-1, a.shape[1]), blocks, interpret, fuse_dx)
    return dx.reshape(x.shape), da, None, jnp.zeros_like(rate)


dropout_project_fused.defvjp(_fused_fwd, _fused_bwd)
