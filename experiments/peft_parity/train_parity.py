"""Training parity with transformers + PEFT, step for step, on a tiny random Llama (fp32, CPU).

    python experiments/peft_parity/train_parity.py [--steps 20] [--seq-len 16] [--config RUN.yaml]
                                                   [--set KEY=VALUE ...]

The run config is `RunConfig()`'s defaults (or `--config`'s file) with `--set` pairs, the keys of
`lora-jax train` (`optim.*`, `lora.*`, `train.batch_size`, `train.grad_accum`, `train.seed`,
`data.packing`, `model.scan_layers`, ...); the schedule runs over `--steps` (`train.steps` is not
used), the model is a tiny random Llama built here, in fp32 whatever `model.dtype` says. Both sides
start from the same adapters and see the same batches:

- ours: `init_lora` -> `split_trainable` -> `make_schedule` / `make_tx` -> `make_train_step` (the
  jitted step `lora-jax train` runs), on rows of one document each, right-padded, loss on the
  completion (the tokens after a prompt of random length), segments as `data.packing` says;
- theirs: the initial adapters exported with `save_peft`, loaded with
  `PeftModel.from_pretrained(is_trainable=True)`, trained by a plain torch loop as transformers'
  Trainer does it: `torch.optim.AdamW` (or `peft.optimizers.create_loraplus_optimizer`),
  transformers' scheduler, `clip_grad_norm_`, and gradient accumulation with the loss of each
  micro-batch summed over its tokens and divided by the loss tokens of the whole batch
  (`num_items_in_batch`, labels -100 elsewhere).

Printed: the largest relative difference over the run of the per-step loss, learning rate (on the
peak rate's scale) and pre-clip global gradient norm (what `clip_grad_norm_` returns), and of the
final adapters, ours exported with `save_peft`, PEFT's from `get_peft_model_state_dict`: per tensor
||ours - PEFT|| / ||PEFT|| ("adapters") and / ||PEFT - initial|| ("update", the difference in
what training changed). Exits 1 when one is above its tolerance (`TOLS`, or `--tol`), 2 on a
setting it cannot compare. `tests/test_train_parity.py` runs the same code.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import tempfile

import numpy as np

# the figures are for fp32 on the CPU; set before jax / transformers are imported
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
PAD = 0
# Relative tolerances. lr (on the peak rate's scale): fp32 schedule arithmetic against transformers'
# float64 (<= 1.3e-7 measured). loss: fp32 round-off of two implementations (<= 1e-6 measured).
# grad_norm, adapters: that round-off grown over 20-100 AdamW steps, up to 6e-5 measured (2-10x
# what re-ordering our own sums, scanned vs unrolled layers, gives): Adam moves a coordinate whose
# gradient is near eps by ~lr whatever the gradient's size, so an ulp there is amplified. update:
# the same difference over what training changed (<= 1.5e-4 measured). A difference in semantics
# is far larger: an lr one step off, LoRA+ on the wrong group, eps inside the root or per-micro-
# batch loss means each give 5e-3 to 1e0 on these figures.
TOLS = {"loss": 1e-5, "lr": 1e-6, "grad_norm": 1e-4, "adapters": 1e-4, "update": 1e-3}


class Unsupported(Exception):
    """A setting with no transformers/PEFT counterpart, or one this harness does not compare."""


# ---------------------------------------------------------------------------------------- inputs
def make_base(out_dir: str, seed: int = 0) -> str:
    """A tiny random LlamaForCausalLM saved with `save_pretrained` (norms perturbed off 1)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out_dir)
    return out_dir


def make_batches(steps: int, batch_size: int, seq_len: int, vocab: int, seed: int) -> list[dict]:
    """Per step, `batch_size` rows drawn from a pool of `2 * batch_size` random documents (so
    there is something to learn), one document a row: length in [seq_len/2, seq_len], right-padded
    with PAD; the first part of each document is a prompt (no loss), the rest a completion.

    Each batch holds our keys (`input_ids`, `targets`, `loss_mask`, `segment_ids`, `positions`)
    and PEFT's (`labels`: the token itself where it is a loss target, -100 elsewhere, before
    transformers' shift; `attention_mask`)."""
    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(2 * batch_size):
        n = int(rng.integers(seq_len // 2, seq_len + 1))
        pool.append((rng.integers(1, vocab, n).astype(np.int32), int(rng.integers(1, n // 2 + 1))))
    out = []
    for _ in range(steps):
        ids = np.full((batch_size, seq_len), PAD, np.int32)
        is_target = np.zeros((batch_size, seq_len), bool)
        for r, d in enumerate(rng.choice(len(pool), batch_size, replace=False)):
            doc, prompt = pool[d]
            ids[r, : len(doc)] = doc
            is_target[r, prompt : len(doc)] = True  # token t is predicted from t - 1
        doc = ids != PAD
        out.append(
            {
                "input_ids": ids,
                "targets": np.concatenate([ids[:, 1:], np.full((batch_size, 1), PAD, np.int32)], 1),
                "loss_mask": np.concatenate([is_target[:, 1:], np.zeros((batch_size, 1), bool)], 1).astype(np.float32),
                "segment_ids": doc.astype(np.int32),
                "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), ids.shape).copy(),
                "labels": np.where(is_target, ids, -100).astype(np.int64),
                "attention_mask": doc.astype(np.int64),
            }
        )
    return out


OURS_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")


def check_comparable(run, steps: int) -> None:
    """Refuse what the two sides cannot run identically."""
    if run.lora.lora_dropout:
        raise Unsupported(
            f"lora.lora_dropout={run.lora.lora_dropout}: the two sides draw different "
            "dropout masks; set lora.lora_dropout=0"
        )
    if run.lora.init_lora_weights == "pissa":
        raise Unsupported("lora.init_lora_weights=pissa changes the base model; not compared here")
    if run.model.quantize:
        raise Unsupported(
            f"model.quantize={run.model.quantize}: a quantised base has no PEFT "
            "counterpart here; set model.quantize=null"
        )
    o = run.optim
    if o.schedule == "linear" and o.min_lr_ratio and warmup_of(o, steps):
        raise Unsupported(
            "optim.schedule=linear with optim.min_lr_ratio > 0 and a warmup has no "
            "transformers counterpart (its warmup_stable_decay warms up from "
            "min_lr_ratio * lr, not from 0); drop the warmup or the floor"
        )


def warmup_of(ocfg, steps: int) -> int:
    """The warmup our schedule runs (`optim.truncate_warmup` cuts it to the run)."""
    if ocfg.truncate_warmup:
        return min(ocfg.warmup_steps, max(steps - 1, 0))
    return ocfg.warmup_steps


# ------------------------------------------------------------------------------------------- ours
def run_ours(model_dir: str, run, steps: int, batches: list[dict], adapter_dir: str) -> dict:
    """Our real train step; writes the initial adapter (PEFT format) to `adapter_dir`/init and the
    final one to `adapter_dir`/final. Returns per-step metrics."""
    import jax

    import lora_jax as lj
    from lora_jax.train.step import init_state, make_schedule, make_train_step, make_tx

    lcfg, ocfg, tcfg = run.lora, run.optim, run.train
    cfg, params = lj.load_pretrained(
        model_dir,
        dtype="float32",
        scan_layers=run.model.scan_layers,
        remat_policy=run.model.remat_policy,
        attention=run.model.attention,
    )
    lora = lj.init_lora(params, lcfg, jax.random.key(tcfg.seed))
    lj.save_peft(
        os.path.join(adapter_dir, "init"),
        lora,
        lcfg,
        cfg,
        base_model_name_or_path=model_dir,
        params=params if lcfg.modules_to_save else None,
    )
    split = lj.split_trainable(params, lora, lcfg)
    schedule = make_schedule(ocfg, steps)
    tx = make_tx(lcfg, ocfg, schedule)
    state = init_state(split.trainable, tx, tcfg.seed)
    step = make_train_step(
        lj.Llama(cfg),
        cfg,
        lcfg,
        tx,
        schedule,
        grad_accum=tcfg.grad_accum,
        chunk_tokens=run.model.loss_chunk_tokens,
        use_segments=run.data.packing,
    )
    hist: dict[str, list[float]] = {"loss": [], "lr": [], "grad_norm": []}
    for batch in batches:
        state, m = step(state, split.frozen, {k: batch[k] for k in OURS_KEYS})
        m = jax.device_get(m)
        for k in hist:
            hist[k].append(float(m[k]))
    trained_params, trained_lora = lj.combine(state.trainable, split.frozen)
    lj.save_peft(
        os.path.join(adapter_dir, "final"),
        trained_lora,
        lcfg,
        cfg,
        params=trained_params if lcfg.modules_to_save else None,
    )
    return {k: np.asarray(v) for k, v in hist.items()}


# ----------------------------------------------------------------------------------------- theirs
def hf_scheduler(optimizer, ocfg, steps: int):
    """transformers' scheduler for our `optim.schedule` / `warmup_steps` / `min_lr_ratio`."""
    import transformers

    warmup, ratio = warmup_of(ocfg, steps), ocfg.min_lr_ratio
    if ocfg.schedule == "constant":
        return transformers.get_constant_schedule_with_warmup(optimizer, warmup)
    if ocfg.schedule == "linear":
        if not ratio:
            return transformers.get_linear_schedule_with_warmup(optimizer, warmup, steps)
        return transformers.get_wsd_schedule(
            optimizer,
            num_warmup_steps=0,
            num_decay_steps=steps,
            num_stable_steps=0,
            decay_type="linear",
            min_lr_ratio=ratio,
        )
    if not ratio:
        return transformers.get_cosine_schedule_with_warmup(optimizer, warmup, steps)
    return transformers.get_scheduler(
        "cosine_with_min_lr",
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=steps,
        scheduler_specific_kwargs={"min_lr_rate": ratio},
    )


def run_peft(model_dir: str, run, steps: int, batches: list[dict], adapter_dir: str) -> dict:
    """PeftModel + torch AdamW (or LoRA+) + transformers' scheduler + clip_grad_norm_, with
    transformers' loss normalisation under gradient accumulation."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only contend (10-80x slower on 2 busy cores)
    try:
        return _run_peft(model_dir, run, steps, batches, adapter_dir)
    finally:
        torch.set_num_threads(threads)


def _run_peft(model_dir: str, run, steps: int, batches: list[dict], adapter_dir: str) -> dict:
    import peft
    import torch
    import transformers
    from peft.optimizers import create_loraplus_optimizer

    lcfg, ocfg, tcfg = run.lora, run.optim, run.train
    base = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    pm = peft.PeftModel.from_pretrained(base, os.path.join(adapter_dir, "init"), is_trainable=True)
    pm.train()
    trainable = [p for p in pm.parameters() if p.requires_grad]
    adam = dict(betas=(ocfg.b1, ocfg.b2), eps=ocfg.eps)
    if lcfg.loraplus_lr_ratio:
        opt = create_loraplus_optimizer(
            pm,
            torch.optim.AdamW,
            lr=ocfg.lr,
            loraplus_lr_ratio=lcfg.loraplus_lr_ratio,
            loraplus_weight_decay=ocfg.weight_decay,
            **adam,
        )
    else:
        opt = torch.optim.AdamW(trainable, lr=ocfg.lr, weight_decay=ocfg.weight_decay, **adam)
    sched = hf_scheduler(opt, ocfg, steps)
    clip = ocfg.clip_norm if ocfg.clip_norm else math.inf
    hist: dict[str, list[float]] = {"loss": [], "lr": [], "grad_norm": []}
    accum = tcfg.grad_accum
    for batch in batches:
        t = {k: torch.from_numpy(batch[k]) for k in ("input_ids", "labels", "attention_mask")}
        # transformers' Trainer: loss tokens of the whole (accumulated) batch, after the shift
        n_items = (t["labels"][:, 1:] != -100).sum()
        loss_total = 0.0
        for mb in zip(*(v.chunk(accum) for v in t.values())):
            out = pm(**dict(zip(t, mb)), num_items_in_batch=n_items)
            out.loss.backward()
            loss_total += out.loss.item()
        gn = torch.nn.utils.clip_grad_norm_(trainable, clip)
        hist["loss"].append(loss_total)
        hist["grad_norm"].append(float(gn))
        hist["lr"].append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return {
        "hist": {k: np.asarray(v) for k, v in hist.items()},
        "state": {k: v.detach().numpy().copy() for k, v in peft.get_peft_model_state_dict(pm).items()},
    }


# ---------------------------------------------------------------------------------------- compare
def rel_diff(a, b) -> float:
    """||a - b|| / ||b|| (Frobenius; 0 when both are all zero)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale, diff = np.linalg.norm(b), np.linalg.norm(a - b)
    return float(diff / scale) if scale else float(diff)


def max_rel_diff(a, b) -> float:
    """max |a - b| / max |b|: the worst single element, on the tensor's scale."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale, diff = np.max(np.abs(b)), np.max(np.abs(a - b))
    return float(diff / scale) if scale else float(diff)


def scalar_rel_diff(a, b, scale=None) -> float:
    """The largest per-step relative difference of a scalar series: each step on its own scale,
    or on `scale` (the learning rate's peak: near the end of a decay to 0 the rate itself is a
    cancellation, `1 + cos` in fp32, and only its difference from the peak's scale matters)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.maximum(np.abs(b) if scale is None else scale, 1e-30)
    return float(np.max(np.where((a == b), 0.0, np.abs(a - b) / scale)))


def compare(
    run, steps: int = 20, seq_len: int = 16, model_seed: int = 0, data_seed: int = 0, workdir: str | None = None
) -> dict:
    """Train both sides; return the largest relative differences and both trajectories."""
    from safetensors.numpy import load_file

    check_comparable(run, steps)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        model_dir = make_base(os.path.join(tmp, "base"), model_seed)
        batches = make_batches(steps, run.train.batch_size, seq_len, TINY["vocab_size"], data_seed)
        ours = run_ours(model_dir, run, steps, batches, os.path.join(tmp, "adapter"))
        theirs = run_peft(model_dir, run, steps, batches, os.path.join(tmp, "adapter"))
        init = load_file(os.path.join(tmp, "adapter", "init", "adapter_model.safetensors"))
        final = load_file(os.path.join(tmp, "adapter", "final", "adapter_model.safetensors"))
    peft_state = theirs["state"]
    if sorted(final) != sorted(peft_state):
        raise AssertionError(
            f"adapter keys differ: ours only {sorted(set(final) - set(peft_state))[:4]}; "
            f"PEFT only {sorted(set(peft_state) - set(final))[:4]}"
        )
    adapters = {k: rel_diff(final[k], peft_state[k]) for k in final}
    h = theirs["hist"]
    result = {
        "loss": scalar_rel_diff(ours["loss"], h["loss"]),
        "lr": scalar_rel_diff(ours["lr"], h["lr"], scale=np.max(np.abs(h["lr"]))),
        "grad_norm": scalar_rel_diff(ours["grad_norm"], h["grad_norm"]),
    }
    result["adapters"] = max(adapters.values())
    # the same difference relative to what training changed: ||ours - PEFT|| / ||PEFT - initial||
    result["update"] = max(rel_diff(final[k] - init[k], peft_state[k] - init[k]) for k in init)
    return {
        "max_rel": result,
        "worst_tensor": max(adapters, key=adapters.get),
        "elementwise": max(max_rel_diff(final[k], peft_state[k]) for k in final),
        "ours": ours,
        "theirs": theirs["hist"],
        "per_tensor": adapters,
    }


def run_config(sets: list[str], path: str | None = None):
    """`RunConfig()` (or the YAML run config at `path`, as `lora-jax train --config` reads it)
    with `--set` pairs applied."""
    from lora_jax.config import RunConfig

    base = RunConfig() if path is None else _load_config(path)
    return base.with_overrides(list(sets))


def _load_config(path: str):
    from lora_jax.cli import load_run_config

    return load_run_config(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps (default 20)")
    ap.add_argument("--seq-len", type=int, default=16, help="tokens per row (default 16)")
    ap.add_argument(
        "--config",
        default=None,
        metavar="RUN.yaml",
        help="a run config file, as `lora-jax train --config` takes (default: RunConfig())",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a run-config override, as in `lora-jax train --set` (repeatable)",
    )
    ap.add_argument(
        "--tol",
        type=float,
        default=None,
        help="one relative tolerance for every figure (default: "
        + ", ".join(f"{k} {v:g}" for k, v in TOLS.items())
        + ")",
    )
    ap.add_argument("--model-seed", type=int, default=0)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--verbose", action="store_true", help="print both trajectories step by step")
    args = ap.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # PEFT on transformers 5
    from lora_jax.errors import ConfigError

    try:
        run = run_config(args.set, args.config)
        if args.steps < 1 or args.seq_len < 4:
            raise Unsupported("--steps must be >= 1 and --seq-len >= 4")
        res = compare(run, args.steps, args.seq_len, args.model_seed, args.data_seed)
    except (ConfigError, Unsupported) as e:
        print(f"train_parity: {e}", file=sys.stderr)
        return 2
    if args.verbose:
        o, t = res["ours"], res["theirs"]
        print("step  loss (ours, PEFT)        lr (ours, PEFT)            grad_norm (ours, PEFT)")
        for i in range(args.steps):
            print(
                f"{i:4d}  {o['loss'][i]:.7f} {t['loss'][i]:.7f}  {o['lr'][i]:.6e} {t['lr'][i]:.6e}  "
                f"{o['grad_norm'][i]:.6e} {t['grad_norm'][i]:.6e}"
            )
    lc = run.lora
    print(
        f"steps={args.steps} batch_size={run.train.batch_size} grad_accum={run.train.grad_accum} "
        f"seq_len={args.seq_len} packing={run.data.packing} | lora r={lc.r} alpha={lc.lora_alpha} "
        f"targets={lc.target_modules} rslora={lc.use_rslora} dora={lc.use_dora} "
        f"loraplus_lr_ratio={lc.loraplus_lr_ratio}"
    )
    print("optim " + " ".join(f"{k}={v}" for k, v in dataclasses.asdict(run.optim).items()))
    o = res["ours"]
    print(
        f"loss {o['loss'][0]:.4f} -> {o['loss'][-1]:.4f}; lr {o['lr'][0]:.3g} -> {o['lr'][-1]:.3g}; "
        f"pre-clip grad norm {o['grad_norm'].min():.3g}..{o['grad_norm'].max():.3g}"
    )
    bad = []
    for name, v in res["max_rel"].items():
        tol = TOLS[name] if args.tol is None else args.tol
        note = (
            f"  [{res['worst_tensor']}; worst element {res['elementwise']:.2e} of its tensor's max]"
            if name == "adapters"
            else ""
        )
        print(f"max rel diff {name:<9s} {v:.2e}  (tol {tol:g}) {'ok' if v <= tol else 'ABOVE'}{note}")
        if v > tol:
            bad.append(name)
    print("PASS" if not bad else f"FAIL: {', '.join(bad)} above tolerance")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
