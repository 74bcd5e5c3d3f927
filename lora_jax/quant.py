"""QLoRA's frozen base: 4-bit NormalFloat (NF4) or int8 projection kernels, dequantised on the fly.

A projection kernel `[..., in, out]` (leading axes: the stacked layers of a scanned model) becomes a
`QuantizedKernel` pytree whose arrays all keep the kernel's `[..., in-ish, out]` layout, so they shard
along the same logical axes as the kernel they replace:

    codes         nf4: uint8 [..., in/2, out]   two 4-bit code-book indices per byte, packed along
                                                `in` (row 2i in the high nibble, 2i+1 in the low, as
                                                bitsandbytes packs consecutive elements)
                  int8: int8 [..., in, out]     round(127 * w / absmax)
    scales_q      uint8 [..., in/64, out]       absmax of each block of 64 consecutive inputs of one
                                                output column, double-quantised: 8-bit indices into
                                                bitsandbytes' signed dynamic map ...
    scales_scale  float32 [..., in/64, ceil(out/256)]  ... in blocks of 256 scales along `out`,
    scales_offset float32 [...]                 after subtracting the mean scale of the slice.

    w ~= code_book[codes] * (dynamic_map[scales_q] * scales_scale + scales_offset)

This is the QLoRA recipe (Dettmers et al. 2023, arXiv:2305.14314): NF4 with blockwise absmax (block
64) and double quantisation of the absmax constants (8-bit, block 256, mean offset), as
bitsandbytes' `quantize_4bit(..., quant_type="nf4", compress_statistics=True)` does. The one layout
difference: bitsandbytes blocks the flattened torch `[out, in]` tensor; here blocks run along `in`
within one output column (the same 64 weights per block for a row-major torch weight) and the
second-level blocks along `out`, so every array shards like the kernel. `in` not divisible by the
block is zero-padded (the padding dequantises to 0 and is sliced off).

Dequantisation happens where a kernel is used (`lora_jax.lora.kernel`): the one kernel a projection
needs, in the compute dtype, recomputed in the backward pass rather than stored, so device memory
never holds full-precision copies of the projections (and, inside `nn.scan`, never of all layers).

`QuantizedKernel` answers `.shape`, `.ndim`, `.size` and `.dtype` as the kernel it replaces does,
`.astype(dtype)` dequantises, and `q[i]` takes layer i: code that only inspects or casts kernels
(targeting, merging, export) works on it unchanged.

`kind="fp8"` is the third kind of frozen base (`lora_jax.fp8.Fp8Kernel`: e4m3 codes, per-channel
scales, multiplied in FP8 where the GPU can); `is_quantized`, `quantize`, `dequantize` and
`quantize_like` answer for it too, so every caller treats the three kinds alike.
"""

from __future__ import annotations

import functools
from statistics import NormalDist
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lora_jax.errors import ConfigError
from lora_jax.fp8 import Fp8Kernel, dequantize_fp8, quantize_fp8
from lora_jax.models.layout import projection_names
from lora_jax.stored_kernel import StoredKernel

__all__ = [
    "QUANT_KINDS",
    "NF4_CODE_BOOK",
    "QuantizedKernel",
    "QuantSpec",
    "quantize",
    "dequantize",
    "quantize_like",
    "quantize_params",
    "is_quantized",
    "check_kind",
    "nf4_code_book_derived",
    "dynamic_map",
    "is_projection_kernel",
]

QUANT_KINDS = ("nf4", "int8", "fp8")
_PROJECTIONS = projection_names()  # every family's projections (lora_jax.models.layout)
BLOCK = 64  # weights per absmax scale
DQ_BLOCK = 256  # scales per second-level scale

# The 16 NF4 values as bitsandbytes ships them (functional.py, `get_4bit_type("nf4")`), also listed in
# the QLoRA paper's appendix; `nf4_code_book_derived()` recomputes them from normal quantiles.
NF4_CODE_BOOK = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)


def nf4_code_book_derived(offset: float = 0.9677083) -> np.ndarray:
    """NF4 from first principles (bitsandbytes' `create_normal_map`): 8 positive and 7 negative
    quantiles of N(0, 1) at evenly spaced probabilities from `offset` to 1/2, plus an exact 0,
    normalised to [-1, 1]. Asymmetric so that 0 is represented exactly with 4 bits."""
    ppf = NormalDist().inv_cdf
    probs = lambda n: np.linspace(np.float32(offset), np.float32(0.5), n, dtype=np.float32)[:-1]
    pos = [ppf(float(p)) for p in probs(9)]
    neg = [-ppf(float(p)) for p in probs(8)]
    values = np.sort(np.asarray(pos + [0.0] + neg, np.float64)).astype(np.float32)
    return values / values.max()


def dynamic_map() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map(signed=True)`, the code of the
    double quantisation): a sign, a unary exponent 10^-6..10^0 and the remaining bits of linear
    fraction in [0.1, 1], plus 0 and 1; 256 sorted float32 values in [-0.993, 1]. Equal to
    bitsandbytes' to float32 rounding: its arithmetic order differs, and 22 of the 256 values
    differ by one rounding step (at most 6e-8; tests/test_qlora_reference.py)."""
    data: list[float] = []
    for i in range(7):
        bounds = np.linspace(0.1, 1, 2**i + 1, dtype=np.float32)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2)
        scaled = (np.float32(10.0 ** (i - 6)) * means).astype(np.float32)
        data += scaled.tolist() + (-scaled).tolist()
    data += [0.0, 1.0]
    assert len(data) == 256
    return np.sort(np.asarray(data, np.float32))


DYNAMIC_MAP = dynamic_map()


def _midpoints(table: np.ndarray) -> np.ndarray:
    return ((table[:-1] + table[1:]) / np.float32(2)).astype(np.float32)


_NF4_MIDS = _midpoints(NF4_CODE_BOOK)
_DYN_MIDS = _midpoints(DYNAMIC_MAP)


class QuantSpec(NamedTuple):
    """The static part of a quantised kernel (pytree auxiliary data)."""

    kind: str  # "nf4" | "int8"
    in_features: int
    out_features: int
    dtype: str  # of the kernel it replaces (and of `dequantize` by default)
    block: int = BLOCK
    dq_block: int = DQ_BLOCK


class PartKey(jax.tree_util.GetAttrKey):
    """Path entry of one array of a `QuantizedKernel`: an attribute key (`.codes`) whose `.key` is
    also "kernel", so path-based rules (`lora_jax.sharding.tree_shardings` reads `.key` first) give
    each array the logical axes of the kernel it replaces, whose layout every array keeps."""

    key: ClassVar[str] = "kernel"


_FIELDS = ("codes", "scales_q", "scales_scale", "scales_offset")


class QuantizedKernel(StoredKernel):
    """A frozen projection kernel in 4 (NF4) or 8 (int8) bits; see the module docstring for layout."""

    __slots__ = _FIELDS + ("spec",)

    def __init__(self, codes, scales_q, scales_scale, scales_offset, spec: QuantSpec):
        self.codes, self.scales_q, self.scales_scale, self.scales_offset = (
            codes,
            scales_q,
            scales_scale,
            scales_offset,
        )
        self.spec = spec

    # --- the kernel it stands for
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.scales_offset.shape) + (self.spec.in_features, self.spec.out_features)

    @property
    def kind(self) -> str:
        return self.spec.kind

    def arrays(self) -> tuple:
        return tuple(getattr(self, f) for f in _FIELDS)

    def astype(self, dtype) -> jax.Array:
        """The dequantised kernel in `dtype` (what `kernel.astype` means for a plain kernel)."""
        return dequantize(self, dtype)

    def __getitem__(self, index) -> QuantizedKernel:
        """Index the leading (layer) axes, e.g. `q[3]` is layer 3 of a scanned model's kernel."""
        if isinstance(index, tuple) and len(index) > len(self.scales_offset.shape):
            raise IndexError(
                f"a quantised kernel can only be indexed on its {len(self.scales_offset.shape)} leading (layer) axes"
            )
        codes, scales_q, scales_scale, scales_offset = (a[index] for a in self.arrays())
        return QuantizedKernel(codes, scales_q, scales_scale, scales_offset, self.spec)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{f}={getattr(getattr(self, f), 'shape', None)}" for f in _FIELDS)
        return f"QuantizedKernel({self.spec.kind}, shape={self.shape}, dtype={self.spec.dtype}, {shapes})"


def _unflatten(spec: QuantSpec, children) -> QuantizedKernel:
    codes, scales_q, scales_scale, scales_offset = children
    return QuantizedKernel(codes, scales_q, scales_scale, scales_offset, spec)


jax.tree_util.register_pytree_with_keys(
    QuantizedKernel,
    lambda q: (tuple((PartKey(f), getattr(q, f)) for f in _FIELDS), q.spec),
    _unflatten,
    lambda q: (q.arrays(), q.spec),
)


def is_quantized(x) -> bool:
    """Whether `x` is a frozen base kernel in a quantised form (NF4/int8 or FP8)."""
    return isinstance(x, (QuantizedKernel, Fp8Kernel))


def check_kind(kind: str | None) -> str | None:
    if kind is not None and kind not in QUANT_KINDS:
        raise ConfigError(f"quantize={kind!r}; choose one of {QUANT_KINDS} (or None for no quantisation)")
    return kind


def _nearest(table_mids: np.ndarray, x: jax.Array) -> jax.Array:
    """Index of the nearest code-book value (ties to the lower): the number of midpoints below x."""
    return jnp.searchsorted(jnp.asarray(table_mids), x, side="left", method="compare_all")


def _quantize_scales(absmax: jax.Array, dq_block: int):
    """Double quantisation of `[..., nb, out]` fp32 scales: subtract their mean, then 8-bit dynamic
    codes in blocks of `dq_block` along `out` (the last block zero-padded)."""
    out = absmax.shape[-1]
    offset = jnp.mean(absmax, axis=(-2, -1))
    centred = absmax - offset[..., None, None]
    pad = (-out) % dq_block
    padded = jnp.pad(centred, [(0, 0)] * (centred.ndim - 1) + [(0, pad)])
    blocks = padded.reshape(padded.shape[:-1] + ((out + pad) // dq_block, dq_block))
    scale = jnp.max(jnp.abs(blocks), axis=-1)
    normed = blocks / jnp.where(scale == 0, 1.0, scale)[..., None]
    codes = _nearest(_DYN_MIDS, normed).astype(jnp.uint8).reshape(padded.shape)[..., :out]
    return codes, scale, offset


def dequantize_scales(q: QuantizedKernel) -> jax.Array:
    """The fp32 absmax scales `[..., nb, out]` back from their double quantisation."""
    out, dq = q.spec.out_features, q.spec.dq_block
    values = jnp.take(jnp.asarray(DYNAMIC_MAP), q.scales_q.astype(jnp.int32), axis=0)
    per_scale = jnp.repeat(q.scales_scale, dq, axis=-1)[..., :out]
    return values * per_scale + q.scales_offset[..., None, None]


def quantize(
    w, kind: str = "nf4", *, block: int = BLOCK, dq_block: int = DQ_BLOCK, dtype: Any = None
) -> QuantizedKernel | Fp8Kernel:
    """Quantise a kernel `[..., in, out]` (any leading axes); traceable (jit it, or use
    `quantize_params` / `load_pretrained(quantize=...)`). Arithmetic in fp32.
    dtype: what `dequantize` returns by default (default: `w`'s dtype).
    kind="fp8": `lora_jax.fp8.quantize_fp8` (per-channel scales; `block`, `dq_block` unused)."""
    check_kind(kind)
    if kind is None:
        raise ConfigError("quantize() needs kind='nf4', 'int8' or 'fp8'")
    if kind == "fp8":
        return quantize_fp8(w, dtype=dtype)
    w = jnp.asarray(w)
    if w.ndim < 2:
        raise ConfigError(f"quantize() takes a kernel [..., in, out]; got shape {list(w.shape)}")
    if block <= 0 or block % 2 or dq_block <= 0:
        raise ConfigError(f"block={block} must be a positive even number and dq_block={dq_block} positive")
    in_f, out_f = w.shape[-2:]
    lead = w.shape[:-2]
    dtype = jnp.dtype(dtype or w.dtype).name
    w32 = w.astype(jnp.float32)
    pad = (-in_f) % block
    if pad:
        w32 = jnp.pad(w32, [(0, 0)] * len(lead) + [(0, pad), (0, 0)])
    nb = (in_f + pad) // block
    blocks = w32.reshape(lead + (nb, block, out_f))
    absmax = jnp.max(jnp.abs(blocks), axis=-2)  # [..., nb, out]
    normed = blocks / jnp.where(absmax == 0, 1.0, absmax)[..., :, None, :]
    normed = normed.reshape(lead + (nb * block, out_f))
    if kind == "nf4":
        idx = _nearest(_NF4_MIDS, normed).astype(jnp.uint8)
        pairs = idx.reshape(lead + (nb * block // 2, 2, out_f))
        codes = (pairs[..., 0, :] << 4) | pairs[..., 1, :]
    else:
        codes = jnp.clip(jnp.round(normed * 127.0), -127, 127).astype(jnp.int8)
    scales_q, scales_scale, offset = _quantize_scales(absmax, dq_block)
    return QuantizedKernel(
        codes, scales_q, scales_scale, offset, QuantSpec(kind, int(in_f), int(out_f), dtype, block, dq_block)
    )


def _code_values(q: QuantizedKernel) -> jax.Array:
    """fp32 code-book values `[..., in_padded, out]` of the codes."""
    c = q.codes
    if q.spec.kind == "nf4":
        idx = jnp.stack([c >> 4, c & 0xF], axis=-2)  # [..., in/2, 2, out]
        idx = idx.reshape(c.shape[:-2] + (2 * c.shape[-2], c.shape[-1]))
        return jnp.take(jnp.asarray(NF4_CODE_BOOK), idx.astype(jnp.int32), axis=0)
    return c.astype(jnp.float32) / 127.0


def dequantize(q: QuantizedKernel | Fp8Kernel, dtype: Any = None) -> jax.Array:
    """The kernel `[..., in, out]` in `dtype` (default: the kernel's own): code value x scale in fp32,
    cast once."""
    if isinstance(q, Fp8Kernel):
        return dequantize_fp8(q, dtype)
    spec = q.spec
    values = _code_values(q)
    scales = dequantize_scales(q)
    lead, padded = values.shape[:-2], values.shape[-2]
    w = values.reshape(lead + (padded // spec.block, spec.block, spec.out_features)) * scales[..., :, None, :]
    w = w.reshape(lead + (padded, spec.out_features))[..., : spec.in_features, :]
    return w.astype(jnp.dtype(dtype or spec.dtype))


def quantize_like(w, like: QuantizedKernel | Fp8Kernel) -> QuantizedKernel | Fp8Kernel:
    """`w` quantised with the settings (kind, blocks, dtype) of `like`."""
    if isinstance(like, Fp8Kernel):
        q = quantize_fp8(w)
        return Fp8Kernel(q.codes, q.scale, like.spec)
    s = like.spec
    return quantize(w, s.kind, block=s.block, dq_block=s.dq_block, dtype=s.dtype)


@functools.partial(jax.jit, static_argnames=("kind", "block", "dq_block", "dtype"))
def _quantize_stacked(w, kind, block, dq_block, dtype):
    """One leaf, quantised one leading slice at a time (bounded temporaries for stacked layers)."""
    fn = functools.partial(quantize, kind=kind, block=block, dq_block=dq_block, dtype=dtype)
    if w.ndim == 2:
        return fn(w)
    flat = w.reshape((-1,) + w.shape[-2:])
    out = jax.lax.map(fn, flat)
    return jax.tree.map(lambda a: a.reshape(w.shape[:-2] + a.shape[1:]), out)


def is_projection_kernel(path) -> bool:
    """Whether `path` (keys or jax key entries) ends at the kernel of a projection of some family's
    layout: what QLoRA quantises."""
    path = tuple(str(getattr(p, "key", p)) for p in path)
    return len(path) >= 2 and path[-1] == "kernel" and path[-2] in _PROJECTIONS


def quantize_params(params, kind: str = "nf4", *, block: int = BLOCK, dq_block: int = DQ_BLOCK, donate: bool = False):
    """The Llama parameter tree with its seven projection kernels quantised (on their devices, one
    leaf at a time, one layer at a time); embeddings, norms and the LM head are returned as they are.
    donate=True deletes each full-precision kernel as soon as it is quantised, so peak memory is the
    model plus one layer's temporaries, not two models."""
    check_kind(kind)
    flat = traverse_util.flatten_dict(params)
    out = {}
    for path, leaf in flat.items():
        if is_projection_kernel(path) and not is_quantized(leaf):
            q = _quantize_stacked(leaf, kind, block, dq_block, jnp.dtype(leaf.dtype).name)
            if donate and isinstance(leaf, jax.Array):
                jax.block_until_ready(q)
                leaf.delete()
            out[path] = q
        else:
            out[path] = leaf
        flat[path] = None
    return traverse_util.unflatten_dict(out)
