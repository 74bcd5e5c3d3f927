"""Gemma 3 text (`Gemma3ForCausalLM`, model_type gemma3_text) against transformers and PEFT: a tiny
random model with local and global layers (a window narrower than the sequence), distinct RoPE bases,
query_pre_attn_scalar != head_dim, final logit softcapping, every norm perturbed; saved with
save_pretrained and loaded from disk. fp32 logits, a real PEFT adapter loaded with `load_peft`, our
`save_peft` export loaded in PEFT, and the merged export loaded by `AutoModelForCausalLM`, all within
FP32_ATOL."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from tests.helpers import FP32_ATOL, max_diff, random_ids

GEMMA3 = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    sliding_window=5,
    layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    query_pre_attn_scalar=12,
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
        "full_attention": {"rope_type": "default", "rope_theta": 5000.0},
    },
    final_logit_softcapping=3.0,
    max_position_embeddings=64,
)
IDS = random_ids(GEMMA3["vocab_size"], (2, 13), seed=3)


def report(label, diff, bound=FP32_ATOL):
    print(f"[gemma3] {label}: max abs diff {diff:.3e} (bound {bound:.1e})")
    assert diff <= bound, f"{label}: max abs diff {diff:.3e} > {bound:.1e}"


def make_hf_gemma3(out_dir, seed: int = 0, **overrides) -> str:
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.Gemma3TextConfig(**{**GEMMA3, **overrides})
    model = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # zero-initialised (1 + w); make each one count
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(os.fspath(out_dir))
    return os.fspath(out_dir)


def hf_model(model_dir):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()


def torch_out(model, ids=IDS) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(ids)).long()).logits.float().numpy()


@functools.cache
def _jitted(cfg, lcfg):
    model = lj.build_model(cfg)
    if lcfg is None:
        return jax.jit(lambda p, x: model.apply({"params": p}, x))
    return jax.jit(lambda p, lo, x: lj.apply(model, p, lo, lcfg, x))


def ours(cfg, params, lora=None, lcfg=None, ids=IDS) -> np.ndarray:
    if lora is None:
        return np.asarray(_jitted(cfg, None)(params, jnp.asarray(ids)))
    return np.asarray(_jitted(cfg, lcfg)(params, lora, jnp.asarray(ids)))


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    path = make_hf_gemma3(tmp_path_factory.mktemp("gemma3") / "model")
    cfg, params = lj.load_pretrained(path, attention="xla")
    return path, cfg, params


def test_config_read_from_hf(gemma3):
    path, cfg, params = gemma3
    assert isinstance(cfg, lj.Gemma3Config) and cfg.model_type == "gemma3_text"
    assert cfg.sliding_layers == (True, False, True, False)
    assert (cfg.rope_local_base_freq, cfg.rope_theta) == (100.0, 5000.0)
    assert cfg.query_pre_attn_scalar == 12 and cfg.final_logit_softcapping == 3.0
    assert cfg.tie_word_embeddings and "lm_head" not in params
    layer = params["layers"]
    assert layer["self_attn"]["q_norm"]["scale"].shape == (4, 8)
    for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm"):
        assert layer[norm]["scale"].shape == (4, 32)
    assert layer["post_feedforward_layernorm"]["scale"].shape == (4, 32)


def test_logits_match_transformers(gemma3):
    path, cfg, params = gemma3
    expected = torch_out(hf_model(path))
    logits = ours(cfg, params)
    report("logits (scanned)", max_diff(logits, expected))
    _, unrolled = lj.load_pretrained(path, attention="xla", scan_layers=False)
    report("logits (unrolled)", max_diff(ours(cfg.replace(scan_layers=False), unrolled), expected))
    # the window is narrower than the sequence and changes the result
    wide = cfg.replace(sliding_window=IDS.shape[1])
    assert max_diff(logits, ours(wide, params)) > 1e-3


def test_peft_both_ways_and_merged_export(gemma3, tmp_path):
    import peft
    import torch
    import transformers

    path, cfg, params = gemma3
    torch.manual_seed(1)
    pm = peft.get_peft_model(
        hf_model(path),
        peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, r=4, lora_alpha=8, target_modules="all-linear"),
    ).eval()
    pm.save_pretrained(tmp_path / "peft")
    expected = torch_out(pm)

    # PEFT -> ours
    lora, lcfg = lj.load_peft(tmp_path / "peft", params)
    assert set(lora["layers"]["self_attn"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert set(lora["layers"]["mlp"]) == {"gate_proj", "up_proj", "down_proj"}
    got = ours(cfg, params, lora, lcfg)
    assert max_diff(got, ours(cfg, params)) > 1e-3  # the adapter does something
    report("PEFT->ours", max_diff(got, expected))

    # ours -> PEFT
    out = lj.save_peft(tmp_path / "ours", lora, lcfg, cfg, base_model_name_or_path=path)
    pm2 = peft.PeftModel.from_pretrained(hf_model(path), out).eval()
    report("ours->PEFT", max_diff(torch_out(pm2), got))

    # merged export -> transformers
    merged = lj.save_pretrained(tmp_path / "merged", params, cfg, lora=lora, lcfg=lcfg)
    with open(os.path.join(merged, "config.json")) as f:
        written = json.load(f)
    assert written["model_type"] == "gemma3_text" and written["architectures"] == ["Gemma3ForCausalLM"]
    hf_merged = transformers.AutoModelForCausalLM.from_pretrained(merged, attn_implementation="eager").eval()
    assert type(hf_merged).__name__ == "Gemma3ForCausalLM"
    report("merged export", max_diff(torch_out(hf_merged), got))
    cfg2, _ = lj.load_pretrained(merged)
    assert cfg2.replace(attention=cfg.attention) == cfg


def test_unimplemented_options_refused(tmp_path):
    import transformers

    base = {k: v for k, v in GEMMA3.items()}
    cases = {
        "attn": (dict(attn_logit_softcapping=50.0), "attn_logit_softcapping=50.0 is not implemented"),
        "bidir": (dict(use_bidirectional_attention=True), "use_bidirectional_attention=true"),
        "act": (dict(hidden_activation="silu"), "hidden_activation='silu' is not implemented"),
    }
    for name, (overrides, message) in cases.items():
        transformers.Gemma3TextConfig(**{**base, **overrides}).save_pretrained(tmp_path / name)
        with pytest.raises(lj.ConfigError, match=message):
            lj.load_pretrained(tmp_path / name)


def test_window_refused_outside_xla(gemma3, monkeypatch):
    from lora_jax.models import attention as attention_module

    path, cfg, params = gemma3
    monkeypatch.setattr(attention_module, "_platform", lambda: "gpu")
    with pytest.raises(lj.ConfigError, match="sliding_window=5 is shorter than the sequence"):
        lj.build_model(cfg.replace(attention="pallas")).apply({"params": params}, jnp.asarray(IDS))
