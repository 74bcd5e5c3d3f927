"""Shared test helpers: tiny random HF Llamas, torch reference logits, tolerances, token batches,
a jaxpr walk, the JSONL and metrics files, the CLI in process and in a subprocess, import lists.
Fixtures built from these live in conftest.py."""

from __future__ import annotations

import ast
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


def make_hf_llama(out_dir, seed: int = 0, max_shard_size=None, **overrides):
    """Build a random transformers LlamaForCausalLM, perturb every weight (norms included, so a
    mix-up of norm scales cannot pass), save it with save_pretrained, return the directory."""
    import torch
    import transformers

    kw = dict(TINY)
    kw.update(overrides)
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**kw)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(os.fspath(out_dir), **kwargs)
    return os.fspath(out_dir)


def torch_logits(model_dir, input_ids: np.ndarray, dtype="float32") -> np.ndarray:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, dtype), attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        out = model(torch.from_numpy(np.asarray(input_ids)).long()).logits
    return out.float().numpy()


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
    vocab_size=857,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
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

    import torch
    import transformers

    from lora_jax.demo import DEMO_MODEL

    torch.manual_seed(seed)
    if model_type == "gpt2":
        ids = {k: FAMILY_TINY[k] for k in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")}
        config = transformers.GPT2Config(**ids, **{**FAMILY_OVERRIDES["gpt2"], **overrides})
    else:
        config = transformers.AutoConfig.for_model(
            model_type, **{**FAMILY_TINY, **FAMILY_OVERRIDES[model_type], **overrides}
        )
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
            elif "norm" in name or ".ln_" in name or name.startswith("transformer.ln_f"):
                p.add_(0.1 * torch.randn_like(p))
            elif weight_std is not None:
                p.copy_(weight_std * torch.randn_like(p))
            elif model_type == "gemma3_text":
                p.copy_(0.1 * torch.randn_like(p))  # its embeddings are scaled up by sqrt(hidden)
    model.save_pretrained(os.fspath(out_dir))
    if with_tokenizer:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(DEMO_MODEL, name), os.fspath(out_dir))
    return os.fspath(out_dir)
