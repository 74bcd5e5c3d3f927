"""Gemma 3 text (`Gemma3ForCausalLM`, model_type gemma3_text) against transformers and PEFT: a tiny
random model with local and global layers (a window narrower than the sequence), distinct RoPE bases,
query_pre_attn_scalar != head_dim, final logit softcapping, every norm perturbed; saved with
save_pretrained and loaded from disk. fp32 logits, a real PEFT adapter loaded with `load_peft`, our
`save_peft` export loaded in PEFT, and the merged export loaded by `AutoModelForCausalLM`, all within
FP32_ATOL."""

import functools
import json
import os

import jax.numpy as jnp
import pytest

import lora_jax as lj
from tests.helpers import (
    check_peft_both_ways,
    hf_model,
    max_diff,
    our_logits,
    random_ids,
    report_diff,
    save_random_hf,
    torch_logits_of,
)

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


ours = functools.partial(our_logits, ids=IDS)  # (cfg, params, lora=None, lcfg=None) -> logits of IDS
torch_out = functools.partial(torch_logits_of, ids=IDS)  # a torch model's logits of IDS
report = functools.partial(report_diff, "gemma3")


def make_hf_gemma3(out_dir, seed: int = 0, **overrides) -> str:
    """Every weight drawn with deviation 0.1, and the norms' (zero-initialised: `1 + w`) with 0.2,
    so that each one counts."""
    import transformers

    config = transformers.Gemma3TextConfig(**{**GEMMA3, **overrides})
    return save_random_hf(out_dir, config, seed, norm_std=0.2, weight_std=0.1)


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
    path, cfg, params = gemma3
    lora, _ = check_peft_both_ways(path, cfg, params, tmp_path, IDS, "gemma3")
    assert set(lora["layers"]["self_attn"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert set(lora["layers"]["mlp"]) == {"gate_proj", "up_proj", "down_proj"}
    with open(os.path.join(tmp_path, "merged", "config.json")) as f:
        assert json.load(f)["architectures"] == ["Gemma3ForCausalLM"]


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
