"""Interop with PEFT and transformers: adapters both ways (save_peft -> PeftModel, PEFT
save_pretrained -> load_peft), merged and base exports (save_pretrained -> AutoModelForCausalLM),
bf16 files, and bad input refused with a clear error and nothing written.

Every fp32 comparison is bounded by FP32_ATOL (1e-4); each test prints its measured max abs diff
(`pytest -s` shows them)."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import lora_jax as lj
from lora_jax.lora.targets import model_shape, plan_targets, shape_from_config
from tests.helpers import (
    hf_model,
    make_hf_llama,
    max_diff,
    our_logits,
    random_ids,
    report_diff,
    torch_logits_of,
)

IDS = random_ids(97, (2, 13))

# Our side (LoraConfig) and PEFT's side (peft.LoraConfig) of each variant, same meaning.
VARIANTS = {
    "plain": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "rslora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True),
    "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj"], use_dora=True),
    "patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules="all-linear",
        rank_pattern={"model.layers.0.self_attn.q_proj": 2, "down_proj": 6},
        alpha_pattern={"v_proj": 3.0},
    ),
    "layers_to_transform": dict(r=4, lora_alpha=16, target_modules=["q_proj", "gate_proj"], layers_to_transform=[1]),
    "dora_patterns_layers": dict(
        r=4,
        lora_alpha=8,
        target_modules=["v_proj", "down_proj"],
        use_dora=True,
        rank_pattern={"down_proj": 2},
        layers_to_transform=[0],
    ),
    "regex": dict(r=3, lora_alpha=5, target_modules=r".*\.layers\.0\..*(k|up)_proj"),
}


# ------------------------------------------------------------------------------------------ helpers
ours = functools.partial(our_logits, ids=IDS)  # (cfg, params, lora=None, lcfg=None) -> logits of IDS
torch_out = functools.partial(torch_logits_of, ids=IDS)  # a torch model's logits of IDS
report = functools.partial(report_diff, "interop")


def our_adapter(params, kw, seed=1):
    """init_lora with random non-zero B; DoRA magnitudes moved off the weight norms per element."""
    lcfg = lj.LoraConfig(init_lora_weights=False, **kw)
    lora = lj.init_lora(params, lcfg, jax.random.key(seed))
    if lcfg.use_dora:
        rng = np.random.default_rng(seed)
        lora = jax.tree_util.tree_map_with_path(
            lambda p, v: v * (1 + 0.3 * rng.uniform(-1, 1, v.shape)).astype(np.float32) if p[-1].key == "m" else v, lora
        )
    return lora, lcfg


def peft_adapter(base_dir, kw, seed=0, modules_to_save=None):
    """A PEFT model with random non-zero A, B (init_lora_weights=False), DoRA magnitudes and
    modules_to_save copies perturbed."""
    import peft
    import torch

    torch.manual_seed(seed)
    kw = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items()}
    pm = peft.get_peft_model(
        hf_model(base_dir),
        peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, modules_to_save=modules_to_save, **kw),
    ).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name or "modules_to_save" in name:
                p.mul_(1 + 0.3 * (2 * torch.rand_like(p) - 1))
    return pm


def nothing_written(out_dir):
    parent, name = os.path.split(os.fspath(out_dir))
    return not os.path.exists(out_dir) and not [f for f in os.listdir(parent) if f.startswith(name + ".")]


def assert_same_targets(pm, targets):
    """PEFT built adapters on exactly the planned modules, with the same ranks and scales."""
    got = {
        name.removeprefix("base_model.model."): (mod.r["default"], mod.scaling["default"])
        for name, mod in pm.named_modules()
        if hasattr(mod, "scaling") and "default" in getattr(mod, "r", {})
    }
    assert sorted(got) == sorted(t.hf_name for t in targets)
    for t in targets:
        assert got[t.hf_name][0] == t.r and got[t.hf_name][1] == pytest.approx(t.scale, rel=1e-6), t


# ------------------------------------------------------------------------------------ ours -> PEFT
@pytest.mark.parametrize("variant", list(VARIANTS) + ["plain-noscan"])
def test_our_adapter_in_peft(tiny_llama, bases, tmp_path, variant):
    import peft

    scan = not variant.endswith("-noscan")
    cfg, params = bases[scan]
    lora, lcfg = our_adapter(params, VARIANTS[variant.removesuffix("-noscan")])
    expected = ours(cfg, params, lora, lcfg)
    assert max_diff(expected, ours(cfg, params)) > 1e-3  # the adapter does something
    out = lj.save_peft(tmp_path / "adapter", lora, lcfg, cfg, base_model_name_or_path=tiny_llama)

    with safe_open(os.path.join(out, "adapter_model.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt"}
        n_keys = len(list(f.keys()))
    targets = plan_targets(shape_from_config(cfg), lcfg)
    assert n_keys == len(targets) * (3 if lcfg.use_dora else 2)  # real entries only

    pm = peft.PeftModel.from_pretrained(hf_model(tiny_llama), out).eval()
    assert_same_targets(pm, targets)
    report(f"ours->PEFT {variant}", max_diff(torch_out(pm), expected))
    result = pm.load_adapter(out, adapter_name="again")  # set_peft_model_state_dict's report
    assert not result.unexpected_keys and not result.missing_keys
    merged = pm.merge_and_unload()
    report(f"ours->PEFT merge_and_unload {variant}", max_diff(torch_out(merged), expected))

    # and back: load_peft of our own file gives the same tree (padding, zero layers and all)
    lora2, lcfg2 = lj.load_peft(out, params)
    if isinstance(lcfg.target_modules, str) and lcfg.target_modules != "all-linear":
        lcfg = lcfg.replace(target_modules=tuple(t.hf_name for t in targets))  # exported as that list
    assert lcfg2 == lcfg
    flat, flat2 = traverse_util.flatten_dict(lora), traverse_util.flatten_dict(lora2)
    assert flat.keys() == flat2.keys()
    for k in flat:
        assert np.array_equal(flat[k], flat2[k]), k


def test_modules_to_save_ours_to_peft_and_back(tiny_llama, bases, tmp_path):
    import peft

    cfg, params = bases[True]
    lora, lcfg = our_adapter(params, dict(r=2, lora_alpha=4, target_modules=["k_proj"], modules_to_save=["lm_head"]))
    head = params["lm_head"]["kernel"]
    trained = {**params, "lm_head": {"kernel": head * 1.5 + 0.01}}
    expected = ours(cfg, trained, lora, lcfg)
    with pytest.raises(lj.ConfigError, match="pass params="):
        lj.save_peft(tmp_path / "no_params", lora, lcfg, cfg)
    assert nothing_written(tmp_path / "no_params")
    out = lj.save_peft(tmp_path / "adapter", lora, lcfg, cfg, params=trained)
    assert "base_model.model.lm_head.weight" in load_file(os.path.join(out, "adapter_model.safetensors"))

    pm = peft.PeftModel.from_pretrained(hf_model(tiny_llama), out).eval()
    report("ours->PEFT modules_to_save", max_diff(torch_out(pm), expected))
    assert not pm.load_adapter(out, adapter_name="again").unexpected_keys

    lora2, lcfg2, params2 = lj.load_peft(out, params, return_params=True)
    assert lcfg2.modules_to_save == ("lm_head",)
    assert np.array_equal(params2["lm_head"]["kernel"], trained["lm_head"]["kernel"])
    assert params["lm_head"]["kernel"] is head  # the input tree is left as is
    assert np.array_equal(lj.apply_modules_to_save(params, out)["lm_head"]["kernel"], trained["lm_head"]["kernel"])
    with pytest.warns(UserWarning, match="modules_to_save"):
        lj.load_peft(out, params)


def test_pissa_exported_relative_to_residual(tiny_llama, bases, tmp_path):
    """A PiSSA adapter is written as plain LoRA (init_lora_weights: true) against the residual base."""
    import peft

    cfg, params = bases[True]
    lcfg = lj.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights="pissa")
    lora0 = lj.init_lora(params, lcfg, jax.random.key(0))
    residual = lj.unmerge(params, lora0, lcfg)
    lora = jax.tree_util.tree_map_with_path(  # "training" moved B
        lambda p, v: v * 1.2 + 0.01 if p[-1].key == "b" else v, lora0
    )
    expected = ours(cfg, residual, lora, lcfg)
    res_dir = lj.save_pretrained(tmp_path / "residual", residual, cfg)
    out = lj.save_peft(tmp_path / "adapter", lora, lcfg, cfg, base_model_name_or_path=res_dir)
    with open(os.path.join(out, "adapter_config.json")) as f:
        assert json.load(f)["init_lora_weights"] is True
    pm = peft.PeftModel.from_pretrained(hf_model(res_dir), out).eval()
    report("ours->PEFT pissa (residual base)", max_diff(torch_out(pm), expected))


# ------------------------------------------------------------------------------------ PEFT -> ours
@pytest.mark.parametrize("variant", list(VARIANTS) + ["dora-noscan"])
def test_peft_adapter_in_ours(tiny_llama, bases, tmp_path, variant):
    scan = not variant.endswith("-noscan")
    cfg, params = bases[scan]
    pm = peft_adapter(tiny_llama, VARIANTS[variant.removesuffix("-noscan")])
    expected = torch_out(pm)
    pm.save_pretrained(tmp_path / "adapter")
    lora, lcfg = lj.load_peft(tmp_path / "adapter", params)
    assert ("layers" in lora) == scan
    got = ours(cfg, params, lora, lcfg)
    assert max_diff(got, ours(cfg, params)) > 1e-3
    report(f"PEFT->ours {variant}", max_diff(got, expected))
    assert_same_targets(pm, plan_targets(model_shape(params), lcfg))


def test_peft_modules_to_save_in_ours(tiny_llama, bases, tmp_path):
    cfg, params = bases[True]
    pm = peft_adapter(tiny_llama, dict(r=2, lora_alpha=4, target_modules=["k_proj"]), modules_to_save=["lm_head"])
    expected = torch_out(pm)
    pm.save_pretrained(tmp_path / "adapter")
    lora, lcfg, trained = lj.load_peft(tmp_path / "adapter", params, return_params=True)
    report("PEFT->ours modules_to_save", max_diff(ours(cfg, trained, lora, lcfg), expected))


def test_adapter_name_in_keys_tolerated(tiny_llama, bases, tmp_path):
    """Keys in the model-state-dict form (`.lora_A.default.weight`, `.modules_to_save.default.`)."""
    _, params = bases[True]
    pm = peft_adapter(tiny_llama, VARIANTS["dora"], modules_to_save=["lm_head"])
    pm.save_pretrained(tmp_path / "a")
    lora, lcfg, p1 = lj.load_peft(tmp_path / "a", params, return_params=True)
    path = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(path)
    renamed = {}
    for k, v in tensors.items():
        k = k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        k = k.replace(".lora_magnitude_vector", ".lora_magnitude_vector.default.weight")
        renamed[k.replace("lm_head.weight", "lm_head.modules_to_save.default.weight")] = v
    assert renamed.keys() != tensors.keys()
    save_file(renamed, path, metadata={"format": "pt"})
    lora2, lcfg2, p2 = lj.load_peft(tmp_path / "a", params, return_params=True)
    assert lcfg2 == lcfg
    for a, b in zip(jax.tree.leaves((lora, p1)), jax.tree.leaves((lora2, p2))):
        assert np.array_equal(a, b)


# ---------------------------------------------------------------------------------- merged export
@pytest.mark.parametrize(
    "variant, scan, shard",
    [("plain", True, "30KB"), ("dora", True, None), ("dora_patterns_layers", False, None), ("patterns", False, "30KB")],
)
def test_merged_export_loads_in_transformers(bases, tmp_path, variant, scan, shard):
    cfg, params = bases[scan]
    lora, lcfg = our_adapter(params, VARIANTS[variant])
    merged = lj.merge(params, lora, lcfg)
    expected = ours(cfg, merged)
    kw = {} if shard is None else {"max_shard_size": shard}
    out = lj.save_pretrained(tmp_path / "merged", params, cfg, lora=lora, lcfg=lcfg, **kw)
    files = [f for f in os.listdir(out) if f.endswith(".safetensors")]
    if shard:
        assert len(files) > 1 and os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    else:
        assert files == ["model.safetensors"]
    model, info = hf_model(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    report(f"merged export {variant} (scan={scan}, shard={shard})", max_diff(torch_out(model), expected))
    report(f"merged export {variant} vs adapted", max_diff(torch_out(model), ours(cfg, params, lora, lcfg)))
    # the streamed per-slice merge equals lora_jax.merge of the whole tree
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    worst = 0.0
    for path in lj.lora.tree.adapter_paths(lora):
        kernel = merged[path[0]][path[1]][path[2]]["kernel"]
        layers = range(cfg.num_hidden_layers) if scan else [int(path[0].removeprefix("layers_"))]
        for i in layers:
            w = np.asarray(kernel[i] if scan else kernel)
            worst = max(worst, max_diff(sd[f"model.layers.{i}.{path[1]}.{path[2]}.weight"], w.T))
    report(f"merged export {variant} tensors vs lj.merge", worst, 1e-6)


@pytest.mark.parametrize("variant", ["gqa_untied_scan", "gqa_untied_noscan", "tied"])
def test_base_round_trip_is_exact(tiny_llama, tmp_path, variant):
    """transformers -> load_pretrained -> save_pretrained -> transformers: identical tensors."""
    src = tiny_llama if variant != "tied" else make_hf_llama(tmp_path / "tied", tie_word_embeddings=True)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    (tok / "special_tokens_map.json").write_text("{}")
    cfg, params = lj.load_pretrained(src, scan_layers=variant != "gqa_untied_noscan")
    out = lj.save_pretrained(tmp_path / "out", params, cfg, tokenizer_dir=tok)
    a, b = hf_model(src).state_dict(), hf_model(out).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k].numpy(), b[k].numpy()), k
    with open(os.path.join(out, "config.json")) as f:
        c = json.load(f)
    for key in ("rope_parameters", "head_dim", "rms_norm_eps", "tie_word_embeddings", "dtype"):
        assert key in c
    assert c["architectures"] == ["LlamaForCausalLM"] and c["model_type"] == "llama"
    assert c["tie_word_embeddings"] == (variant == "tied") and c["dtype"] == "float32"
    assert sorted(f for f in os.listdir(out) if f.startswith(("tokenizer", "special"))) == [
        "special_tokens_map.json",
        "tokenizer_config.json",
    ]


# -------------------------------------------------------------------------------------------- bf16
# bf16 keeps 8 significant bits: rounding to nearest moves a value by at most 2^-9 of itself. An
# adapter stored in bf16 changes each delta W = s*A@B by at most ~2 * 2^-9 = 2^-8 of its size (one
# rounding in A, one in B), so, to first order, the logits move by at most 2^-8 of the adapter's
# whole effect on them; the bound below allows 4x that for the nonlinearity and for the two
# roundings adding up. A merged bf16 export rounds whole weights (W + delta W), so there the basis
# is the whole logit scale: 2^-8 per weight, four times over, times max |logits|.
BF16_REL = 4 * 2.0**-8


def test_bf16_adapter_round_trip(tiny_llama, bases, tmp_path):
    import peft

    cfg, params = bases[True]
    lora, lcfg = our_adapter(params, VARIANTS["patterns"])
    out = lj.save_peft(tmp_path / "a16", lora, lcfg, cfg, dtype="bfloat16")
    with safe_open(os.path.join(out, "adapter_model.safetensors"), "np") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    lora16, _ = lj.load_peft(out, params)
    flat16 = traverse_util.flatten_dict(lora16)
    for path, v in traverse_util.flatten_dict(lora).items():
        v16 = flat16[path]
        assert v16.dtype == jnp.float32
        if path[-1] == "scale":  # not a tensor of the file: alpha / r from the config, fp32
            assert np.array_equal(v16, v), path
            continue
        # exactly the bf16 rounding of each entry: one cast, nothing else
        assert np.array_equal(np.asarray(v16), np.asarray(v).astype(ml_dtypes.bfloat16).astype(np.float32)), path
    fp32 = ours(cfg, params, lora, lcfg)
    got16 = ours(cfg, params, lora16, lcfg)
    pm = peft.PeftModel.from_pretrained(hf_model(tiny_llama), out).eval()
    report("bf16 adapter: PEFT vs ours (same bf16 weights)", max_diff(torch_out(pm), got16))
    effect = max_diff(fp32, ours(cfg, params))
    report("bf16 adapter vs fp32 adapter", max_diff(got16, fp32), BF16_REL * effect)


def test_bf16_merged_export(bases, tmp_path):
    import torch

    cfg, params = bases[True]
    lora, lcfg = our_adapter(params, VARIANTS["dora"])
    merged32 = lj.merge(params, lora, lcfg)
    out = lj.save_pretrained(tmp_path / "m16", params, cfg, lora=lora, lcfg=lcfg, dtype="bfloat16")
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    sd = load_file(os.path.join(out, "model.safetensors"))
    # cast once: the bf16 file holds exactly the bf16 rounding of the fp32 merge
    ref = lj.save_pretrained(tmp_path / "m32", merged32, cfg)
    for k, v in load_file(os.path.join(ref, "model.safetensors")).items():
        assert sd[k].dtype == ml_dtypes.bfloat16
        assert np.array_equal(sd[k], v.astype(ml_dtypes.bfloat16)), k
    cfg16, p16 = lj.load_pretrained(out)
    assert cfg16.param_dtype == "bfloat16"
    p16_as_32 = jax.tree.map(lambda x: x.astype(jnp.float32), p16)
    model = hf_model(out, dtype=torch.float32)  # bf16 weights, fp32 compute
    report("bf16 merged export: transformers vs ours (same weights)", max_diff(torch_out(model), ours(cfg, p16_as_32)))
    fp32 = ours(cfg, merged32)
    report("bf16 merged export vs fp32 merge", max_diff(ours(cfg, p16_as_32), fp32), BF16_REL * np.abs(fp32).max())


# --------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def q_adapter(tiny_llama, bases, tmp_path_factory):
    """A DoRA q_proj adapter saved by PEFT: the file the bad-input tests spoil."""
    pm = peft_adapter(tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True))
    path = tmp_path_factory.mktemp("q") / "adapter"
    pm.save_pretrained(path)
    return path


def _spoiled(src, dst, tensors=None, config=None):
    os.makedirs(dst)
    t = load_file(os.path.join(src, "adapter_model.safetensors"))
    with open(os.path.join(src, "adapter_config.json")) as f:
        c = json.load(f)
    t = tensors(t) if tensors else t
    c.update(config or {})
    save_file(t, os.path.join(dst, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(dst, "adapter_config.json"), "w") as f:
        json.dump(c, f)
    return dst


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    "case, message",
    [
        ("unexpected_lora", r"unexpected tensors: .*layers\.0\.self_attn\.k_proj\.lora_A\.weight.*different base"),
        ("unexpected_other", r"unexpected tensors: base_model\.model\.junk\.weight"),
        ("missing", rf"missing tensors: {Q0}\.lora_B\.weight"),
        ("missing_magnitude", rf"missing tensors: {Q0}\.lora_magnitude_vector"),
        ("shape", rf"{Q0}\.lora_A\.weight has shape \[5, 32\] but .* imply \[4, 32\]"),
        ("peft_type", r"peft_type='IA3' is not supported"),
        ("fan_in_fan_out", r"fan_in_fan_out=True .* is not supported"),
        ("bias", r"bias='all' is not supported"),
        ("layers_pattern", r"layers_pattern='h' is not supported"),
        ("target_parameters", r"target_parameters=\['mlp.experts'\]"),
        ("pissa", r"init_lora_weights='pissa' means the adapter is relative to a base"),
        ("task_type", r"task_type='SEQ_CLS' is not supported"),
        ("embeddings", r"LoRA on embeddings or lm_head is not supported"),
        ("bad_json", r"is not valid JSON"),
    ],
)
def test_bad_adapter_refused(q_adapter, bases, tmp_path, case, message):
    _, params = bases[True]
    tensors = {
        "unexpected_lora": lambda t: {**t, Q0.replace("q_proj", "k_proj") + ".lora_A.weight": t[Q0 + ".lora_A.weight"]},
        "unexpected_other": lambda t: {**t, "base_model.model.junk.weight": np.zeros(3, np.float32)},
        "missing": lambda t: {k: v for k, v in t.items() if k != Q0 + ".lora_B.weight"},
        "missing_magnitude": lambda t: {k: v for k, v in t.items() if k != Q0 + ".lora_magnitude_vector"},
        "shape": lambda t: {**t, Q0 + ".lora_A.weight": np.zeros((5, 32), np.float32)},
    }.get(case)
    config = {
        "peft_type": dict(peft_type="IA3"),
        "fan_in_fan_out": dict(fan_in_fan_out=True),
        "bias": dict(bias="all"),
        "layers_pattern": dict(layers_pattern="h"),
        "target_parameters": dict(target_parameters=["mlp.experts"]),
        "pissa": dict(init_lora_weights="pissa"),
        "task_type": dict(task_type="SEQ_CLS"),
        "embeddings": dict(target_modules=["q_proj", "embed_tokens"]),
    }.get(case)
    bad = _spoiled(q_adapter, tmp_path / "bad", tensors, config)
    if case == "bad_json":
        (bad / "adapter_config.json").write_text('{"peft_type": "LORA", ')
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(lj.CheckpointFormatError, match=message):
        lj.load_peft(bad, params)
    assert sorted(os.listdir(tmp_path)) == before and sorted(os.listdir(bad)) == sorted(
        ["adapter_model.safetensors", "adapter_config.json"]
    )


def test_real_non_lora_adapter_refused(tiny_llama, bases, tmp_path):
    import peft

    pm = peft.get_peft_model(
        hf_model(tiny_llama),
        peft.IA3Config(
            task_type="CAUSAL_LM", target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]
        ),
    )
    pm.save_pretrained(tmp_path / "ia3")
    with pytest.raises(lj.CheckpointFormatError, match="peft_type='IA3' is not supported; lora_jax loads LoRA"):
        lj.load_peft(tmp_path / "ia3", bases[True][1])


@pytest.mark.parametrize("how", ["truncated", "garbage", "bin_only", "no_dir"])
def test_unreadable_adapter_refused(q_adapter, bases, tmp_path, how):
    bad = _spoiled(q_adapter, tmp_path / "bad")
    path = bad / "adapter_model.safetensors"
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
        message = r"cannot read .*adapter_model\.safetensors.*truncated or not safetensors"
    elif how == "garbage":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + data[24:])
        message = r"cannot read .*truncated or not safetensors"
    elif how == "bin_only":
        path.unlink()
        (bad / "adapter_model.bin").write_bytes(b"pickle")
        message = r"only a pickled adapter \(adapter_model\.bin\); lora_jax never unpickles"
    else:
        bad = tmp_path / "nowhere"
        message = "does not exist"
    with pytest.raises(lj.CheckpointFormatError, match=message):
        lj.load_peft(bad, bases[True][1])


@pytest.fixture(scope="module")
def other_bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("other")
    wide = make_hf_llama(root / "wide", hidden_size=48)
    shallow = make_hf_llama(root / "shallow", num_hidden_layers=1)
    return lj.load_pretrained(wide)[1], lj.load_pretrained(shallow)[1]


def test_adapter_on_wrong_base_refused(q_adapter, other_bases, tmp_path):
    wide, shallow = other_bases
    with pytest.raises(
        lj.CheckpointFormatError,
        match=rf"{Q0}\.lora_A\.weight has shape \[4, 32\] but .* imply \[4, 48\].*different base",
    ):
        lj.load_peft(q_adapter, wide)
    with pytest.raises(
        lj.CheckpointFormatError, match=r"unexpected tensors: .*layers\.1\.self_attn\.q_proj.*different base model"
    ):
        lj.load_peft(q_adapter, shallow)
    layered = _spoiled(q_adapter, tmp_path / "layered", config=dict(layers_to_transform=[1]))
    with pytest.raises(lj.CheckpointFormatError, match=r"does not fit this base model: layers_to_transform"):
        lj.load_peft(layered, shallow)


def test_failed_saves_write_nothing(bases, tmp_path, monkeypatch):
    cfg, params = bases[True]
    lora, lcfg = our_adapter(params, VARIANTS["dora"])
    # an lcfg that does not describe the adapter
    with pytest.raises(lj.ConfigError, match="lcfg targets .* but the adapter tree has no entry"):
        lj.save_peft(tmp_path / "a", lora, lcfg.replace(target_modules=("k_proj",)), cfg)
    with pytest.raises(lj.ConfigError, match=r"scale .* but lcfg implies"):
        lj.save_peft(tmp_path / "a", lora, lcfg.replace(lora_alpha=3), cfg)
    with pytest.raises(lj.ConfigError, match="lacks a DoRA magnitude|has a DoRA magnitude"):
        lj.save_peft(tmp_path / "a", lora, lcfg.replace(use_dora=False), cfg)
    assert nothing_written(tmp_path / "a")
    # adapters of another layout (unscanned tree for scanned params)
    _, p_noscan = bases[False]
    lora_noscan, _ = our_adapter(p_noscan, VARIANTS["dora"])
    with pytest.raises(lj.ConfigError, match="not a kernel of this model"):
        lj.save_pretrained(tmp_path / "m", params, cfg, lora=lora_noscan, lcfg=lcfg)
    assert nothing_written(tmp_path / "m")
    # a failure while writing leaves an existing directory as it was, and no temporary behind
    keep = tmp_path / "keep"
    keep.mkdir()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("lora_jax.hf.peft.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        lj.save_peft(keep, lora, lcfg, cfg)
    monkeypatch.setattr("lora_jax.hf.save.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        lj.save_pretrained(keep, params, cfg, lora=lora, lcfg=lcfg)
    assert os.listdir(keep) == []
    assert sorted(os.listdir(tmp_path)) == ["keep"]
    # a directory holding someone's files is not written into at all (tests/test_export_safety.py)
    (keep / "marker").write_text("old")
    with pytest.raises(lj.ConfigError, match="is not empty"):
        lj.save_peft(keep, lora, lcfg, cfg)
    assert os.listdir(keep) == ["marker"] and (keep / "marker").read_text() == "old"


# ------------------------------------------------------------------------------ training gradients
@pytest.mark.parametrize("variant,fuse", [("plain", True), ("plain", False), ("dora", True), ("patterns", True)])
def test_adapter_gradients_equal_peft(tiny_llama, bases, tmp_path, variant, fuse):
    """One loss's gradients w.r.t. every lora_A / lora_B (and DoRA magnitude) equal PEFT's under
    torch autograd: the whole backward pass (the loss's and the projections' hand-written VJPs,
    RMSNorm's, SwiGLU's; gate/up inside the frozen matmul or beside it) against the real thing.
    Our gradient tree is written with `save_peft` so its tensors carry PEFT's names and layout."""
    import torch

    from lora_jax.train.step import _loss_sum

    cfg, params = bases[True]
    cfg = cfg.replace(fuse_wide_adapters=fuse)
    assert cfg.intermediate_size >= 2 * cfg.hidden_size  # gate/up are wide: `fuse` takes effect
    pm = peft_adapter(tiny_llama, VARIANTS[variant])
    ids = random_ids(97, (2, 13), seed=3)
    out = pm(torch.from_numpy(ids).long(), labels=torch.from_numpy(ids).long())
    out.loss.backward()
    expected = {
        k.replace(".default", "").replace("_vector.weight", "_vector"): p.grad.numpy()
        for k, p in pm.named_parameters()
        if p.requires_grad
    }
    pm.save_pretrained(tmp_path / "adapter")
    lora, lcfg = lj.load_peft(tmp_path / "adapter", params)
    split = lj.split_trainable(params, lora, lcfg)
    batch = {
        "input_ids": jnp.asarray(ids[:, :-1]),
        "targets": jnp.asarray(ids[:, 1:]),
        "positions": jnp.broadcast_to(jnp.arange(12), (2, 12)),
        "segment_ids": jnp.ones((2, 12), jnp.int32),
        "loss_mask": jnp.ones((2, 12)),
    }

    def mean_loss(tr):
        total, n = _loss_sum(lj.Llama(cfg), cfg, lcfg, 8, False, tr, split.frozen, batch, jax.random.key(0), True)
        return total / n

    loss, grads = jax.value_and_grad(mean_loss)(split.trainable)
    report(f"loss vs PEFT {variant} fuse={fuse}", abs(float(loss) - out.loss.item()))
    _, grad_tree = lj.combine(grads, split.frozen)
    saved = load_file(os.path.join(lj.save_peft(tmp_path / "grads", grad_tree, lcfg, cfg), "adapter_model.safetensors"))
    assert sorted(saved) == sorted(expected)
    assert min(float(np.abs(v).max()) for v in expected.values()) > 1e-4  # every gradient is live
    report(
        f"adapter gradients vs PEFT {variant} fuse={fuse}",
        max(max_diff(saved[k], expected[k]) for k in expected),
        bound=1e-5,
    )
