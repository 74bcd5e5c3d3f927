"""Causal self-attention within the documents of packed rows, through a flash kernel.

A packed row holds several documents, told apart by `segment_ids` (`[batch, t]`, 1, 2, ... per
document, 0 = padding; each segment a contiguous run of the row): a token attends to the earlier
tokens of its own segment only. The implementations (`LlamaConfig.attention`):

- `"cudnn"`: cuDNN's fused flash attention, with sliding windows (Mistral, Gemma 3's local
  layers). Unpacked rows go through the public
  `jax.nn.dot_product_attention(implementation="cudnn", is_causal=True)`. Packed rows use cuDNN's
  ragged ("packed") layout, which JAX reaches only through a private module (`_cudnn_packed`):
  each document of a row is a ragged sequence of its own, so the kernel skips every block across
  documents. bf16/fp16 only.
- `"pallas"`: JAX's Pallas flash-attention kernels, which take segment ids: Triton on GPUs
  (`jax.experimental.pallas.ops.gpu.attention.mha`; any dtype; GQA by repeating the kv heads, as
  the kernel wants equal head counts), Mosaic on TPUs (`...ops.tpu.flash_attention`; tested in
  TPU interpret mode only, not yet on a TPU).
- `"xla"`: the reference: a dense `[batch, 1, t, t]` mask and XLA's attention, which keeps the
  `[batch, heads, t, t]` scores of every layer. For the CPU and as the test oracle only.
- `"auto"`: cuDNN on GPUs when the dtype and head size allow it, else the Pallas kernel; the
  Pallas kernel on TPUs; XLA on CPUs. Packed rows so long and so full of documents that cuDNN's
  statistics would pass `CUDNN_PACKED_STATS_LIMIT` take the Pallas kernel on GPUs too. The order
  is by measurement (one layer forward + backward, `experiments/bench/kernel_bench.py`; figures in
  docs/performance.md): cuDNN's packed path is faster than the Triton kernel, which is faster than
  XLA with a dense mask; Triton is the portable fallback.

The kernels are imported where they are used: each exists on its own platform only (and JAX's
Triton module warns on import in newer releases).
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.errors import ConfigError
from lora_jax.models.llama_config import ATTENTION_IMPLS

__all__ = [
    "attention",
    "resolve_attention",
    "check_attention",
    "segment_mask",
    "packed_segments",
    "segments_per_row",
    "cudnn_packed_stats_bytes",
    "CUDNN_PACKED_STATS_LIMIT",
]

Array = jax.Array

_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def _platform() -> str:
    return jax.default_backend()


def check_attention(name: str, platform: str | None = None) -> None:
    """Refuse, before anything runs, an implementation the platform does not have."""
    platform = platform or _platform()
    if name not in ATTENTION_IMPLS:
        raise ConfigError(f"model.attention={name!r}; choose one of {ATTENTION_IMPLS}")
    if name == "cudnn" and platform != "gpu":
        raise ConfigError(
            f"model.attention='cudnn' needs an NVIDIA GPU, but JAX runs on {platform!r}; "
            "use model.attention=auto (or xla on a CPU)"
        )
    if name == "pallas" and platform not in ("gpu", "tpu"):
        raise ConfigError(
            f"model.attention='pallas' needs a GPU or TPU, but JAX runs on {platform!r}; "
            "use model.attention=auto (or xla on a CPU)"
        )


def resolve_attention(name: str, dtype, head_dim: int, platform: str | None = None) -> str:
    """The implementation `name` stands for on this platform, for this dtype and head size."""
    platform = platform or _platform()
    check_attention(name, platform)
    cudnn_ok = jnp.dtype(dtype) in [jnp.dtype(d) for d in _CUDNN_DTYPES] and head_dim % 8 == 0 and head_dim <= 256
    if name == "cudnn" and not cudnn_ok:
        raise ConfigError(
            f"model.attention='cudnn' runs bf16/fp16 with a head size that is a multiple "
            f"of 8 up to 256 (got {jnp.dtype(dtype).name}, head_dim={head_dim}); use "
            "model.attention=auto or pallas"
        )
    if name != "auto":
        return name
    if platform == "gpu":
        return "cudnn" if cudnn_ok else "pallas"
    if platform == "tpu":
        return "pallas"
    return "xla"


def segment_mask(t: int, segment_ids: Array | None) -> Array:
    """`[batch or 1, 1, t, t]` boolean: causal, and within one segment when `segment_ids` is given.

    Example:

    >>> import jax.numpy as jnp
    >>> from lora_jax.models.attention import segment_mask
    >>> segment_mask(3, None)[0, 0].astype(int).tolist()  # causal
    [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    >>> segment_ids = jnp.array([[1, 1, 2, 2]])  # two documents packed in one row
    >>> segment_mask(4, segment_ids)[0, 0].astype(int).tolist()  # causal, and each within its own
    [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    """
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))[None, None]
    if segment_ids is None:
        return causal
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return causal & same[:, None]


def attention(
    q: Array,
    k: Array,
    v: Array,
    segment_ids: Array | None = None,
    *,
    implementation: str = "auto",
    max_segments: int | None = None,
    interpret: bool = False,
    sliding_window: int | None = None,
) -> Array:
    """Causal attention, `q [b, t, heads, d]`, `k, v [b, t, kv_heads, d]` -> `[b, t, heads, d]`.

    segment_ids: `[b, t]` int, or None for one document per row.
    max_segments: the most segments a row holds (`segments_per_row`): cuDNN's packed path sizes
        its buffers by it, so without it "auto" takes the Pallas kernel for packed rows.
    interpret: run the Pallas kernel in interpret mode (its numerics on a CPU, for tests).
    sliding_window: each query attends to itself and the `sliding_window - 1` keys before it
        (Mistral, Gemma 3's local layers), or None. cuDNN (packed or not) and the XLA reference
        implement it; the Pallas kernels take no window, so a window shorter than the sequence
        keeps "auto" on cuDNN and is refused for "pallas", never ignored.
    """
    t = q.shape[1]
    window = sliding_window if sliding_window is not None and sliding_window < t else None
    impl = "pallas" if interpret else resolve_attention(implementation, q.dtype, q.shape[-1])
    if window is not None and impl == "pallas":
        raise ConfigError(
            f"sliding_window={sliding_window} is shorter than the sequence ({t} tokens), and the Pallas "
            f"kernels take no window (this call resolved model.attention={implementation!r} to 'pallas'); "
            f"use model.attention=cudnn (bf16/fp16 on a GPU) or xla, or sequences of at most "
            f"{sliding_window} tokens"
        )
    if window is not None and impl == "xla":
        mask = segment_mask(t, segment_ids)
        pos = jnp.arange(t)
        mask = mask & (pos[None, :] > pos[:, None] - window)[None, None]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    if impl == "cudnn" and segment_ids is not None and max_segments is None:
        if implementation == "cudnn" or window is not None:
            raise ConfigError(
                "cuDNN's packed attention needs the most segments a row holds "
                "(LlamaConfig.max_segments; training sets it from the data); set it"
                + (" (the Pallas kernels take no sliding window)" if window else ", or use attention='pallas'")
            )
        impl = "pallas"
    if (
        impl == "cudnn"
        and implementation == "auto"
        and segment_ids is not None
        and window is None  # the Pallas kernels take no window
        and max_segments is not None  # always, here: a packed cuDNN call without it went to Pallas above
        and cudnn_packed_stats_bytes(q.shape, max_segments) > CUDNN_PACKED_STATS_LIMIT
    ):
        impl = "pallas"  # a long row of many documents: the Triton kernel's residuals are O(t)
    scale = 1.0 / math.sqrt(q.shape[-1])
    if impl == "xla":
        if segment_ids is None:
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
        return jax.nn.dot_product_attention(q, k, v, mask=segment_mask(q.shape[1], segment_ids), implementation="xla")
    if impl == "cudnn":
        if segment_ids is None:
            local = None if window is None else (window - 1, 0)  # JAX counts the keys left of the query
            return jax.nn.dot_product_attention(
                q, k, v, is_causal=True, implementation="cudnn", local_window_size=local
            )
        return _cudnn_packed(q, k, v, segment_ids, scale, max_segments, window=window)
    if (_platform() == "tpu") and not interpret:
        return _pallas_tpu(q, k, v, segment_ids, scale)
    return _pallas_triton(q, k, v, segment_ids, scale, interpret)


CUDNN_PACKED_STATS_LIMIT = 2**30
"""Above this many bytes of softmax statistics per call, "auto" leaves cuDNN's packed path for the
Pallas kernel: cuDNN keeps `[rows * M, heads, t]` fp32 for the backward pass, so a row of `t`
tokens holding `M ~ t / document length` documents costs O(t^2 / length) per layer (a 131,072-token
row of 200-1,800-token documents asks for 17 GB per layer)."""


def cudnn_packed_stats_bytes(q_shape, max_segments: int) -> int:
    """Bytes of the softmax statistics cuDNN's packed layout keeps for `q [b, t, heads, d]`."""
    b, t, n, _ = q_shape
    return 4 * b * max_segments * n * t


def segments_per_row(rows) -> int:
    """A bound on the segments of any of `rows` (dicts with `segment_ids`, as the packer writes
    them; a padding run counts as one), rounded up to a power of two so that datasets of similar
    shape share a compiled step."""
    most = 1
    for row in rows:
        seg = np.asarray(row["segment_ids"])
        most = max(most, 1 + int(np.count_nonzero(seg[1:] != seg[:-1])))
    return 1 << (most - 1).bit_length()


def packed_segments(segment_ids: Array, max_segments: int, flatten: bool = False) -> tuple[Array, Array]:
    """cuDNN's ragged description of packed rows: `(lengths [rows, M], offsets [rows, M+1])`.

    A segment starts at each row start and wherever the id changes (padding is a segment of its
    own: its queries attend among themselves, so nothing is NaN, and the loss masks them). Offsets
    are each segment's start within its row; unused entries are -1, as the docstring of JAX's
    `dot_product_attention` asks. (JAX turns them into one cumulative list over the batch, whose
    fill supplies the end: an explicit end entry per row would repeat the next row's start and
    shift every later segment's offset.) Segments beyond `max_segments` in a row would be dropped:
    the bound comes from the data.
    flatten: describe the batch as one row of `b*t` tokens (`M = b * max_segments`).
    """
    b, t = segment_ids.shape
    starts_here = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    if flatten:
        starts_here, b, t, max_segments = starts_here.reshape(1, b * t), 1, b * t, b * max_segments
    m = max_segments
    count = jnp.sum(starts_here, axis=1, dtype=jnp.int32)[:, None]  # [rows, 1]
    starts = jax.vmap(lambda s: jnp.nonzero(s, size=m, fill_value=t)[0])(starts_here).astype(jnp.int32)
    nxt = jnp.concatenate([starts[:, 1:], jnp.full((b, 1), t, jnp.int32)], axis=1)
    idx = jnp.arange(m, dtype=jnp.int32)[None]
    lengths = jnp.where(idx < count, nxt - starts, -1)
    offsets = jnp.concatenate([jnp.where(idx < count, starts, -1), jnp.full((b, 1), -1, jnp.int32)], 1)
    return lengths, offsets


def _cudnn_packed(q, k, v, segment_ids, scale, max_segments, flatten=False, window=None):
    """cuDNN flash attention over the documents of packed rows (its ragged layout).

    JAX exposes the packed layout (`q_offsets`/`kv_offsets`) only in its private
    `jax._src.cudnn.fused_attention_stablehlo`; this function is the one place that calls it, and
    tests pin both the description it hands over (through JAX's own conversion) and, on a GPU,
    the result to the XLA reference. cuDNN keeps softmax statistics of `[rows * M, heads, t]`, so
    `M` is the data's bound, not the worst case. flatten: the whole batch as one row (kept for
    the kernel benchmark; rows stay separate by default, so a data-parallel batch stays sharded).
    window: cuDNN's `sliding_window_length`, the keys `(pos - window, pos]` of each query, or None.
    """
    from jax._src.cudnn.fused_attention_stablehlo import MaskType
    from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_attention

    b, t, n, d = q.shape
    lengths, offsets = packed_segments(segment_ids, max_segments, flatten)
    shape = (lambda x: x.reshape(1, b * t, x.shape[2], d)) if flatten else (lambda x: x)
    out = cudnn_attention(
        shape(q),
        shape(k),
        shape(v),
        q_seqlen=lengths,
        kv_seqlen=lengths,
        q_offsets=offsets,
        kv_offsets=offsets,
        mask_type=MaskType.CAUSAL,
        scale=scale,
        sliding_window_length=window,
    )
    return out.reshape(b, t, n, d)


def _repeat_kv(q, x):
    return x if x.shape[2] == q.shape[2] else jnp.repeat(x, q.shape[2] // x.shape[2], axis=2)


def _pad_to_blocks(q, k, v, segment_ids, block: int = 128):
    """Pad the sequence to a multiple of the Pallas kernels' block. The padding sits after every
    real token, so causality keeps it out of their attention; with segment ids it is a segment
    of its own (-1)."""
    t = q.shape[1]
    pad = -t % block
    if pad:
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
        if segment_ids is not None:
            segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)
    return q, k, v, segment_ids


def _pallas_triton(q, k, v, segment_ids, scale, interpret):
    """JAX's Pallas (Triton) flash attention, forward and backward, with segment ids."""
    with warnings.catch_warnings():  # newer JAX points to tokamax; the kernel is still JAX's own
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas.ops.gpu.attention import BlockSizes, mha

    t = q.shape[1]
    q, k, v, segment_ids = _pad_to_blocks(q, k, v, segment_ids)
    sizes = BlockSizes(
        block_q=128, block_k=128, block_q_dkv=32, block_kv_dkv=32, block_q_dq=32, block_kv_dq=32
    )  # the kernel's defaults
    with warnings.catch_warnings():  # and warns again when it is traced
        warnings.simplefilter("ignore", DeprecationWarning)
        out = mha(
            q,
            _repeat_kv(q, k),
            _repeat_kv(q, v),
            segment_ids,
            sm_scale=scale,
            causal=True,
            block_sizes=sizes,
            interpret=interpret,
        )
    return out[:, :t]


def _pallas_tpu(q, k, v, segment_ids, scale):
    """The Pallas (Mosaic) TPU flash attention with segment ids; `[b, heads, t, d]` layout. (Its
    numerics are tested on the CPU under `pltpu.force_tpu_interpret_mode`.)"""
    from jax.experimental.pallas.ops.tpu.flash_attention import SegmentIds, flash_attention

    t = q.shape[1]
    q, k, v, segment_ids = _pad_to_blocks(q, k, v, segment_ids)
    tr = lambda x: jnp.swapaxes(x, 1, 2)
    seg = None if segment_ids is None else SegmentIds(q=segment_ids, kv=segment_ids)
    out = flash_attention(
        tr(q), tr(_repeat_kv(q, k)), tr(_repeat_kv(q, v)), segment_ids=seg, causal=True, sm_scale=scale
    )
    return tr(out)[:, :t]
