"""LoRA core: exactness against merged weights, gradients, merge/unmerge, optimizer state,
trainable counts against PEFT, the compiled step, and input validation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import lora_jax as lj
from lora_jax.lora import intercept as intercept_mod
from tests.helpers import all_eqns, max_diff, tiny_ids

VARIANTS = {
    "plain": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "rslora": dict(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj", "down_proj"), use_rslora=True),
    "dora": dict(r=4, lora_alpha=8, target_modules=("q_proj", "o_proj", "up_proj"), use_dora=True),
    "patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules="all-linear",
        rank_pattern={"model.layers.0.self_attn.q_proj": 2, "down_proj": 6},
        alpha_pattern={"v_proj": 3.0},
    ),
    "layers_to_transform": dict(r=4, lora_alpha=16, target_modules=("q_proj", "gate_proj"), layers_to_transform=[1]),
    "regex": dict(r=3, lora_alpha=5, target_modules=r".*\.layers\.0\..*(k|up)_proj"),
}


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "noscan"])
def test_init_equals_base_exactly(bases, scan):
    cfg, params = bases[scan]
    lcfg = lj.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", use_dora=True)
    lora = lj.init_lora(params, lcfg, jax.random.key(0))
    model = lj.Llama(cfg)
    base = model.apply({"params": params}, tiny_ids())
    adapted = lj.apply(model, params, lora, lcfg, tiny_ids())
    assert max_diff(base, adapted) <= 1e-6  # DoRA: m/||W|| = 1 up to one rounding
    plain = lj.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    lora = lj.init_lora(params, plain, jax.random.key(0))
    assert np.array_equal(base, lj.apply(model, params, lora, plain, tiny_ids()))
    # outside the context the model is the plain base, adapters present or not
    assert np.array_equal(base, model.apply({"params": params, "lora": lora}, tiny_ids()))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("scan", [True, False], ids=["scan", "noscan"])
def test_intercepted_equals_merged(bases, variant, scan):
    cfg, params = bases[scan]
    lcfg = lj.LoraConfig(init_lora_weights=False, **VARIANTS[variant])  # random non-zero B
    lora = lj.init_lora(params, lcfg, jax.random.key(1))
    if lcfg.use_dora:  # move magnitudes away from the norms so DoRA's factor is not 1
        lora = jax.tree_util.tree_map_with_path(lambda p, v: v * 1.3 if p[-1].key == "m" else v, lora)
    model = lj.Llama(cfg)
    ours = lj.apply(model, params, lora, lcfg, tiny_ids())
    merged = model.apply({"params": lj.merge(params, lora, lcfg)}, tiny_ids())
    base = model.apply({"params": params}, tiny_ids())
    assert max_diff(ours, base) > 1e-3  # the adapters do something
    assert max_diff(ours, merged) <= 1e-5


def test_pattern_ranks_and_scales(bases):
    _, params = bases[False]
    lcfg = lj.LoraConfig(init_lora_weights=False, **VARIANTS["patterns"])
    lora = lj.init_lora(params, lcfg, jax.random.key(0))
    assert lora["layers_0"]["self_attn"]["q_proj"]["a"].shape == (32, 2)
    assert lora["layers_1"]["self_attn"]["q_proj"]["a"].shape == (32, 4)
    assert lora["layers_1"]["mlp"]["down_proj"]["b"].shape == (6, 32)
    assert float(lora["layers_0"]["self_attn"]["v_proj"]["scale"]) == pytest.approx(3.0 / 4)
    rs = lj.LoraConfig(r=4, lora_alpha=8, use_rslora=True)
    assert float(
        lj.init_lora(params, rs, jax.random.key(0))["layers_0"]["self_attn"]["q_proj"]["scale"]
    ) == pytest.approx(8 / 2.0)


@pytest.mark.parametrize("variant", ["plain", "dora", "patterns"])
def test_adapter_gradients_equal_materialised(bases, variant):
    cfg, params = bases[True]
    lcfg = lj.LoraConfig(init_lora_weights=False, **VARIANTS[variant])
    lora = lj.init_lora(params, lcfg, jax.random.key(2))
    model = lj.Llama(cfg)
    ids = tiny_ids()

    def loss_from_logits(logits):
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    def ours(lo):
        return loss_from_logits(lj.apply(model, params, lo, lcfg, ids))

    def materialised(lo):
        # the reference: W' = W + s A B (DoRA: m / stop_grad(||W'||) * W', as PEFT detaches the norm)
        flat = traverse_util.flatten_dict(params)
        for path in lj.lora.tree.adapter_paths(lo):
            mod = lj.lora.tree._node(lo, path)
            w = flat[path + ("kernel",)] + lj.lora.tree._delta(mod)
            if "m" in mod:
                norm = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(w * w, axis=-2)))
                w = w * jnp.where(mod["scale"][..., None] != 0, mod["m"] / norm, 1.0)[..., None, :]
            flat[path + ("kernel",)] = w
        return loss_from_logits(model.apply({"params": traverse_util.unflatten_dict(flat)}, ids))

    g1, g2 = jax.grad(ours)(lora), jax.grad(materialised)(lora)
    for path, v in traverse_util.flatten_dict(g1).items():
        if path[-1] == "scale":
            continue
        ref = traverse_util.flatten_dict(g2)[path]
        assert np.abs(ref).max() > 0 or path[-1] != "a"
        np.testing.assert_allclose(v, ref, atol=2e-6, rtol=1e-4, err_msg=str(path))


@pytest.mark.parametrize("variant", ["plain", "patterns", "layers_to_transform", "dora"])
def test_merge_unmerge(bases, variant):
    _, params = bases[True]
    lcfg = lj.LoraConfig(init_lora_weights=False, **VARIANTS[variant])
    lora = lj.init_lora(params, lcfg, jax.random.key(3))
    merged = lj.merge(params, lora, lcfg)
    flat_p, flat_m = traverse_util.flatten_dict(params), traverse_util.flatten_dict(merged)
    adapted = {p + ("kernel",) for p in lj.lora.tree.adapter_paths(lora)}
    for path, v in flat_p.items():
        if path not in adapted:
            assert flat_m[path] is v, f"merge touched {path}"
    norms = lj.dora_weight_norms(params, lora, lcfg) if lcfg.use_dora else None
    back = lj.unmerge(merged, lora, lcfg, dora_norms=norms)
    for path in adapted:
        assert max_diff(back[path[0]][path[1]][path[2]]["kernel"], flat_p[path]) <= 1e-6
    if lcfg.use_dora:
        with pytest.raises(ValueError, match="dora_norms"):
            lj.unmerge(merged, lora, lcfg)


def test_merge_bf16_casts_once(tiny_llama):
    _, p16 = lj.load_pretrained(tiny_llama, dtype="bfloat16")
    lcfg = lj.LoraConfig(r=4, init_lora_weights=False)
    lora = lj.init_lora(p16, lcfg, jax.random.key(0))
    merged = lj.merge(p16, lora, lcfg)
    k = merged["layers"]["self_attn"]["q_proj"]["kernel"]
    assert k.dtype == jnp.bfloat16
    ref = (
        p16["layers"]["self_attn"]["q_proj"]["kernel"].astype(jnp.float32)
        + lj.lora.tree._delta(lora["layers"]["self_attn"]["q_proj"])
    ).astype(jnp.bfloat16)
    assert np.array_equal(np.asarray(k, np.float32), np.asarray(ref, np.float32))


def test_pissa_init_preserves_model(bases):
    cfg, params = bases[True]
    lcfg = lj.LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "down_proj"), init_lora_weights="pissa")
    lora = lj.init_lora(params, lcfg, jax.random.key(0))
    residual = lj.unmerge(params, lora, lcfg)
    model = lj.Llama(cfg)
    base = model.apply({"params": params}, tiny_ids())
    assert max_diff(lj.apply(model, residual, lora, lcfg, tiny_ids()), base) <= 1e-5
    # the adapter holds the top singular directions: s * A @ B is the best rank-r approximation
    w = np.asarray(params["layers"]["self_attn"]["q_proj"]["kernel"][0], np.float64)
    u, s, vh = np.linalg.svd(w)
    best = (u[:, :4] * s[:4]) @ vh[:4]
    got = np.asarray(lj.lora.tree._delta(lora["layers"]["self_attn"]["q_proj"])[0])
    assert max_diff(got, best) <= 1e-4


def test_dropout_only_when_training(bases):
    cfg, params = bases[True]
    lcfg = lj.LoraConfig(r=4, lora_dropout=0.5, init_lora_weights=False)
    lora = lj.init_lora(params, lcfg, jax.random.key(0))
    model = lj.Llama(cfg)
    eval_out = lj.apply(model, params, lora, lcfg, tiny_ids())
    rngs = {"dropout": jax.random.key(7)}
    t1 = lj.apply(model, params, lora, lcfg, tiny_ids(), rngs=rngs, deterministic=False)
    t2 = lj.apply(model, params, lora, lcfg, tiny_ids(), rngs=rngs, deterministic=False)
    assert np.array_equal(t1, t2) and max_diff(t1, eval_out) > 1e-4


class _ChainDense(nn.Dense):
    def __call__(self, x):
        return super().__call__(x)


class _Toy(nn.Module):
    def setup(self):
        self.q_proj = _ChainDense(5)

    def __call__(self, x):
        return self.q_proj(x)


def test_interceptor_fires_once_per_call(monkeypatch, bases):
    calls = []
    real = intercept_mod.lora_dense
    monkeypatch.setattr(intercept_mod, "lora_dense", lambda *a, **k: calls.append(1) or real(*a, **k))
    toy = _Toy()
    x = jnp.ones((2, 3))
    params = toy.init(jax.random.key(0), x)["params"]
    lora = {"q_proj": {"a": jnp.ones((3, 2)), "b": jnp.ones((2, 5)), "scale": jnp.asarray(0.5)}}
    with lj.lora_interception():
        y = toy.apply({"params": params, "lora": lora}, x)
    assert len(calls) == 1  # setup and the super() chain did not fire it again
    assert max_diff(y, x @ params["q_proj"]["kernel"] + params["q_proj"]["bias"][None] + 0.5 * 3 * 2) <= 1e-5
    # the whole Llama: one lora_dense per adapted projection call, scanned or not (nn.scan traces
    # its body more than once, so count the projection calls the plain model makes under a
    # pass-through interceptor as the reference)
    for scan in (True, False):
        cfg, p = bases[scan]
        lcfg = lj.LoraConfig(r=2, target_modules=("q_proj", "v_proj", "down_proj"))
        lora = lj.init_lora(p, lcfg, jax.random.key(0))
        seen = []

        def spy(f, args, kwargs, ctx):
            if ctx.method_name == "__call__" and ctx.module.name in lcfg.target_modules:
                seen.append(ctx.module.name)
            return f(*args, **kwargs)

        with nn.intercept_methods(spy):
            lj.Llama(cfg).apply({"params": p}, tiny_ids())
        calls.clear()
        lj.apply(lj.Llama(cfg), p, lora, lcfg, tiny_ids())
        assert len(calls) == len(seen) and len(seen) >= 3 * (1 if scan else cfg.num_hidden_layers)


def _kernel_shapes(params):
    return {tuple(v.shape[-2:]) for p, v in traverse_util.flatten_dict(params).items() if p[-1] == "kernel"}


@pytest.mark.parametrize("remat", ["none", "full"])
def test_training_step_never_forms_full_size_update(tiny_llama, remat):
    """No op in the differentiated step outputs a kernel-shaped array: neither W + s*A@B nor a
    weight gradient of a frozen kernel (casts of W itself are the only kernel-shaped values)."""
    cfg, params = lj.load_pretrained(tiny_llama, scan_layers=True, remat_policy=remat)
    lcfg = lj.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    lora = lj.init_lora(params, lcfg, jax.random.key(0))
    split = lj.split_trainable(params, lora, lcfg)
    model = lj.Llama(cfg)
    ids = tiny_ids()

    def loss(trainable):
        p, lo = lj.combine(trainable, split.frozen)
        return jnp.mean(lj.apply(model, p, lo, lcfg, ids))

    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss))(split.trainable).jaxpr
    shapes = _kernel_shapes(params) - {(cfg.hidden_size, cfg.vocab_size)}
    allowed = {
        "convert_element_type",
        "copy",
        "copy_p",
        "pjit",
        "jit",
        "closed_call",
        "scan",
        "remat",
        "checkpoint",
        "custom_jvp_call",
        "custom_vjp_call",
        "transpose",
        "dynamic_slice",
        "slice",
        "squeeze",
        "reshape",
        "broadcast_in_dim",
        "select_n",
    }
    eqns = list(all_eqns(jaxpr))

    # the walk must reach the layers, in the scan's body (inside jit / remat / custom_vjp), or the
    # check below would pass on nothing: every adapted projection's x @ A ([B, T, r]) is among the
    # matmuls it visits, where the top level alone holds none of them
    def lora_products(eqns):
        return [
            e for e in eqns if e.primitive.name == "dot_general" and e.outvars[0].aval.shape == (*ids.shape, lcfg.r)
        ]

    assert len(lora_products(eqns)) >= len(lj.lora.tree.adapter_paths(lora)) == 7, len(lora_products(eqns))
    assert lora_products(jaxpr.eqns) == []
    offenders = [
        (e.primitive.name, o.aval.shape)
        for e in eqns
        for o in e.outvars
        if tuple(getattr(o.aval, "shape", ()))[-2:] in shapes
        and len(o.aval.shape) >= 2
        and e.primitive.name not in allowed
    ]
    assert not offenders, offenders


def test_optimizer_state_holds_nothing_for_frozen_leaves(bases):
    _, params = bases[True]
    lcfg = lj.LoraConfig(r=4, target_modules="all-linear", modules_to_save=("lm_head",), loraplus_lr_ratio=16)
    lora = lj.init_lora(params, lcfg, jax.random.key(0))
    tx = lj.make_optimizer(lcfg, 1e-3)
    full = {"params": params, "lora": lora}
    state = tx.init(full)
    n_state = sum(x.size for x in jax.tree.leaves(state) if hasattr(x, "size") and x.ndim > 0)
    trainable, _ = lj.count_parameters(params, lcfg)
    assert n_state == 2 * trainable  # Adam's mu and nu for trainable leaves only
    labels = traverse_util.flatten_dict(lj.lora_labels(full, lcfg))
    assert labels[("lora", "layers", "self_attn", "q_proj", "b")] == "train_b"
    assert labels[("lora", "layers", "self_attn", "q_proj", "scale")] == "freeze"
    assert labels[("params", "layers", "self_attn", "q_proj", "kernel")] == "freeze"
    assert labels[("params", "lm_head", "kernel")] == "train"
    grads = jax.tree.map(jnp.ones_like, full)
    updates, _ = tx.update(grads, state, full)
    assert not np.any(updates["params"]["layers"]["self_attn"]["q_proj"]["kernel"])
    assert np.any(updates["params"]["lm_head"]["kernel"])
    # LoRA+: b moves 16x as far as a on the first Adam step (both |update| = lr)
    ub = np.abs(updates["lora"]["layers"]["self_attn"]["q_proj"]["b"]).max()
    ua = np.abs(updates["lora"]["layers"]["self_attn"]["q_proj"]["a"]).max()
    assert ub == pytest.approx(16 * ua, rel=1e-3)


@pytest.mark.parametrize("stack", ["layers", "h"])  # Llama's scanned layers, GPT-2's
def test_loraplus_puts_a_scanned_norm_in_group_b(stack):
    """A 1-d module tensor (a norm in `modules_to_save`) is in LoRA+'s group B, also when scanned
    layers stack it to 2-d, whatever the family calls its layer stack."""
    lcfg = lj.LoraConfig(r=4, target_modules="all-linear", modules_to_save=("ln_1",), loraplus_lr_ratio=16)
    tree = {"params": {stack: {"ln_1": {"scale": jnp.ones((3, 8))}}, "ln_1": {"scale": jnp.ones(8)}}}
    labels = traverse_util.flatten_dict(lj.lora_labels(tree, lcfg))
    assert labels[("params", stack, "ln_1", "scale")] == "train_b"
    assert labels[("params", "ln_1", "scale")] == "train_b"


PEFT_CASES = {
    "all_linear": dict(r=8, lora_alpha=16, target_modules="all-linear"),
    "qv_dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True),
    "patterns_layers": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "up_proj", "o_proj"],
        rank_pattern={"up_proj": 2},
        layers_to_transform=[0],
    ),
    "modules_to_save": dict(r=2, lora_alpha=4, target_modules=["k_proj"], modules_to_save=["lm_head"]),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_trainable_counts_equal_peft(tiny_llama, case):
    import peft
    import transformers

    kw = PEFT_CASES[case]
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama)
    pm = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **kw))
    peft_trainable, peft_total = pm.get_nb_trainable_parameters()
    _, params = lj.load_pretrained(tiny_llama)
    ours = lj.count_parameters(params, lj.LoraConfig(**kw))
    assert ours == (peft_trainable, peft_total)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=0), "r=0"),
        (dict(r=-2), "r=-2"),
        (dict(lora_alpha=0), "lora_alpha=0"),
        (dict(lora_dropout=1.0), "lora_dropout=1.0"),
        (dict(lora_dropout=-0.1), "lora_dropout=-0.1"),
        (dict(use_dora=True, init_lora_weights="pissa"), "use_dora=True"),
        (dict(init_lora_weights="olora"), "init_lora_weights='olora'"),
        (dict(target_modules=[]), "target_modules is empty"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        lj.LoraConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(target_modules=["qproj"]), r"target_modules=\['qproj'\] matches no module.*q_proj, k_proj"),
        (dict(rank_pattern={"nonexistent": 4}), "pattern key 'nonexistent' matches no module"),
        (dict(alpha_pattern={"q_prj": 4}), "pattern key 'q_prj' matches no module"),
        (dict(layers_to_transform=[5]), r"layers_to_transform=\[5\] includes \[5\].*0..1"),
    ],
)
def test_bad_targets(bases, kwargs, message):
    _, params = bases[True]
    with pytest.raises(ValueError, match=message):
        lj.init_lora(params, lj.LoraConfig(**kwargs), jax.random.key(0))


def test_bad_modules_to_save(bases):
    _, params = bases[True]
    lcfg = lj.LoraConfig(modules_to_save=("score",))
    lora = lj.init_lora(params, lcfg, jax.random.key(0))
    with pytest.raises(ValueError, match=r"modules_to_save=\['score'\].*top-level modules are"):
        lj.split_trainable(params, lora, lcfg)


def test_joint_matmul_equals_the_separate_products_and_their_gradients():
    """`[x | u] @ [W ; sB]` with its hand-written VJP == `x W + u sB` under autodiff (`u` the
    adapter's first product), for every input (the kernel's gradient included, when it is asked
    for), on random values; and chained behind `u = xd A` as `lora_dense` uses it."""
    from lora_jax.lora.kernel import _joint_matmul, _widens

    k = jax.random.split(jax.random.key(3), 6)
    x, xd = jax.random.normal(k[0], (2, 5, 8)), jax.random.normal(k[1], (2, 5, 8))
    w, a = jax.random.normal(k[2], (8, 24)), jax.random.normal(k[3], (8, 4))
    sb, ct = jax.random.normal(k[4], (4, 24)), jax.random.normal(k[5], (2, 5, 24))
    u = xd @ a
    assert _widens(w) and not _widens(w.T)
    plain = lambda x, u, w, sb: x @ w + u @ sb
    y, vjp = jax.vjp(_joint_matmul, x, u, w, sb)
    y_ref, vjp_ref = jax.vjp(plain, x, u, w, sb)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, ref in zip(vjp(ct), vjp_ref(ct)):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # only the adapter asked for, through its first product: the same adapter gradients
    joint = lambda x, xd, a, sb: _joint_matmul(x, xd @ a, w, sb)
    sep = lambda x, xd, a, sb: x @ w + (xd @ a) @ sb
    got = jax.grad(lambda a, sb: jnp.sum(joint(x, xd, a, sb) * ct), argnums=(0, 1))(a, sb)
    ref = jax.grad(lambda a, sb: jnp.sum(sep(x, xd, a, sb) * ct), argnums=(0, 1))(a, sb)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
    got = jax.grad(lambda x: jnp.sum(joint(x, x, a, sb) * ct))(x)
    ref = jax.grad(lambda x: jnp.sum(sep(x, x, a, sb) * ct))(x)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
