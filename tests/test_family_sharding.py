"""Sharding for every family as for Llama (GPT-2, Qwen2, Qwen3, Mistral, Gemma 3), on 8 CPU devices:

- the rules, under a tensor-parallel mesh (data 2 x tensor 4) and an FSDP mesh (data 2 x fsdp 4):
  every leaf (frozen base, LoRA a/b, DoRA magnitude, a `modules_to_save` norm) gets named logical
  axes (a scanned stack is `layers`, GPT-2's `h` too), and every projection kernel is split where
  Llama's is: its non-`embed` axis over `tensor` under TP, its `embed` axis over `fsdp` under FSDP;
  adapters, biases and magnitudes follow their kernel's axes;
- the numbers, on a mesh splitting both ways at once (fsdp 2 x tensor 4): the loader puts each
  leaf at its rule's sharding, and a sharded LoRA forward and one train step (loss and every
  trainable gradient) equal the unsharded ones in fp32. GPT-2's fused c_attn `[embed, 3 * embed]`
  is split along its output in 4 contiguous blocks that straddle the q|k|v boundaries; GSPMD
  reshards at the split into q, k, v, and the results show it does so right;
- quantised bases: an FP8 kernel's transposed codes `[L, out, in]` and its per-channel scales
  `[L, out]` split the same weight dimensions as the kernel they replace (NF4's arrays, which keep
  the kernel's layout, take its axes as they are), and an FP8 base loads onto the TP mesh so.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

import lora_jax as lj
from lora_jax import quant
from lora_jax.models.layout import layout_of
from lora_jax.sharding import DEFAULT_RULES, batch_sharding, logical_axes, place, tree_shardings
from lora_jax.train.step import init_state, make_train_step, shard_state
from tests.helpers import make_hf_family, random_ids, unpacked_batch

FAMILIES = ["gpt2", "qwen2", "qwen3", "mistral", "gemma3_text"]
MESHES = {"tp": (2, 1, 4), "fsdp": (2, 4, 1)}  # data x fsdp x tensor
# the forward and the train step run on one mesh that splits both ways at once (each compile costs
# seconds): every projection kernel on both its dimensions (embed over fsdp, the other over
# tensor), adapters and gradients along with them, the batch over fsdp
BOTH = (1, 2, 4)
BATCH, SEQ = 8, 12  # the batch splits over data x fsdp
# fp32, only the order of the reductions differs between shards: a few ulps
RTOL = 1e-5
# tiny programs, compiled many times: LLVM's optimisations cost more than they save here (about
# 2.5x faster compiles); the sharded and the unsharded programs are compiled alike
FAST_COMPILE = {"compiler_options": {"xla_backend_optimization_level": 0}}


def _lcfg(layout):
    """LoRA on every projection with DoRA magnitudes, a non-zero B (gradients reach A), and the
    family's first per-layer norm trained in full."""
    return lj.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules="all-linear",
        use_dora=True,
        init_lora_weights=False,
        modules_to_save=(layout.layer_norms[0],),
    )


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(model dir, config, unsharded params, LoraConfig, adapters) of the family's tiny random model."""
    model_dir = make_hf_family(tmp_path_factory.mktemp(request.param) / "model", request.param, with_tokenizer=False)
    cfg, params = lj.load_pretrained(model_dir)
    lcfg = _lcfg(layout_of(cfg))
    return model_dir, cfg, params, lcfg, lj.init_lora(params, lcfg, jax.random.key(0))


def _flat(tree):
    return traverse_util.flatten_dict(tree)


def _padded(spec, ndim):
    """A PartitionSpec as a tuple of one entry per dimension."""
    return tuple(spec) + (None,) * (ndim - len(spec))


# ------------------------------------------------------------------------------------------ the rules
@pytest.mark.parametrize("mesh_name", MESHES)
def test_every_leaf_gets_the_llama_sharding(family, mesh_name):
    _, cfg, params, _, lora = family
    layout = layout_of(cfg)
    mesh = lj.make_mesh(*MESHES[mesh_name])
    tree = {"params": params, "lora": lora}
    leaves = _flat(tree)
    specs = {p: _padded(s.spec, leaves[p].ndim) for p, s in _flat(tree_shardings(tree, mesh)).items()}
    stack = layout.layers
    for path, leaf in leaves.items():
        axes = logical_axes(path, leaf.ndim)
        # every dimension is named: the layer stack is "layers" (GPT-2's `h` too), nothing falls to
        # the unnamed leading ("sweep") axes
        assert len(axes) == leaf.ndim and "sweep" not in axes, (path, axes)
        assert (axes[0] == "layers") == (stack in path), (path, axes)
        per_layer = axes[1:] if stack in path else axes
        if set(per_layer) <= {"norm"}:  # only norms, their biases and the per-layer LoRA scales replicate
            assert len(per_layer) <= 1 or path[-2] == "wpe", (path, leaf.shape)
            assert set(specs[path]) == {None}, (path, specs[path])

    tensor, fsdp = mesh.shape["tensor"], mesh.shape["fsdp"]
    for p in layout.projections:
        module = (stack, p.parent, p.module_name)
        kernel = leaves[("params", *module, "kernel")]
        assert logical_axes(("params", *module, "kernel"), 3) == ("layers", *p.axes)
        spec = specs[("params", *module, "kernel")]
        assert spec[0] is None  # the layer stack stays whole (nn.scan slices it)
        for dim, (name, size) in enumerate(zip(p.axes, kernel.shape[1:]), start=1):
            if name == "embed":  # FSDP: the model dimension over fsdp, as Llama's
                assert size % fsdp == 0 and spec[dim] == ("fsdp" if fsdp > 1 else None), (module, spec)
            else:  # TP: heads / kv_heads / qkv / mlp over tensor (column- or row-parallel), as Llama's
                assert size % tensor == 0 and spec[dim] == ("tensor" if tensor > 1 else None), (module, spec)
        # the adapter, bias and magnitude follow the kernel: a its input axis, b and m its output axis
        lo = ("lora", *module)
        assert specs[(*lo, "a")] == (None, spec[1], None)
        assert specs[(*lo, "b")] == (None, None, spec[2])
        assert specs[(*lo, "m")] == (None, spec[2])
        if ("params", *module, "bias") in specs:
            assert specs[("params", *module, "bias")] == (None, spec[2])
    embedding = ("params", layout.embed, "embedding")
    assert logical_axes(embedding, 2) == layout.embed_axes
    assert specs[embedding][1] == ("fsdp" if fsdp > 1 else None)  # [vocab, embed]; the vocab (857) is prime
    if ("params", layout.lm_head, "kernel") in specs:
        assert specs[("params", layout.lm_head, "kernel")][0] == ("fsdp" if fsdp > 1 else None)


# ------------------------------------------------------------------------------------------ the numbers
class _Grads(NamedTuple):
    grads: object


def _capture_grads() -> optax.GradientTransformation:
    """An "optimizer" that keeps the step's gradients as its state and updates nothing, so one step
    returns the loss and the gradient of every trainable leaf, placed by the same rules."""
    return optax.GradientTransformation(
        lambda params: _Grads(jax.tree.map(jnp.zeros_like, params)),
        lambda updates, state, params=None: (jax.tree.map(jnp.zeros_like, updates), _Grads(updates)),
    )


def _batch(vocab):
    ids = random_ids(vocab, (BATCH, SEQ), seed=5)
    mask = (np.random.default_rng(5).random((BATCH, SEQ)) > 0.2).astype(np.float32)
    return unpacked_batch(ids, np.roll(ids, -1, 1), mask)


def _run(model_dir, lcfg, lora, mesh, remat_policy="none"):
    """(logits, loss, gradients) of the family's tiny model with `lora` on `mesh`, loaded onto it."""
    cfg, params = lj.load_pretrained(model_dir, mesh=mesh, remat_policy=remat_policy)
    for path, spec in _flat(tree_shardings(params, mesh)).items():  # the loader put each leaf at its rule
        assert _flat(params)[path].sharding.spec == spec.spec, path
    model = lj.build_model(cfg)
    lora = place(jax.tree.map(jnp.copy, lora), mesh)  # a copy: the step donates what it trains
    batch = _batch(cfg.vocab_size)
    ids = jax.device_put(jnp.asarray(batch["input_ids"]), batch_sharding(mesh))
    logits = jax.jit(lambda p, lo, x: lj.apply(model, p, lo, lcfg, x), **FAST_COMPILE)(params, lora, ids)

    split = lj.split_trainable(params, lora, lcfg)
    tx = _capture_grads()
    state, frozen, sh = shard_state(init_state(split.trainable, tx, 0), split.frozen, mesh, DEFAULT_RULES)
    step = make_train_step(
        model,
        cfg,
        lcfg,
        tx,
        optax.constant_schedule(0.0),
        use_segments=False,
        jit_kwargs={**sh.step_jit_kwargs(), **FAST_COMPILE},
    )
    state, metrics = step(state, frozen, sh.put_batch(batch))
    grads = state.opt_state.grads
    for path, spec in _flat(tree_shardings(grads, mesh)).items():  # gradients at their adapters' shardings
        assert _flat(grads)[path].sharding.spec == spec.spec, path
    return np.asarray(logits), float(metrics["loss"]), jax.tree.map(np.asarray, grads)


def test_sharded_forward_and_step_equal_unsharded(family):
    model_dir, cfg, _, lcfg, lora = family
    ref_logits, ref_loss, ref_grads = _run(model_dir, lcfg, lora, lj.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    logits, loss, grads = _run(model_dir, lcfg, lora, lj.make_mesh(*BOTH))
    np.testing.assert_allclose(logits, ref_logits, rtol=RTOL, atol=RTOL * np.abs(ref_logits).max())
    np.testing.assert_allclose(loss, ref_loss, rtol=RTOL)
    flat, ref = _flat(grads), _flat(ref_grads)
    assert flat.keys() == ref.keys()
    names = {path[-1] for path in flat}
    assert {"a", "b", "m", "scale"} <= names  # LoRA, DoRA and the saved norm all have gradients
    for path, g in flat.items():
        r = ref[path]
        assert np.abs(r).max() > 0, path  # every trainable leaf gets a gradient
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=RTOL * np.abs(r).max(), err_msg="/".join(path))


@pytest.mark.parametrize("family", ["qwen3"], indirect=True)
def test_offloaded_layer_inputs_under_a_mesh(family):
    """remat_policy "offload" (each layer's input in host memory) under FSDP x tensor parallelism:
    the sharded step gives the unsharded, un-rematerialised step's loss and gradients."""
    model_dir, cfg, _, lcfg, lora = family
    _, ref_loss, ref_grads = _run(model_dir, lcfg, lora, lj.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    _, loss, grads = _run(model_dir, lcfg, lora, lj.make_mesh(*BOTH), remat_policy="offload")
    np.testing.assert_allclose(loss, ref_loss, rtol=RTOL)
    ref = _flat(ref_grads)
    for path, g in _flat(grads).items():
        np.testing.assert_allclose(g, ref[path], rtol=1e-4, atol=RTOL * np.abs(ref[path]).max(), err_msg="/".join(path))


# ------------------------------------------------------------------------------------------ quantised bases
@pytest.mark.parametrize("mesh_name", MESHES)
def test_quantized_arrays_shard_like_their_kernel(family, mesh_name):
    """An Fp8Kernel's codes `[L, out, in]` take the kernel's axes with the last two swapped, its
    scales `[L, out]` the output axis; an NF4 kernel's codes `[L, in/2, out]` take the kernel's."""
    _, cfg, params, _, _ = family
    layout = layout_of(cfg)
    mesh = lj.make_mesh(*MESHES[mesh_name])
    paths = {p.name: (layout.layers, p.parent, p.module_name, "kernel") for p in layout.projections}
    kernels = {name: _flat(params)[path] for name, path in paths.items()}
    kernel_sh = _flat(tree_shardings(traverse_util.unflatten_dict({paths[n]: k for n, k in kernels.items()}), mesh))
    for kind in ("fp8", "nf4"):
        quantize = functools.partial(quant.quantize, kind=kind)
        tree = {paths[n]: jax.eval_shape(quantize, k) for n, k in kernels.items()}
        shardings = _flat(tree_shardings(traverse_util.unflatten_dict(tree), mesh))
        for name, path in paths.items():
            k = _padded(kernel_sh[path].spec, 3)
            q = shardings[path]
            assert any(k), (name, k)  # the kernel itself is split on both meshes
            if kind == "fp8":
                assert _padded(q.codes.spec, 3) == (k[0], k[2], k[1]), (name, q.codes.spec, k)
                assert _padded(q.scale.spec, 2) == (k[0], k[2]), (name, q.scale.spec, k)
            else:
                assert _padded(q.codes.spec, 3) == k, (name, q.codes.spec, k)


@pytest.mark.parametrize("family", ["gpt2"], indirect=True)  # the rule is the same for every family
def test_fp8_base_loads_tensor_parallel(family):
    """Loaded onto the TP mesh, every FP8 kernel is split where its kernel would be (a quarter of the
    output channels of c_attn and c_fc, codes and scales; a quarter of the inputs of both c_proj),
    where `tree_shardings` says, with the values of an unsharded load; the LoRA forward on it equals
    the unsharded one."""
    model_dir, cfg, _, lcfg, lora = family
    mesh = lj.make_mesh(*MESHES["tp"])
    _, sharded = lj.load_pretrained(model_dir, quantize="fp8", mesh=mesh)
    _, plain = lj.load_pretrained(model_dir, quantize="fp8")
    for s, leaf, ref in zip(
        jax.tree.leaves(tree_shardings(sharded, mesh)), jax.tree.leaves(sharded), jax.tree.leaves(plain)
    ):
        assert leaf.sharding.spec == s.spec
        np.testing.assert_array_equal(np.asarray(leaf, np.float32), np.asarray(ref, np.float32))
    layout = layout_of(cfg)
    for p in layout.projections:
        k = sharded[layout.layers][p.parent][p.module_name]["kernel"]
        # TP splits the kernel's non-embed axis: `out` (codes dim 1, and the scales) of q/k/v/gate/up
        # (c_attn, c_fc), `in` (codes dim 2) of o/down (GPT-2's c_proj)
        split = 1 if p.axes[0] == "embed" else 2
        codes = list(k.codes.shape)
        codes[split] //= 4
        scale = (k.scale.shape[0], k.scale.shape[1] // (4 if split == 1 else 1))
        assert k.codes.addressable_shards[0].data.shape == tuple(codes), p.name
        assert k.scale.addressable_shards[0].data.shape == scale, p.name
    ids = jnp.asarray(random_ids(cfg.vocab_size, (BATCH, SEQ), seed=6))
    run = jax.jit(lambda p, lo, x: lj.apply(lj.build_model(cfg), p, lo, lcfg, x), **FAST_COMPILE)
    ref = np.asarray(run(plain, lora, ids))
    got = np.asarray(run(sharded, place(lora, mesh), jax.device_put(ids, batch_sharding(mesh))))
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=RTOL * np.abs(ref).max())
