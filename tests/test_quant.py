"""QLoRA: the NF4 code book, quantisation against a numpy reference, double quantisation, a quantised
model against the full-precision one and against its own dequantised weights, adapters against the
merged model, the training step (adapters only; no full-size kernel of all layers in the program),
merged export into transformers, sharded loading, the fingerprint, and the CLI / train / export path.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import lora_jax as lj
from lora_jax import quant
from lora_jax.checkpoint import base_fingerprint, fingerprints_match
from lora_jax.config import ModelConfig, OptimConfig
from lora_jax.demo import DEMO_MODEL
from lora_jax.errors import ConfigError
from lora_jax.hf.names import PROJECTIONS, projection_parent
from lora_jax.sharding import DEFAULT_RULES, logical_axes, spec_for
from lora_jax.train.step import init_state, make_schedule, make_train_step, make_tx
from tests.helpers import FP32_ATOL, jaxprs, max_diff, random_ids, tiny_ids, torch_logits, unpacked_batch

# NF4 as published: Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs" (NeurIPS 2023,
# arXiv:2305.14314), Appendix E "NormalFloat 4-bit data type"; the same 16 float32 values are
# bitsandbytes' `functional.get_4bit_type("nf4")`.
PUBLISHED_NF4 = np.array(
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


# ----------------------------------------------------------------------------- numpy reference
def np_quantize_dequantize(w, kind, block=64, dq_block=256):
    """The recipe written out plainly for one `[in, out]` kernel: blockwise absmax along `in`, the
    nearest code (argmin of the distance), scales minus their mean quantised to the nearest
    dynamic-map value in blocks of `dq_block` along `out`. Returns a dict: codes [in, out], x (the
    normalised weights), w_hat, absmax, scale_codes and xn (normalised centred scales) [in/64, out],
    scales_hat."""
    w = np.asarray(w, np.float32)
    n_in, n_out = w.shape
    pad = -n_in % block
    wp = np.concatenate([w, np.zeros((pad, n_out), np.float32)])
    blocks = wp.reshape(-1, block, n_out)
    absmax = np.abs(blocks).max(axis=1)
    x = (blocks / np.where(absmax == 0, np.float32(1), absmax)[:, None, :]).astype(np.float32)
    if kind == "nf4":
        codes = np.argmin(np.abs(x[..., None] - PUBLISHED_NF4), axis=-1)
        values = PUBLISHED_NF4[codes]
    else:
        codes = np.clip(np.rint(x * 127), -127, 127)
        values = (codes / np.float32(127)).astype(np.float32)
    dmap = quant.dynamic_map()
    offset = np.float32(absmax.astype(np.float64).mean())
    c = absmax - offset
    nb = c.shape[0]
    pad2 = -n_out % dq_block
    cb = np.concatenate([c, np.zeros((nb, pad2), np.float32)], axis=1).reshape(nb, -1, dq_block)
    s2 = np.abs(cb).max(axis=-1, keepdims=True)
    xn = cb / np.where(s2 == 0, np.float32(1), s2)
    code2 = np.argmin(np.abs(xn[..., None] - dmap), axis=-1)
    scales_hat = (dmap[code2] * s2).reshape(nb, -1)[:, :n_out] + offset
    w_hat = (values * scales_hat[:, None, :]).reshape(-1, n_out)[:n_in]
    return {
        "codes": codes.reshape(-1, n_out)[:n_in],
        "x": x.reshape(-1, n_out)[:n_in],
        "w_hat": w_hat,
        "absmax": absmax,
        "scale_codes": code2.reshape(nb, -1)[:, :n_out],
        "xn": xn.reshape(nb, -1)[:, :n_out],
        "scales_hat": scales_hat,
    }


def unpacked_codes(q):
    """Code indices [.., in, out] of a QuantizedKernel (nf4: unpacked nibbles; int8: the int8 codes)."""
    c = np.asarray(q.codes)
    if q.kind == "nf4":
        c = np.stack([c >> 4, c & 0xF], axis=-2).reshape(c.shape[:-2] + (2 * c.shape[-2], c.shape[-1]))
    return c[..., : q.spec.in_features, :].astype(np.int64)


def np_dequantized_params(params, kind):
    """Full-precision params with each projection kernel replaced by its numpy quantise-dequantise."""
    flat = traverse_util.flatten_dict(params)
    out = {}
    for path, w in flat.items():
        if quant.is_projection_kernel(path):
            w = np.asarray(w)
            stack = w.reshape((-1,) + w.shape[-2:])
            out[path] = jnp.asarray(
                np.stack([np_quantize_dequantize(s, kind)["w_hat"] for s in stack]).reshape(w.shape)
            )
        else:
            out[path] = w
    return traverse_util.unflatten_dict(out)


_jq = jax.jit(quant.quantize, static_argnames="kind")


def dequantized(params):
    """Plain fp32 params: every quantised kernel dequantised (on device, by the module)."""
    return jax.tree.map(
        lambda v: v.astype(jnp.float32) if quant.is_quantized(v) else v, params, is_leaf=quant.is_quantized
    )


def _near_tie(x, table, tol=1e-6):
    mids = (table[:-1] + table[1:]) / 2
    return np.min(np.abs(x[..., None] - mids), axis=-1) < tol


# ----------------------------------------------------------------------------- code book and math
def test_nf4_code_book_is_the_published_table():
    assert np.array_equal(quant.NF4_CODE_BOOK, PUBLISHED_NF4)
    derived = quant.nf4_code_book_derived()  # from normal quantiles, as bitsandbytes builds it
    np.testing.assert_allclose(derived, PUBLISHED_NF4, rtol=0, atol=1e-7)
    t = PUBLISHED_NF4
    assert t.shape == (16,) and np.all(np.diff(t) > 0)
    assert t[0] == -1.0 and t[-1] == 1.0 and t[7] == 0.0  # exact -1, 0, 1
    assert np.sum(t > 0) == 8 and np.sum(t < 0) == 7  # asymmetric: one more positive value
    assert abs(float(np.mean(t))) < 0.05  # roughly symmetric (mean 0.023)
    dmap = quant.dynamic_map()
    assert dmap.shape == (256,) and np.all(np.diff(dmap) > 0) and 0.0 in dmap and dmap[-1] == 1.0


def _compare_to_reference(q, w, kind):
    """Module vs numpy reference on a stack of kernels: code indices and scale codes equal except at
    near-ties (the module compares with code midpoints, the reference takes the argmin; and the mean
    offset differs by an ulp between reductions), dequantised weights equal to 1e-6 elsewhere.
    Returns (mismatched weight codes, mismatched scale codes, reference dequantisation)."""
    ours = np.asarray(quant.dequantize(q))
    codes = unpacked_codes(q)
    scale_codes = np.asarray(q.scales_q).astype(np.int64)
    n_w = n_s = 0
    refs = []
    for i in range(w.shape[0]):
        ref = np_quantize_dequantize(w[i], kind)
        refs.append(ref["w_hat"])
        differ = codes[i] != ref["codes"]
        if differ.any():
            assert kind == "nf4" and np.all(_near_tie(ref["x"][differ], PUBLISHED_NF4))
        s_differ = scale_codes[i] != ref["scale_codes"]
        if s_differ.any():
            assert np.all(_near_tie(ref["xn"][s_differ], quant.dynamic_map(), tol=1e-5))
        n_w, n_s = n_w + int(differ.sum()), n_s + int(s_differ.sum())
        same = ~differ & ~np.repeat(s_differ, 64, axis=0)[: w.shape[1]]
        np.testing.assert_allclose(ours[i][same], ref["w_hat"][same], rtol=0, atol=1e-6)
    return n_w, n_s, np.stack(refs)


@pytest.mark.parametrize("kind,mae_range", [("nf4", (0.065, 0.080)), ("int8", (0.0045, 0.0060))])
def test_quantize_matches_numpy_reference(kind, mae_range):
    # 3 stacked layers; in=200 is not a multiple of 64 (zero-padded), out=320 not of 256 (padded DQ block)
    w = np.random.default_rng(0).standard_normal((3, 200, 320)).astype(np.float32)
    q = _jq(w, kind)
    assert q.shape == w.shape and q.dtype == np.float32
    padded = 256 if kind == "int8" else 128
    assert q.codes.shape == (3, padded, 320) and q.codes.dtype == (np.uint8 if kind == "nf4" else np.int8)
    assert q.scales_q.shape == (3, 4, 320) and q.scales_q.dtype == np.uint8
    assert q.scales_scale.shape == (3, 4, 2) and q.scales_offset.shape == (3,)
    n_w, n_s, ref = _compare_to_reference(q, w, kind)
    assert n_w <= 2 and n_s <= 2, (n_w, n_s)  # of 192000 weights and 3840 scales
    ours = np.asarray(quant.dequantize(q))
    mae, ref_mae = float(np.mean(np.abs(ours - w))), float(np.mean(np.abs(ref - w)))
    print(
        f"\n{kind}: mean |w - deq(q(w))| on N(0,1) = {mae:.5f} (numpy reference {ref_mae:.5f}); rms "
        f"relative error {np.sqrt(np.mean((ours - w) ** 2) / np.mean(w**2)):.4f}; near-tie code "
        f"differences: {n_w} weights, {n_s} scales"
    )
    assert mae_range[0] < mae < mae_range[1]
    assert abs(mae - ref_mae) < 1e-6


def test_double_quantisation_round_trip():
    w = np.random.default_rng(1).standard_normal((512, 1024)).astype(np.float32)
    q = _jq(w, "nf4")
    true = np.abs(w.reshape(8, 64, 1024)).max(axis=1)
    back = np.asarray(quant.dequantize_scales(q))
    rel = np.abs(back - true) / true
    ref = np_quantize_dequantize(w, "nf4")
    print(
        f"\ndouble quantisation of absmax scales: max rel err {rel.max():.4f}, mean {rel.mean():.5f}; "
        f"storage {q.nbytes / w.size * 8:.3f} bits per weight"
    )
    assert rel.max() < 0.01 and rel.mean() < 0.002
    same = np.asarray(q.scales_q) == ref["scale_codes"]
    assert np.sum(~same) <= 2 and np.all(_near_tie(ref["xn"][~same], quant.dynamic_map(), tol=1e-5))
    np.testing.assert_allclose(back[same], ref["scales_hat"][same], rtol=1e-6, atol=0)
    assert q.nbytes * 8 / w.size < 4.2  # 4 bits + 8/64 + 32/(64*256) + the offset
    # equal scales are exact (centred to 0); a zero kernel stays zero
    const = np.tile(np.array([[1.0], [-1.0]], np.float32), (32, 8))
    assert np.array_equal(np.asarray(quant.dequantize(quant.quantize(const, "nf4"))), const)
    assert not np.any(np.asarray(quant.dequantize(quant.quantize(np.zeros((64, 8), np.float32), "int8"))))


def test_quantize_rejects_bad_input():
    with pytest.raises(ConfigError, match="nf4"):
        quant.quantize(np.ones((64, 4), np.float32), "fp4")
    with pytest.raises(ConfigError, match=r"\[64\]"):
        quant.quantize(np.ones((64,), np.float32))
    with pytest.raises(ConfigError, match="model.quantize"):
        ModelConfig(quantize="nf8")
    with pytest.raises(ConfigError, match="quantize"):
        lj.load_pretrained(DEMO_MODEL, quantize="q4")


# ----------------------------------------------------------------------------- the model
@pytest.fixture(scope="module")
def models(tiny_llama, bases):
    """{(kind, scan): (cfg, quantised params)} plus the fp32 params, of the tiny random HF Llama
    (hidden 32: kernels with in=32 < block 64 exercise the padding)."""
    out = {"fp32": bases}
    for kind, scan in (("nf4", True), ("nf4", False), ("int8", True)):
        out[kind, scan] = lj.load_pretrained(tiny_llama, scan_layers=scan, quantize=kind)
    return out


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b - b.mean(-1, keepdims=True)))


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "noscan"])
def test_quantized_logits(models, scan):
    cfg, params = models["fp32"][scan]
    model = lj.Llama(cfg)
    base = model.apply({"params": params}, tiny_ids())
    rel = {}
    for kind in ("nf4", "int8") if scan else ("nf4",):
        qcfg, qparams = models[kind, scan]
        assert qcfg == cfg
        ours = lj.apply(model, qparams, {}, None, tiny_ids())
        # the same weights quantised and dequantised in numpy: equal up to fp32 rounding
        ref = model.apply({"params": np_dequantized_params(params, kind)}, tiny_ids())
        assert max_diff(ours, ref) <= 1e-5, (kind, max_diff(ours, ref))
        rel[kind] = _rel(ours, base)
    # Against the fp32 model: NF4's rms weight error is 0.092 of the weight rms on normal weights
    # (int8: 0.0063, measured in test_quantize_matches_numpy_reference); output errors of the 14
    # perturbed projections add up roughly in quadrature through the residual stream, so the logits'
    # relative error should be of the order of the weight error (bound: 3x) and scale with it.
    print(f"\nrelative logit error vs fp32 ({'scan' if scan else 'noscan'}): {rel}")
    assert 0.01 < rel["nf4"] < 3 * 0.092
    if scan:
        assert rel["int8"] < 3 * 0.0063
        assert 0.5 * 0.0063 / 0.092 < rel["int8"] / rel["nf4"] < 2 * 0.0063 / 0.092


def test_quantized_leaves_and_fingerprint(models, tiny_llama):
    _, qparams = models["nf4", True]
    cfg, _ = models["fp32"][True]
    io = {
        "q_proj": (32, 32),
        "k_proj": (32, 16),
        "v_proj": (32, 16),
        "o_proj": (32, 32),
        "gate_proj": (32, 64),
        "up_proj": (32, 64),
        "down_proj": (64, 32),
    }
    for name, (n_in, n_out) in io.items():
        k = qparams["layers"][projection_parent(name)][name]["kernel"]
        assert isinstance(k, lj.QuantizedKernel) and k.shape == (2, n_in, n_out)
        pad_in = -(-n_in // 64) * 64
        assert k.codes.shape == (2, pad_in // 2, n_out) and k.codes.dtype == np.uint8
        assert k.scales_q.shape == (2, pad_in // 64, n_out) and k.scales_scale.shape == (2, pad_in // 64, 1)
        assert k.scales_offset.shape == (2,)
    # embeddings, norms and the LM head stay in the model's dtype
    for path, leaf in traverse_util.flatten_dict(qparams).items():
        assert quant.is_quantized(leaf) == quant.is_projection_kernel(path)
        if not quant.is_quantized(leaf):
            assert leaf.dtype == np.float32
    # the fingerprint reduces the codes and scales; stable across loads, distinct from the fp32 base
    fp = base_fingerprint(qparams)
    assert fingerprints_match(fp, base_fingerprint(lj.load_pretrained(tiny_llama, quantize="nf4")[1]))
    assert not fingerprints_match(fp, base_fingerprint(models["fp32"][True][1]))
    assert "['kernel'].codes" in "".join(
        jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(qparams)[0]
    )


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("scan", [True, False], ids=["scan", "noscan"])
def test_intercepted_equals_dequantized_merged(models, scan, dora):
    cfg, qparams = models["nf4", scan]
    lcfg = lj.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=("q_proj", "v_proj", "up_proj", "down_proj"),
        use_dora=dora,
        init_lora_weights=False,
    )
    lora = lj.init_lora(qparams, lcfg, jax.random.key(1))
    if dora:
        lora = jax.tree_util.tree_map_with_path(lambda p, v: v * 1.3 if p[-1].key == "m" else v, lora)
    model = lj.Llama(cfg)
    ours = lj.apply(model, qparams, lora, lcfg, tiny_ids())
    merged = jax.jit(lj.merge, static_argnums=2)(qparams, lora, lcfg)  # adapted kernels: dequantised
    # in fp32, adapters folded in
    flat = traverse_util.flatten_dict(merged)
    assert not any(quant.is_quantized(v) for p, v in flat.items() if "up_proj" in p)
    assert all(quant.is_quantized(v) for p, v in flat.items() if "gate_proj" in p)  # untargeted: as is
    ref = model.apply({"params": dequantized(merged)}, tiny_ids())
    assert max_diff(ours, lj.apply(model, qparams, {}, None, tiny_ids())) > 1e-3  # the adapters act
    assert max_diff(ours, ref) <= 1e-5


def _batch(b=3, t=10, seed=0):
    ids = np.random.default_rng(seed).integers(3, 97, (b, t)).astype(np.int32)
    return unpacked_batch(ids, np.roll(ids, -1, 1), np.ones((b, t), np.float32))


def _step_setup(cfg, params, remat="none"):
    cfg = cfg.replace(remat_policy=remat)
    lcfg = lj.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    lora = lj.init_lora(params, lcfg, jax.random.key(0))
    split = lj.split_trainable(params, lora, lcfg)
    ocfg = OptimConfig(lr=1e-2)
    sched = make_schedule(ocfg, 10)
    tx = make_tx(lcfg, ocfg, sched)
    step = make_train_step(lj.Llama(cfg), cfg, lcfg, tx, sched, use_segments=False)
    return init_state(split.trainable, tx, 0), split.frozen, step


def _float_shapes(jaxpr, found):
    """Every shape of a float variable anywhere in a jaxpr, sub-jaxprs included."""
    for j in jaxprs(jaxpr):
        for v in list(j.invars) + list(j.constvars) + [o for e in j.eqns for o in e.outvars]:
            aval = getattr(v, "aval", None)
            if aval is not None and hasattr(aval, "shape") and jnp.issubdtype(aval.dtype, jnp.floating):
                found.add(tuple(aval.shape))
    return found


STACKED = {(2,) + io for io in [(32, 32), (32, 16), (32, 64), (64, 32)]}  # [layers, in, out] kernels


@pytest.mark.parametrize("remat", ["none", "full"])
def test_step_program_holds_no_stacked_float_kernel(models, remat):
    """No float [layers, in, out] kernel anywhere in the step's program (forward, backward and the
    scan's saved residuals): each layer's kernel is dequantised inside the scan body, and again in
    the backward pass rather than saved per layer (which the scan would stack over layers)."""
    cfg, qparams = models["nf4", True]
    state, frozen, step = _step_setup(cfg, qparams, remat)
    shapes = _float_shapes(jax.make_jaxpr(step)(state, frozen, _batch()), set())
    assert not shapes & STACKED, shapes & STACKED
    assert {(32, 32), (32, 16), (32, 64), (64, 32)} <= shapes  # one layer's kernel, inside the scan
    # control: the unquantised program does hold them (its frozen inputs)
    _, fparams = models["fp32"][True]
    fstate, ffrozen, fstep = _step_setup(cfg, fparams, remat)
    assert _float_shapes(jax.make_jaxpr(fstep)(fstate, ffrozen, _batch()), set()) & STACKED


def test_train_step_quantized(models):
    cfg, qparams = models["nf4", True]
    state, frozen, step = _step_setup(cfg, qparams, "full")
    # the trainable tree holds adapters only; the codes stay in the frozen tree
    assert not traverse_util.flatten_dict(state.trainable["params"])
    assert all(p[-1] in ("a", "b") for p in traverse_util.flatten_dict(state.trainable["lora"]))
    before = jax.tree.map(np.asarray, state.trainable)
    frozen_before = jax.tree.map(np.asarray, frozen)
    losses = []
    for i in range(3):
        state, m = step(state, frozen, _batch(seed=i % 2))
        losses.append(float(m["loss"]))
        assert np.isfinite(losses[-1]) and float(m["grad_norm"]) > 0
    assert losses[2] < losses[0]  # the same batch again: lower loss
    after = jax.tree.map(np.asarray, state.trainable)
    assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
    assert all(
        np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen))
    )
    # the same step on the dequantised weights (plain kernels) gives the same loss and adapters
    dstate, dfrozen, dstep = _step_setup(cfg, dequantized(qparams), "full")
    dstate, dm = dstep(dstate, dfrozen, _batch(seed=0))
    qstate, qm = step(_step_setup(cfg, qparams, "full")[0], frozen, _batch(seed=0))
    assert abs(float(dm["loss"]) - float(qm["loss"])) < 1e-5
    for a, b in zip(jax.tree.leaves(dstate.trainable), jax.tree.leaves(qstate.trainable)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_merged_export_from_quantized_base_loads_in_transformers(models, tmp_path):
    cfg, qparams = models["nf4", True]
    lcfg = lj.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    lora = lj.init_lora(qparams, lcfg, jax.random.key(2))
    ids = random_ids(97, (2, 11))
    ours = lj.apply(lj.Llama(cfg), qparams, lora, lcfg, jnp.asarray(ids))
    out = lj.save_pretrained(str(tmp_path / "merged"), qparams, cfg, lora=lora, lcfg=lcfg)
    assert max_diff(torch_logits(out, ids), ours) <= FP32_ATOL
    base_dir = lj.save_pretrained(str(tmp_path / "base"), qparams, cfg)  # the dequantised base alone
    assert (
        max_diff(torch_logits(base_dir, ids), lj.apply(lj.Llama(cfg), qparams, {}, None, jnp.asarray(ids))) <= FP32_ATOL
    )
    with open(os.path.join(out, "config.json")) as f:
        assert "quantization_config" not in json.load(f)  # a plain model: nothing quantised is written


def test_load_on_mesh_shards_quantized_leaves():
    mesh = lj.make_mesh(1, 8, 1)
    _, sharded = lj.load_pretrained(DEMO_MODEL, quantize="nf4", mesh=mesh)
    _, plain = lj.load_pretrained(DEMO_MODEL, quantize="nf4")
    for name in PROJECTIONS:
        path = ("layers", projection_parent(name), name, "kernel")
        k, ref = sharded["layers"][path[1]][name]["kernel"], plain["layers"][path[1]][name]["kernel"]
        assert np.array_equal(np.asarray(k.codes), np.asarray(ref.codes))
        for a, b in zip(k.arrays()[1:], ref.arrays()[1:]):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)  # sharded mean: ulps
        for a in k.arrays():  # each array at the kernel's logical axes
            assert a.sharding.spec == spec_for(logical_axes(path, a.ndim), a.shape, mesh, DEFAULT_RULES)
        axes = logical_axes(path, 3)
        if DEFAULT_RULES[axes[1]] == "fsdp":  # `in` on fsdp: each device holds 1/8 of the codes
            assert k.codes.addressable_shards[0].data.shape[1] == k.codes.shape[1] // 8
        if DEFAULT_RULES[axes[2]] == "fsdp":
            assert k.codes.addressable_shards[0].data.shape[2] == k.codes.shape[2] // 8
    # the step's shardings (tree_shardings, from paths) agree with where the loader put them
    from lora_jax.sharding import tree_shardings

    sh = tree_shardings(sharded, mesh)
    for s, leaf in zip(jax.tree.leaves(sh), jax.tree.leaves(sharded)):
        assert s.spec == leaf.sharding.spec
    assert any(s.spec != jax.sharding.PartitionSpec(*([None] * len(s.spec))) for s in jax.tree.leaves(sh["layers"]))


def test_quantize_params_and_custom_place_equal_load(models, tiny_llama):
    cfg, fparams = models["fp32"][True]
    _, loaded = models["nf4", True]
    placed = []
    host = lj.load_pretrained(
        tiny_llama, quantize="nf4", place=lambda path, a: placed.append(path) or jax.device_put(a)
    )[1]
    assert ("layers", "mlp", "up_proj", "kernel") in placed  # each quantised array, at its kernel's path
    for tree in (lj.quantize_params(fparams, "nf4"), host):
        assert jax.tree.structure(tree) == jax.tree.structure(loaded)
        for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(loaded)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_unmerge_keeps_the_base_quantized(models):
    """PiSSA on a QLoRA base: the residual W - s*B*A is requantised with the kernel's settings."""
    _, qparams = models["nf4", True]
    lcfg = lj.LoraConfig(r=2, lora_alpha=4, target_modules=("q_proj",), init_lora_weights="pissa")
    lora = lj.init_lora(qparams, lcfg, jax.random.key(0))
    res = lj.unmerge(qparams, lora, lcfg)
    k, k0 = res["layers"]["self_attn"]["q_proj"]["kernel"], qparams["layers"]["self_attn"]["q_proj"]["kernel"]
    assert quant.is_quantized(k) and k.spec == k0.spec and k.codes.shape == k0.codes.shape
    assert res["layers"]["mlp"]["up_proj"]["kernel"] is qparams["layers"]["mlp"]["up_proj"]["kernel"]
    # a quantised kernel cannot be trained as a module to save
    with pytest.raises(ConfigError, match="quantised"):
        lj.split_trainable(qparams, lora, lcfg.replace(init_lora_weights=True, modules_to_save=("up_proj",)))


def test_cli_train_and_export_with_quantized_base(tmp_path):
    from lora_jax.cli import _run_config, build_parser, main
    from lora_jax.export import export_checkpoint

    args = build_parser().parse_args(["train", "--quantize", "nf4"])
    assert _run_config(args).model.quantize == "nf4"
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "--output-dir",
            str(out),
            "--quantize",
            "nf4",
            "--set",
            "train.steps=3",
            "--set",
            "train.save_every=3",
            "--set",
            "train.batch_size=8",
            "--set",
            "train.eval_generate=0",
            "--set",
            "train.eval_batches=1",
            "--no-progress",
        ]
    )
    assert rc == 0
    with open(out / "summary.json") as f:
        summary = json.load(f)
    assert np.isfinite(summary["train_loss_last"]) and summary["adapter_dir"]
    with open(out / "run.json") as f:
        assert json.load(f)["run"]["model"]["quantize"] == "nf4"
    # export re-loads the base quantised (the fingerprint must match) and merges from it
    written = export_checkpoint(str(out), merged_dir=str(tmp_path / "merged"), peft_dir=str(tmp_path / "peft"))
    from lora_jax.session import load_run

    cfg, params, lora, lcfg, *_ = load_run(str(out))
    assert quant.is_quantized(params["layers"]["mlp"]["up_proj"]["kernel"])
    ids = random_ids(100, (2, 9))
    ours = lj.apply(lj.Llama(cfg), params, lora, lcfg, jnp.asarray(ids))
    assert max_diff(torch_logits(written["merged"], ids), ours) <= FP32_ATOL
