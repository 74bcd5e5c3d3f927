"""QLoRA's NF4 base against the real thing, bitsandbytes (on the CPU): a kernel quantised by
`lora_jax.quant` against `bitsandbytes.functional.quantize_4bit(blocksize=64, quant_type="nf4")`, code
for code and scale for scale; and each family's `load_pretrained(quantize="nf4")` model against
transformers' own model loaded with `BitsAndBytesConfig(load_in_4bit=True, ...)`, weights and logits.

The layouts, side by side (a torch weight `W[out, in]` is our kernel `K[in, out] = W.T`):

- NF4 codes: bitsandbytes blocks 64 consecutive elements of the flattened `W` and packs consecutive
  pairs into a byte; we block 64 consecutive inputs of one output column and pack along `in`. When
  `in` is a multiple of 64 the blocks are the same 64 weights and our `codes[in/2, out]` is
  bitsandbytes' packed bytes `[out, in/2]` transposed, byte for byte. Otherwise bitsandbytes' blocks
  straddle rows while ours are zero-padded per column: we equal bitsandbytes on the zero-padded `W`.
- Double quantisation (`compress_statistics=True`; ours is always on): both subtract the mean of all
  absmax scales and code them in 8 bits (the signed dynamic map) in blocks of 256, bitsandbytes along
  its flattened `[out, in/64]` scale array, we along `out` for each of the `in/64` rows of scales. With
  one block per row (`in` = 64) the two groupings are the same; with more they are not, and each
  side's scales are only held to their own rounding bound.
- Rounding: both round NF4 to the nearest code (our code books are bitwise equal). bitsandbytes' CPU
  8-bit quantiser (csrc/cpu_ops.cpp: a `BinSearch` lookup, then a left/right distance check) sends a
  value within ~1e-5 of the midpoint between two dynamic-map codes to either side (measured: 0.1% of
  uniform values, at most 1.4e-5 from the midpoint), where we take the nearest: such scale codes may
  differ by one; every other code must be equal.

For the models every projection has `in` = 64, so the checkpoint quantised by bitsandbytes and ours
agree code for code, and the logits are compared in fp32: bitsandbytes' `Linear4bit` on a CPU with
AVX512-BF16 switches at inference to a packed kernel that computes in bf16; its public
`support_avx512bf16_for_cpu` flag turned off gives the generic path (dequantise in fp32, then
`torch.nn.functional.linear`). The bf16 path as it ships is held to a bf16-sized bound as well.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import lora_jax as lj
from lora_jax import quant
from lora_jax.hf.names import flax_path, hf_entries
from lora_jax.models.layout import get_path, layout_of
from tests.helpers import FP32_ATOL, hf_model, make_hf_family, make_hf_tiny, max_diff, random_ids, torch_logits_of

bnb = pytest.importorskip("bitsandbytes")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
F = bnb.functional

# The largest rounding error of the 8-bit dynamic map, in units of a block's second-level scale: half
# its widest gap (0.9/64 in the top decade), plus bitsandbytes' CPU near-midpoint slack.
HALF_GAP = float(np.max(np.diff(quant.DYNAMIC_MAP))) / 2
MIDPOINT_SLACK = 3e-5


# ----------------------------------------------------------------------------- layouts
def nibbles(packed: np.ndarray) -> np.ndarray:
    """4-bit indices of packed bytes, the high nibble first: `[..., n]` bytes -> `[..., 2n]`."""
    packed = np.asarray(packed)
    return np.stack([packed >> 4, packed & 0xF], axis=-1).reshape(packed.shape[:-1] + (-1,)).astype(np.int64)


def bnb_quantize(w_oi: np.ndarray, nested: bool):
    """bitsandbytes' NF4 of a torch-layout weight `[out, in]` (block 64): packed bytes `[out, in/2]` and
    its QuantState."""
    packed, state = F.quantize_4bit(
        torch.from_numpy(np.ascontiguousarray(w_oi)), blocksize=64, quant_type="nf4", compress_statistics=nested
    )
    return packed.numpy().reshape(w_oi.shape[0], -1), state


def bnb_dequantize(packed: np.ndarray, state) -> np.ndarray:
    return F.dequantize_4bit(torch.from_numpy(packed).reshape(-1, 1), state).numpy()


def our_codes_oi(q: quant.QuantizedKernel) -> np.ndarray:
    """Our packed codes in bitsandbytes' layout: `[in/2, out]` transposed (padding included)."""
    return np.asarray(q.codes).T


def block_absmax(k_io: np.ndarray) -> np.ndarray:
    """The exact absmax scales `[in/64, out]` of a kernel (zero-padded along `in`)."""
    k = np.asarray(k_io, np.float32)
    k = np.pad(k, [(0, -k.shape[0] % 64), (0, 0)])
    return np.abs(k.reshape(-1, 64, k.shape[1])).max(axis=1)


def check_scale_codes(q: quant.QuantizedKernel, state, absmax: np.ndarray) -> int:
    """One block of scales per output row (`in` <= 64): our double quantisation against
    bitsandbytes' nested state, whose groupings are then the same. Offset (the mean scale) and
    second-level scales equal up to the order of the fp32 sums; 8-bit scale codes equal except where
    bitsandbytes' CPU quantiser rounds a near-midpoint value the other way (see the module docstring):
    there the codes differ by one, the value lies within MIDPOINT_SLACK of the midpoint, and ours is
    the nearer. Returns how many scale codes differ."""
    assert absmax.shape[0] == 1 and state.nested
    np.testing.assert_allclose(float(q.scales_offset), float(state.offset), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(q.scales_scale)[0], state.state2.absmax.numpy(), rtol=1e-6)
    ours, theirs = np.asarray(q.scales_q)[0].astype(np.int64), state.absmax.numpy().astype(np.int64)
    differ = np.nonzero(ours != theirs)[0]
    if differ.size:
        s2 = np.repeat(np.asarray(q.scales_scale)[0], 256)[differ]
        x = (absmax[0, differ] - float(q.scales_offset)) / s2
        dmap = quant.DYNAMIC_MAP
        assert np.all(np.abs(ours[differ] - theirs[differ]) == 1), (ours[differ], theirs[differ])
        mid = (dmap[ours[differ]] + dmap[theirs[differ]]) / 2
        assert np.all(np.abs(x - mid) < MIDPOINT_SLACK), np.abs(x - mid).max()
        assert np.all(np.abs(x - dmap[ours[differ]]) <= np.abs(x - dmap[theirs[differ]]))
    return int(differ.size)


def dq_bound(s2_blocks: np.ndarray, n: int) -> np.ndarray:
    """Per scale, the double quantisation's largest error: HALF_GAP (+ slack) times its block's
    second-level scale; `s2_blocks` the second-level scales of consecutive blocks of 256 scales."""
    return (HALF_GAP + MIDPOINT_SLACK) * np.repeat(np.asarray(s2_blocks, np.float32), 256)[:n]


# ----------------------------------------------------------------------------- kernels
_jq = jax.jit(quant.quantize, static_argnames=("kind", "block"))

KERNEL_SHAPES = {
    "in64": (96, 64),  # one block per row: same codes, same double quantisation
    "in64-out320": (320, 64),  # two second-level blocks, the last one partial
    "in192": (96, 192),  # three blocks per row: the double-quantisation groupings differ
    "in100-padded": (80, 100),  # in not a multiple of 64: ours zero-pads each column
}


@pytest.mark.parametrize("shape", list(KERNEL_SHAPES.values()), ids=list(KERNEL_SHAPES))
def test_nf4_kernel_matches_bitsandbytes(shape):
    n_out, n_in = shape
    w = (0.02 * np.random.default_rng(n_out + n_in).standard_normal((n_out, n_in))).astype(np.float32)
    q = _jq(jnp.asarray(w.T), "nf4")  # our kernel is the torch weight transposed
    ours = np.asarray(quant.dequantize(q)).T  # [out, in]
    padded = np.pad(w, [(0, 0), (0, -n_in % 64)])  # the zero padding we apply, applied for bitsandbytes
    packed, state = bnb_quantize(padded, nested=False)
    packed_dq, state_dq = bnb_quantize(padded, nested=True)

    # 4-bit codes: the same bytes, up to the transpose (and the same with double quantisation)
    assert np.array_equal(our_codes_oi(q), packed)
    assert np.array_equal(packed_dq, packed)
    codes = nibbles(packed)[:, :n_in]
    # first-level scales: bitsandbytes keeps them exact without double quantisation; ours are those
    # within the dynamic map's rounding bound of our own second-level scales
    absmax = block_absmax(w.T)
    assert np.array_equal(state.absmax.numpy().reshape(n_out, -1).T, absmax)
    our_scales = np.asarray(quant.dequantize_scales(q))
    bound = np.stack([dq_bound(s2, n_out) for s2 in np.asarray(q.scales_scale)])
    assert np.all(np.abs(our_scales - absmax) <= bound * (1 + 1e-5))
    # how bitsandbytes' bytes read (row-major, high nibble first, times the block's absmax): as `nibbles`
    assert np.array_equal(
        bnb_dequantize(packed, state)[:, :n_in], quant.NF4_CODE_BOOK[codes] * np.repeat(absmax.T, 64, 1)[:, :n_in]
    )

    theirs = bnb_dequantize(packed_dq, state_dq)[:, :n_in]
    if absmax.shape[0] == 1:  # the same double quantisation: equal except bitsandbytes' near-midpoint flips
        flips = check_scale_codes(q, state_dq, absmax)
        same = np.asarray(q.scales_q)[0] == state_dq.absmax.numpy()
        np.testing.assert_allclose(ours[same], theirs[same], rtol=1e-6, atol=1e-10)
        assert flips <= max(2, n_out // 100), flips
    else:  # different groupings: each side within its own bound of the exact scales, so of each other
        s2_theirs = state_dq.state2.absmax.numpy()
        their_bound = dq_bound(s2_theirs, absmax.size).reshape(n_out, -1).T  # bitsandbytes' order: [out, in/64]
        their_scales = F.dequantize_blockwise(state_dq.absmax, state_dq.state2).numpy() + float(state_dq.offset)
        their_scales = their_scales.reshape(n_out, -1).T
        assert np.all(np.abs(their_scales - absmax) <= their_bound * (1 + 1e-5))
        weight_bound = np.abs(quant.NF4_CODE_BOOK[codes]) * np.repeat((bound + their_bound).T, 64, 1)[:, :n_in]
        assert np.all(np.abs(ours - theirs) <= weight_bound * (1 + 1e-5) + 1e-9)
        gap, gap_bound = np.abs(our_scales - their_scales).max(), (bound + their_bound).max()
        print(f"\n{shape}: max |scale ours - bitsandbytes| {gap:.2e} (bound {gap_bound:.2e})")
    if n_in % 64:  # bitsandbytes on the unpadded weight: blocks straddle rows, a different quantisation
        _, unpadded = bnb_quantize(w, nested=False)
        assert unpadded.absmax.numel() == -(-n_out * n_in // 64) != absmax.size


def test_kernel_comparison_catches_a_wrong_block_or_code_book():
    """The checks above fail for a quantiser that blocks 128 weights, or looks codes up in another
    normal-quantile code book (offset 0.99 instead of QLoRA's 0.9677)."""
    w = (0.02 * np.random.default_rng(1).standard_normal((96, 128))).astype(np.float32)
    packed, state = bnb_quantize(w, nested=False)
    theirs = bnb_dequantize(packed, state)
    wrong_block = _jq(jnp.asarray(w.T), "nf4", block=128)
    assert np.mean(our_codes_oi(wrong_block) != packed) > 0.05
    q = _jq(jnp.asarray(w.T), "nf4")
    codes = nibbles(our_codes_oi(q))
    scales = np.repeat(np.asarray(quant.dequantize_scales(q)).T, 64, 1)
    bound = np.stack([dq_bound(s2, 96) for s2 in np.asarray(q.scales_scale)])  # our double quantisation's
    weight_bound = np.abs(quant.NF4_CODE_BOOK[codes]) * np.repeat(bound.T, 64, 1) * (1 + 1e-5) + 1e-9
    assert np.all(np.abs(quant.NF4_CODE_BOOK[codes] * scales - theirs) <= weight_bound)
    wrong_book = quant.nf4_code_book_derived(offset=0.99)[codes] * scales
    assert np.mean(np.abs(wrong_book - theirs) > weight_bound) > 0.05


# ----------------------------------------------------------------------------- models
# Every projection with in = 64 (hidden, intermediate and heads * head_dim): one NF4 block per output
# row, so bitsandbytes' blocks and double-quantisation groups are ours. Qwen3 and Gemma 3 get
# head_dim 16 for that (their usual tiny models test head_dim != hidden / heads elsewhere).
WIDTH = dict(hidden_size=64, intermediate_size=64)
FAMILY_WIDTH = {
    "llama": WIDTH,
    "qwen2": WIDTH,
    "qwen3": dict(WIDTH, head_dim=16),
    "mistral": WIDTH,
    "gemma3_text": dict(WIDTH, head_dim=16),
    "gpt2": dict(n_embd=64, n_inner=64),
}

# As QLoRA quantises: NF4, double quantisation, fp32 compute; every nn.Linear (and GPT-2's Conv1D)
# but the LM head, which is what lora_jax quantises (the projections; embeddings, norms, head stay).
BNB_NF4 = dict(
    load_in_4bit=True,
    bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True,
    llm_int8_skip_modules=["lm_head"],
)

# A scale code that bitsandbytes rounds the other way moves one block's 64 weights by one step of the
# dynamic map (<= 1.4% of the block's second-level scale, about 1% of the scale); NF4 moves every
# weight by 9% rms. With at most 1% of the scales flipped the logits' difference from ours must be a
# small part of NF4's own effect: 1% of it (measured: at most 0.1%); with none flipped, fp32 parity.
FLIPPED_REL = 0.01
# bitsandbytes' bf16 CPU kernel rounds activations, scales and outputs to bf16 (relative step 2^-8)
BF16_REL = 8 * 2.0**-8


@functools.cache
def _forward(cfg):
    model = lj.build_model(cfg)
    return jax.jit(lambda p, x: lj.apply(model, p, {}, None, x))


def our_logits(cfg, params, ids) -> np.ndarray:
    return np.asarray(_forward(cfg)(params, jnp.asarray(ids)))


def make_family(out_dir, family: str) -> str:
    if family == "llama":
        return make_hf_tiny(out_dir, "llama", **FAMILY_WIDTH[family])
    return make_hf_family(out_dir, family, with_tokenizer=False, **FAMILY_WIDTH[family])


def bnb_model(model_dir, generic: bool):
    """transformers' model of `model_dir` quantised by bitsandbytes (BNB_NF4), fp32 compute;
    generic=True turns off the AVX512-BF16 kernel (fp32 throughout)."""
    config = transformers.BitsAndBytesConfig(**BNB_NF4, bnb_4bit_compute_dtype=torch.float32)
    model = hf_model(model_dir, quantization_config=config, device_map="cpu", dtype=torch.float32)
    if generic:
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
    return model


def check_quantized_weights(model, cfg, qparams, fparams) -> tuple[int, int, int]:
    """Every module bitsandbytes quantised is one we quantised, and the reverse; code bytes equal,
    scale codes per `check_scale_codes`. Returns (quantised modules, scales, flipped scale codes)."""
    entries = {e.hf_key: e for e in hf_entries(cfg)}
    layout = layout_of(cfg)
    ours = {p for p, v in traverse_util.flatten_dict(qparams).items() if quant.is_quantized(v)}
    seen, n_modules, n_scales, flips = set(), 0, 0, 0
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        e = entries[name + ".weight"]
        path = flax_path(e, True, layout)
        q, k = get_path(qparams, path)[e.layer], np.asarray(get_path(fparams, path)[e.layer])
        state = module.weight.quant_state
        assert tuple(state.shape) == (k.shape[1], k.shape[0])  # [out, in], GPT-2's Conv1D transposed too
        assert np.array_equal(our_codes_oi(q), module.weight.data.numpy().reshape(k.shape[1], -1)), name
        flips += check_scale_codes(q, state, block_absmax(k))
        seen.add(path)
        n_modules, n_scales = n_modules + 1, n_scales + q.scales_q.size
    assert seen == ours, (seen, ours)
    assert n_modules == sum(get_path(qparams, p).shape[0] for p in ours)  # each layer's
    return n_modules, n_scales, flips


@pytest.mark.parametrize("family", list(FAMILY_WIDTH))
def test_nf4_model_matches_bitsandbytes(family, tmp_path):
    model_dir = make_family(tmp_path / family, family)
    cfg, qparams = lj.load_pretrained(model_dir, quantize="nf4")
    _, fparams = lj.load_pretrained(model_dir)
    ids = random_ids(cfg.vocab_size, (2, 13))
    ours, full = our_logits(cfg, qparams, ids), our_logits(cfg, fparams, ids)
    nf4_effect = max_diff(ours, full)

    generic = bnb_model(model_dir, generic=True)
    n_modules, n_scales, flips = check_quantized_weights(generic, cfg, qparams, fparams)
    assert flips <= 0.01 * n_scales, (flips, n_scales)
    theirs = torch_logits_of(generic, ids)
    bound = FP32_ATOL if flips == 0 else FLIPPED_REL * nf4_effect
    diff = max_diff(ours, theirs)
    print(
        f"\n[{family}] {n_modules} NF4 modules; {flips} of {n_scales} scale codes rounded the other way by "
        f"bitsandbytes; "
        f"logits vs bitsandbytes (fp32) {diff:.2e} (bound {bound:.1e}), NF4 vs fp32 {nf4_effect:.2e}"
    )
    assert diff <= bound
    assert nf4_effect > 10 * bound  # the bound tells quantisation from none

    if family == "llama":  # a quantiser blocking 32 weights fails the bound
        wrong = our_logits(cfg, quant.quantize_params(fparams, "nf4", block=32), ids)
        assert max_diff(wrong, theirs) > 5 * bound

    if F.has_avx512bf16():  # bitsandbytes as it runs by default here: its bf16 kernel
        shipped = torch_logits_of(bnb_model(model_dir, generic=False), ids)
        bf16_bound = BF16_REL * float(np.abs(theirs).max())
        print(
            f"[{family}] logits vs bitsandbytes' bf16 CPU kernel {max_diff(ours, shipped):.2e} (bound {bf16_bound:.1e})"
        )
        assert max_diff(ours, shipped) <= bf16_bound
