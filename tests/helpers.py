"""Shared test helpers: tiny random HF models (Llama and every family), torch and our logits side by
side with their reported difference, tolerances, token batches, a jaxpr walk, the JSONL and metrics
files, the CLI in process and in a subprocess, import lists. Fixtures built from these live in
conftest.py."""

from __future__ import annotations

import ast
import functools
import json
import os
import sys

import numpy as np

TINY = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli_env() -> dict:
    """The environment for a `lora-jax` subprocess: the suite's compilation cache and this checkout."""
    env = dict(os.environ)
    env["JAX_COMPILATION_CACHE_DIR"] = os.environ.get(
        "LORA_JAX_TEST_CACHE", os.path.expanduser("~/.cache/lora_jax_test_xla")
    )
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


# fp32: the project's parity bound; bf16 has 8 mantissa bits (rel. step 2^-8 = 0.0039).
FP32_ATOL = 1e-4


def save_random_hf(out_dir, config, seed: int = 0, *, norm_std=0.1, weight_std=None, max_shard_size=None) -> str:
    """A random transformers CausalLM of `config` with every weight perturbed, so that a mix-up cannot
    pass: biases drawn with deviation 0.05, norm weights (RMSNorm, LayerNorm) moved by `norm_std`,
    the other weights drawn with `weight_std` where given; saved with save_pretrained in `out_dir`,
    which is returned."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
            elif "norm" in name or ".ln_" in name:
                p.add_(norm_std * torch.randn_like(p))
            elif weight_std is not None:
                p.copy_(weight_std * torch.randn_like(p))
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(os.fspath(out_dir), **kwargs)
    return os.fspath(out_dir)


def make_hf_tiny(out_dir, model_type: str = "llama", seed: int = 0, max_shard_size=None, **overrides) -> str:
    """A TINY random transformers model of a Llama-like `model_type` (`save_random_hf`); returns its
    directory."""
    import transformers

    config = transformers.AutoConfig.for_model(model_type, **{**TINY, **overrides})
    return save_random_hf(out_dir, config, seed, max_shard_size=max_shard_size)


def make_hf_llama(out_dir, seed: int = 0, max_shard_size=None, **overrides) -> str:
    """A TINY random transformers LlamaForCausalLM (`make_hf_tiny`); returns its directory."""
    return make_hf_tiny(out_dir, "llama", seed, max_shard_size, **overrides)


def hf_model(model_dir, **kw):
    """transformers' CausalLM from `model_dir` with eager attention, in eval mode (with
    `output_loading_info=True`, `(model, info)`)."""
    import transformers

    out = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", **kw)
    return (out[0].eval(), out[1]) if isinstance(out, tuple) else out.eval()


def torch_logits_of(model, ids) -> np.ndarray:
    """A torch CausalLM's (or PeftModel's) fp32 logits of `ids`."""
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(ids)).long()).logits.float().numpy()


def torch_logits(model_dir, input_ids: np.ndarray, dtype="float32") -> np.ndarray:
    import torch

    return torch_logits_of(hf_model(model_dir, dtype=getattr(torch, dtype)), input_ids)


@functools.cache
def _jitted(cfg, lcfg):
    import jax

    import lora_jax as lj

    model = lj.build_model(cfg)
    if lcfg is None:
        return jax.jit(lambda p, x: model.apply({"params": p}, x))
    return jax.jit(lambda p, lo, x: lj.apply(model, p, lo, lcfg, x))


def our_logits(cfg, params, lora=None, lcfg=None, *, ids) -> np.ndarray:
    """`lj.apply(lj.build_model(cfg), params, lora, lcfg, ids)`, or the plain model's logits without
    `lora` (jitted, cached per config)."""
    import jax.numpy as jnp

    if lora is None:
        return np.asarray(_jitted(cfg, None)(params, jnp.asarray(ids)))
    return np.asarray(_jitted(cfg, lcfg)(params, lora, jnp.asarray(ids)))


def report_diff(tag: str, label: str, diff: float, bound: float = FP32_ATOL) -> None:
    """Prints a measured max abs diff (`pytest -s` shows it) and holds it to `bound`."""
    print(f"[{tag}] {label}: max abs diff {diff:.3e} (bound {bound:.1e})")
    assert diff <= bound, f"{label}: max abs diff {diff:.3e} > {bound:.1e}"


def random_ids(vocab: int, shape=(2, 11), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=shape).astype(np.int32)


def tiny_ids(shape=(2, 13)):
    """Token ids for the TINY model (its vocabulary, seed 0) as a jax array."""
    import jax.numpy as jnp

    return jnp.asarray(random_ids(TINY["vocab_size"], shape))


def unpacked_batch(input_ids, targets, loss_mask) -> dict:
    """A training batch of [B, T] rows holding one document each: segment ids 1, positions 0..T-1."""
    b, t = input_ids.shape
    return {
        "input_ids": input_ids,
        "targets": targets,
        "loss_mask": loss_mask,
        "segment_ids": np.ones((b, t), np.int32),
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
    }


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def check_peft_both_ways(model_dir, cfg, params, out_dir, ids, tag: str, name: str = ""):
    """A random PEFT adapter (all-linear, r=4) on the transformers model at `model_dir`, both ways:
    loaded with `load_peft`, our logits equal PEFT's; our `save_peft` export loaded in PEFT equals
    ours; our merged export (`save_pretrained`) loads in transformers as the same architecture,
    equals ours, and reads back as `cfg`. Each difference is reported under `tag` within FP32_ATOL.
    Returns the adapter `(lora, lcfg)`."""
    import peft
    import torch

    import lora_jax as lj

    out_dir, label = os.fspath(out_dir), (name + " " if name else "")
    torch.manual_seed(1)
    pm = peft.get_peft_model(
        hf_model(model_dir),
        peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, r=4, lora_alpha=8, target_modules="all-linear"),
    ).eval()
    pm.save_pretrained(os.path.join(out_dir, "peft"))
    expected = torch_logits_of(pm, ids)

    # PEFT -> ours
    lora, lcfg = lj.load_peft(os.path.join(out_dir, "peft"), params)
    got = our_logits(cfg, params, lora, lcfg, ids=ids)
    assert max_diff(got, our_logits(cfg, params, ids=ids)) > 1e-3  # the adapter does something
    report_diff(tag, f"{label}PEFT->ours", max_diff(got, expected))

    # ours -> PEFT
    out = lj.save_peft(os.path.join(out_dir, "ours"), lora, lcfg, cfg, base_model_name_or_path=model_dir)
    pm2 = peft.PeftModel.from_pretrained(hf_model(model_dir), out).eval()
    report_diff(tag, f"{label}ours->PEFT", max_diff(torch_logits_of(pm2, ids), got))

    # merged export -> transformers
    merged = lj.save_pretrained(os.path.join(out_dir, "merged"), params, cfg, lora=lora, lcfg=lcfg)
    with open(os.path.join(merged, "config.json")) as f:
        written = json.load(f)
    assert written["model_type"] == cfg.model_type
    assert written["architectures"] == [type(hf_model(model_dir)).__name__]
    hf_merged = hf_model(merged)
    assert type(hf_merged).__name__ == written["architectures"][0]
    report_diff(tag, f"{label}merged export", max_diff(torch_logits_of(hf_merged, ids), got))
    cfg2, _ = lj.load_pretrained(merged)
    assert cfg2.replace(attention=cfg.attention) == cfg
    return lora, lcfg


# ------------------------------------------------------------------------------------------ programs
def jaxprs(jaxpr):
    """`jaxpr` (a Jaxpr or ClosedJaxpr) and every jaxpr nested in its equations' parameters (the
    bodies of jit, scan, remat, custom_vjp, ...), depth first."""
    from jax.extend.core import ClosedJaxpr, Jaxpr

    if isinstance(jaxpr, ClosedJaxpr):
        jaxpr = jaxpr.jaxpr
    yield jaxpr
    for eqn in jaxpr.eqns:
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                if isinstance(sub, (ClosedJaxpr, Jaxpr)):
                    yield from jaxprs(sub)


def all_eqns(jaxpr):
    """Every equation of `jaxpr` and of the jaxprs nested in it."""
    for j in jaxprs(jaxpr):
        yield from j.eqns


# ------------------------------------------------------------------------------------------ files
def write_jsonl(path, records) -> str:
    """One line per record: a str as it is (a malformed line, a blank one), anything else as JSON."""
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def step_losses(run_dir) -> list:
    """[(step, loss)] of every training record in RUN/metrics.jsonl."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


def steps_logged(run_dir) -> int:
    """The last training step in RUN/metrics.jsonl (0 when none yet), read while a run may still be
    writing it: a line without its newline is not complete and is skipped."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return max([json.loads(x).get("step", 0) for x in f if x.endswith("\n") and '"loss"' in x] or [0])


def bench_script(name: str):
    """The module of `experiments/bench/<name>.py`, loaded from its file (the scripts are not a
    package): tests reuse their shapes and run them on tiny inputs."""
    import importlib.util

    path = os.path.join(REPO, "experiments", "bench", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def module_imports(path) -> set[str]:
    """The module names a Python file imports (`import a.b` and `from a.b import c` give `a.b`), at
    any depth of its source; a relative `path` is read from the checkout's root."""
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


# ------------------------------------------------------------------------------------------ CLI
CLI = [sys.executable, "-m", "lora_jax.cli"]  # `lora-jax` in a subprocess (with env=cli_env())


def cli_error(capsys, argv, code: int = 2) -> str:
    """Run `lora_jax.cli.main(argv)` in process; it must exit with `code` and say why in one line on
    stderr (`lora-jax: error: ...` for a user error, status 2), which is returned."""
    from lora_jax.cli import main

    capsys.readouterr()
    status = main(argv)
    err = capsys.readouterr().err.strip()
    assert status == code, err[-3000:]
    prefix = "lora-jax: error:" if code == 2 else "lora-jax: "
    assert len(err.splitlines()) == 1 and err.startswith(prefix), err[-3000:]
    return err


# ------------------------------------------------------------------------------------------ families
# tiny random models of each family with the demo model's tokenizer (its 857-token vocabulary), so
# they train through `lora-jax train`; each differs from Llama where its family does
FAMILY_TINY = dict(
    {k: v for k, v in TINY.items() if k not in ("rms_norm_eps", "tie_word_embeddings")},
    vocab_size=857,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
FAMILY_OVERRIDES = {
    "qwen2": dict(tie_word_embeddings=True),  # q/k/v biases
    "qwen3": dict(head_dim=12),  # q/k norms; head_dim != hidden / heads
    "mistral": dict(sliding_window=6),  # narrower than the sequences
    "gemma3_text": dict(
        head_dim=8,
        sliding_window=6,
        layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=12,
        final_logit_softcapping=3.0,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            "full_attention": {"rope_type": "default", "rope_theta": 5000.0},
        },
    ),
    "gpt2": dict(n_positions=128, n_embd=32, n_layer=2, n_head=4),
}


def make_hf_family(
    out_dir, model_type: str, seed: int = 0, with_tokenizer: bool = True, weight_std: float | None = None, **overrides
) -> str:
    """A tiny random transformers model of `model_type` (FAMILY_OVERRIDES), every weight perturbed
    (norms and biases too, so a mix-up cannot pass), saved with save_pretrained together with the
    demo model's tokenizer files; returns the directory. `weight_std`: draw the other weights with
    this deviation (a larger one than the 0.02 init makes greedy decoding vary from token to token)."""
    import shutil

    import transformers

    from lora_jax.demo import DEMO_MODEL

    if model_type == "gpt2":
        ids = {k: FAMILY_TINY[k] for k in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")}
        config = transformers.GPT2Config(**ids, **{**FAMILY_OVERRIDES["gpt2"], **overrides})
    else:
        config = transformers.AutoConfig.for_model(
            model_type, **{**FAMILY_TINY, **FAMILY_OVERRIDES[model_type], **overrides}
        )
    if weight_std is None and model_type == "gemma3_text":
        weight_std = 0.1  # its embeddings are scaled up by sqrt(hidden)
    save_random_hf(out_dir, config, seed, weight_std=weight_std)
    if with_tokenizer:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(DEMO_MODEL, name), os.fspath(out_dir))
    return os.fspath(out_dir)
