"""Attention over packed rows: every implementation equals each document run alone.

The XLA reference runs everywhere; the Pallas kernels (Triton, and the TPU's Mosaic kernel) run
in interpret mode on the CPU;
cuDNN needs a GPU (its test is skipped elsewhere, and its ragged description is checked here
against the reference mask)."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax.errors import ConfigError
from lora_jax.models import attention as attn_mod
from lora_jax.models.attention import (
    attention,
    check_attention,
    packed_segments,
    resolve_attention,
    segment_mask,
    segments_per_row,
)

B, T, N, KV, D = 2, 128, 4, 2, 16
# documents of each row as (segment id, length); 0 is padding at the row's end
DOCS = [[(1, 50), (2, 30), (3, 48)], [(1, 7), (2, 90), (0, 31)]]


def _segment_ids():
    return jnp.asarray([np.concatenate([np.full(n, s) for s, n in row]) for row in DOCS], jnp.int32)


def _qkv(key, t=T, b=B):
    kq, kk, kv = jax.random.split(key, 3)
    return (
        jax.random.normal(kq, (b, t, N, D)),
        jax.random.normal(kk, (b, t, KV, D)),
        jax.random.normal(kv, (b, t, KV, D)),
    )


def _alone(q, k, v, attend):
    """Each document (and the padding run) attended on its own, concatenated back into rows."""
    rows = []
    for r, docs in enumerate(DOCS):
        start, parts = 0, []
        for _, n in docs:
            sl = slice(start, start + n)
            parts.append(attend(q[r : r + 1, sl], k[r : r + 1, sl], v[r : r + 1, sl], None))
            start += n
        rows.append(jnp.concatenate(parts, axis=1))
    return jnp.concatenate(rows, axis=0)


_CPU_ONLY = pytest.mark.skipif(
    jax.default_backend() != "cpu",
    reason="interpret mode and fp32 tolerances of the CPU; the GPU test below covers the kernels there",
)

_KERNELS = {
    "xla": lambda q, k, v, seg: attention(q, k, v, seg, implementation="xla"),
    "pallas-triton": lambda q, k, v, seg: attention(q, k, v, seg, interpret=True),
    "pallas-tpu": lambda q, k, v, seg: attn_mod._pallas_tpu(q, k, v, seg, 1 / D**0.5),
}


@_CPU_ONLY
@pytest.mark.parametrize("impl", sorted(_KERNELS))
def test_packed_rows_equal_documents_alone(impl):
    """Forward and gradients; the TPU (Mosaic) kernel runs in TPU interpret mode."""
    from jax.experimental.pallas import tpu as pltpu

    attend = _KERNELS[impl]
    q, k, v = _qkv(jax.random.key(0))
    seg = _segment_ids()
    w = jax.random.normal(jax.random.key(1), q.shape)  # a loss that weighs every output
    packed = lambda q, k, v: jnp.sum(w * attend(q, k, v, seg))
    alone = lambda q, k, v: jnp.sum(w * _alone(q, k, v, attend))
    with pltpu.force_tpu_interpret_mode() if impl == "pallas-tpu" else contextlib.nullcontext():
        out_p, out_a = jax.jit(attend)(q, k, v, seg), jax.jit(_alone, static_argnums=3)(q, k, v, attend)
        g_p = jax.jit(jax.grad(packed, argnums=(0, 1, 2)))(q, k, v)
        g_a = jax.jit(jax.grad(alone, argnums=(0, 1, 2)))(q, k, v)
    assert float(jnp.max(jnp.abs(out_p))) > 0.1
    np.testing.assert_allclose(out_p, out_a, atol=2e-5, rtol=2e-5)
    ref = attention(q, k, v, seg, implementation="xla")
    np.testing.assert_allclose(out_p, ref, atol=2e-5, rtol=2e-5)
    for gp, ga in zip(g_p, g_a):
        assert float(jnp.max(jnp.abs(ga))) > 1e-3
        np.testing.assert_allclose(gp, ga, atol=5e-5, rtol=5e-5)


@_CPU_ONLY
def test_pallas_equals_xla_unpacked_and_unaligned_length():
    q, k, v = _qkv(jax.random.key(2), t=100, b=1)  # not a multiple of the kernel's block: padded
    ref = attention(q, k, v, None, implementation="xla")
    out = attention(q, k, v, None, interpret=True)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


def _implied_mask(lengths, offsets, rows: int, t: int):
    """The causal block-diagonal mask over the batch's `rows * t` tokens that cuDNN reads from
    ragged (lengths, offsets): converted by JAX's own (private) `_fix_seqlen_offsets`, which turns
    per-row offsets into one cumulative list in elements, as the kernel receives them."""
    from jax._src.cudnn.fused_attention_stablehlo import _fix_seqlen_offsets

    heads, dim = 2, 8
    x = jnp.zeros((rows, t, heads, dim))
    lens, _, offs, _ = _fix_seqlen_offsets(
        jnp.asarray(lengths), jnp.asarray(lengths), jnp.asarray(offsets), jnp.asarray(offsets), x, x
    )
    lens, offs = np.asarray(lens).ravel(), np.asarray(offs).ravel() // (heads * dim)
    count = int(np.sum(lens > 0))
    assert np.all(lens[count:] == 0) and np.all(offs[count:] == rows * t)  # the fill ends the list
    np.testing.assert_array_equal(offs[:count] + lens[:count], offs[1 : count + 1])  # contiguous
    assert offs[0] == 0 and lens[:count].sum() == rows * t
    doc = np.zeros(rows * t, int)
    for i in range(count):
        doc[offs[i] : offs[i] + lens[i]] = i
    n = rows * t
    return (doc[:, None] == doc[None, :]) & np.tri(n, dtype=bool)


@pytest.mark.parametrize("flatten", [False, True])
def test_packed_segments_describe_the_reference_mask(flatten):
    """The ragged (lengths, offsets) handed to cuDNN allow exactly what the reference mask allows:
    rebuild the mask cuDNN would read from them (after JAX's conversion) and compare."""
    seg = _segment_ids()
    bound = segments_per_row([{"segment_ids": np.asarray(r)} for r in seg])
    assert bound == 4  # 3 segments per row, rounded up to a power of two
    lengths, offsets = (np.asarray(a) for a in packed_segments(seg, bound, flatten))
    mask = np.asarray(segment_mask(T, seg))[:, 0]
    ref = np.zeros((B * T, B * T), bool)
    for r in range(B):
        ref[r * T : (r + 1) * T, r * T : (r + 1) * T] = mask[r]
    if flatten:
        assert lengths.shape == (1, B * bound) and offsets.shape == (1, B * bound + 1)
        np.testing.assert_array_equal(_implied_mask(lengths, offsets, 1, B * T), ref)
    else:
        assert lengths.shape == (B, bound) and offsets.shape == (B, bound + 1)
        np.testing.assert_array_equal(_implied_mask(lengths, offsets, B, T), ref)


@_CPU_ONLY
def test_model_loss_of_packed_row_equals_documents_alone():
    """Through the whole model (fp32, XLA): a packed row's per-token logits equal each document's
    own forward pass (positions restart per document, as the packer writes them)."""
    cfg = lj.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = lj.Llama(cfg)
    ids = jax.random.randint(jax.random.key(3), (B, T), 1, 64)
    seg = _segment_ids()
    positions = jnp.asarray([np.concatenate([np.arange(n) for _, n in row]) for row in DOCS], jnp.int32)
    params = model.init(jax.random.key(4), ids)["params"]
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(5), p.shape), params)
    packed = model.apply({"params": params}, ids, positions, seg)
    for r, docs in enumerate(DOCS):
        start = 0
        for _, n in docs:
            alone = model.apply({"params": params}, ids[r : r + 1, start : start + n])
            np.testing.assert_allclose(packed[r, start : start + n], alone[0], atol=1e-4, rtol=1e-4)
            start += n


def test_impossible_choices_are_refused():
    with pytest.raises(ConfigError, match="cudnn.*needs an NVIDIA GPU"):
        check_attention("cudnn", "cpu")
    with pytest.raises(ConfigError, match="pallas.*needs a GPU or TPU"):
        check_attention("pallas", "cpu")
    with pytest.raises(ConfigError, match="flash"):
        check_attention("flash", "gpu")
    with pytest.raises(ConfigError, match="bf16/fp16"):
        resolve_attention("cudnn", jnp.float32, 64, "gpu")
    assert resolve_attention("auto", jnp.bfloat16, 64, "gpu") == "cudnn"
    assert resolve_attention("auto", jnp.float32, 64, "gpu") == "pallas"
    assert resolve_attention("auto", jnp.bfloat16, 64, "tpu") == "pallas"
    assert resolve_attention("auto", jnp.float32, 64, "cpu") == "xla"


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs an NVIDIA GPU")
@pytest.mark.parametrize("impl", ["cudnn", "pallas"])
def test_gpu_kernels_equal_the_reference_on_packed_rows(impl):
    """bf16 on the GPU: forward and gradients of the packed kernels against the XLA reference."""
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(jax.random.key(6), t=512, b=2))
    seg = jnp.asarray(np.repeat([[1, 2, 3, 4], [1, 1, 2, 0]], 128, axis=1), jnp.int32)
    w = jax.random.normal(jax.random.key(7), q.shape).astype(jnp.bfloat16)
    f = lambda impl: (
        lambda q, k, v: jnp.sum((w * attention(q, k, v, seg, implementation=impl, max_segments=4)).astype(jnp.float32))
    )
    out = attention(q, k, v, seg, implementation=impl, max_segments=4).astype(jnp.float32)
    ref = attention(q, k, v, seg, implementation="xla").astype(jnp.float32)
    assert not np.any(np.isnan(np.asarray(out)))
    rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
    assert rel(out, ref) < 1e-2
    for g, gr in zip(jax.grad(f(impl), (0, 1, 2))(q, k, v), jax.grad(f("xla"), (0, 1, 2))(q, k, v)):
        assert rel(g.astype(jnp.float32), gr.astype(jnp.float32)) < 2e-2


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs an NVIDIA GPU")
@pytest.mark.parametrize("packed", [False, True])
def test_cudnn_sliding_window_equals_the_reference(packed):
    """bf16 on the GPU: cuDNN's window (Mistral, Gemma 3's local layers), packed and not, against the
    XLA reference with the window in its mask; the window is narrower than the documents, so it
    cuts, and the result differs from full causal attention."""
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(jax.random.key(8), t=512, b=2))
    seg = jnp.asarray(np.repeat([[1, 1, 2, 2], [1, 1, 1, 0]], 128, axis=1), jnp.int32) if packed else None
    w = jax.random.normal(jax.random.key(9), q.shape).astype(jnp.bfloat16)

    def run(impl, window=100):
        return lambda q, k, v: attention(q, k, v, seg, implementation=impl, max_segments=4, sliding_window=window)

    f = lambda impl: lambda q, k, v: jnp.sum((w * run(impl)(q, k, v)).astype(jnp.float32))
    rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
    out, ref = run("cudnn")(q, k, v).astype(jnp.float32), run("xla")(q, k, v).astype(jnp.float32)
    assert not np.any(np.isnan(np.asarray(out)))
    assert rel(out, ref) < 1e-2
    assert rel(run("xla", None)(q, k, v).astype(jnp.float32), ref) > 0.05  # the window cuts
    for g, gr in zip(jax.grad(f("cudnn"), (0, 1, 2))(q, k, v), jax.grad(f("xla"), (0, 1, 2))(q, k, v)):
        assert rel(g.astype(jnp.float32), gr.astype(jnp.float32)) < 2e-2


def test_auto_leaves_cudnn_when_its_packed_statistics_would_be_huge(monkeypatch):
    """On a GPU, "auto" sends packed rows to cuDNN unless its `[rows * M, heads, t]` statistics
    pass the limit (a long row of many documents), where the Pallas kernel takes them."""
    from lora_jax.models import attention as attn

    calls = []
    monkeypatch.setattr(attn, "_platform", lambda: "gpu")
    monkeypatch.setattr(attn, "_cudnn_packed", lambda q, *a, **k: calls.append("cudnn") or q)
    monkeypatch.setattr(attn, "_pallas_triton", lambda q, *a, **k: calls.append("pallas") or q)
    q = jnp.zeros((1, 4096, 32, 64), jnp.bfloat16)
    seg = jnp.ones((1, 4096), jnp.int32)
    small = attn.CUDNN_PACKED_STATS_LIMIT // (4 * 32 * 4096)  # the most segments that fit the limit
    attn.attention(q, q, q, seg, max_segments=small)
    attn.attention(q, q, q, seg, max_segments=2 * small)
    attn.attention(q, q, q, seg, implementation="cudnn", max_segments=2 * small)  # asked for: kept
    assert calls == ["cudnn", "pallas", "cudnn"]
