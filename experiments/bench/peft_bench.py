"""PyTorch/PEFT LoRA training throughput benchmark: the baseline the JAX side is compared against.

Builds the family's transformers model (`AutoModelForCausalLM.from_config`: Llama, Qwen3, Gemma 3, by
the shape's `model_type`) from a shape in `shapes.py` with random weights (the GPU machine has no
internet), wraps it with PEFT LoRA (r=16, all seven projections: lora-jax's `all-linear`), and times full
training steps (forward, loss, backward, fused AdamW) on random token batches. Throughput is
turned into MFU with `lora_jax/flops.py`, loaded by file path so neither JAX nor the `lora_jax`
package (which imports JAX) is needed here.

Precision follows what `Trainer(bf16=True)` does with a bf16 model: frozen weights in bf16,
adapters upcast to fp32 by PEFT (`autocast_adapter_dtype=True`), forward under bf16 autocast so
the adapter matmuls also run on bf16 tensor cores. `--no-autocast` drops the autocast, which makes
PEFT run the adapter matmuls in fp32.

Each result is one line `RESULT {json}` on stdout (and optionally a JSON line appended to --out).
An out-of-memory config is reported with status "OOM" and its memory freed, so one process can
sweep several configs.

    python experiments/bench/peft_bench.py --shape 1b --batch 8 --seq 2048 --mode eager compile
    python experiments/bench/peft_bench.py --shape 8b --batch 1 --seq 8192 --grad-ckpt
    python experiments/bench/peft_bench.py --max-seq-search            # 8B, batch 1, grad ckpt
    python experiments/bench/peft_bench.py --shape qwen3-1.7b --batch 8 --seq 2048 --mode eager compile
    python experiments/bench/peft_bench.py --shape gemma-3-1b --batch 8 --seq 2048 --mode eager compile
    python experiments/bench/peft_bench.py --shape tiny --device cpu --batch 2 --seq 64 --steps 2
    python experiments/bench/peft_bench.py --shape gemma3-tiny --device cpu --batch 2 --seq 64 --steps 2 --warmup 1
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import statistics
import sys
import time
import traceback

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(os.path.dirname(_HERE))
sys.path.insert(0, _HERE)
from shapes import SHAPES, config_for, model_type  # noqa: E402


def _load_flops():
    """Import lora_jax/flops.py by path: `import lora_jax.flops` would import JAX via __init__."""
    spec = importlib.util.spec_from_file_location("lora_jax_flops", os.path.join(_REPO, "lora_jax", "flops.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


flops = _load_flops()

TARGETS = list(flops.ALL_TARGETS)  # Llama's names; a family's own are `_targets(config)`
MAX_SEQ_SEARCH_DEFAULT = (16384, 24576, 28672, 32768, 40960)
GIB = 2**30


def _versions() -> dict:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _is_oom(exc: BaseException) -> bool:
    """OOM can also surface wrapped (e.g. inside torch.compile/Triton errors), so check the text."""
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _targets(config) -> list[str]:
    """The family's projections (q/k/v/o, gate/up/down for Llama, Qwen3 and Gemma 3): lora-jax's
    `all-linear`, which leaves the LM head out as PEFT's does."""
    return list(flops.layout_of(config).names)


def build_model(shape: str, device: torch.device, r: int = 16, grad_ckpt: bool = False):
    """Random-init bf16 model of the shape's family directly on `device`, wrapped with PEFT LoRA on
    all its projections.

    Constructing under `torch.device(device)` with bf16 as default dtype avoids materialising an
    fp32 copy on the CPU first (32 GB for the 8B shape). No blanket `.to(bfloat16)`: that would
    also round the fp32 RoPE `inv_freq` buffer, which `from_pretrained(dtype=bfloat16)` keeps.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = config_for(shape, attn_implementation="sdpa", use_cache=False)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(previous)
    for param in model.parameters():  # no-op unless some version creates a parameter in fp32
        param.data = param.data.to(torch.bfloat16)
    if grad_ckpt:
        # Non-reentrant checkpointing works with frozen inputs and torch.compile; input grads are
        # enabled anyway as PEFT's own recipe does, so embeddings never cut the backward graph.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(r=r, lora_alpha=2 * r, target_modules=_targets(config), lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.train()
    return model, config


def _make_optimizer(model, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    except (RuntimeError, TypeError):  # fused kernel unavailable for this device/dtype
        return torch.optim.AdamW(params, lr=1e-4)


def _measure(shape, batch, seq, mode, grad_ckpt, device, steps, warmup, r, autocast) -> dict:
    """Build, warm up and time one config; everything it allocates dies with this frame."""
    model, config = build_model(shape, device, r=r, grad_ckpt=grad_ckpt)
    adapter_dtype = str(next(p.dtype for p in model.parameters() if p.requires_grad)).replace("torch.", "")
    optimizer = _make_optimizer(model, device)
    forward = torch.compile(model) if mode == "compile" else model
    input_ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()

    def train_step():
        with amp:
            loss = forward(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warm_times = []
    for _ in range(warmup):
        t0 = time.perf_counter()
        train_step()
        _sync(device)
        warm_times.append(time.perf_counter() - t0)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        train_step()
        _sync(device)
        times.append(time.perf_counter() - t0)

    step_s = statistics.median(times)
    tokens_per_s = batch * seq / step_s
    f_tok = flops.flops_per_token(config, seq, r, _targets(config))
    return {
        "tokens_per_s": tokens_per_s,
        "mfu_798": flops.mfu(tokens_per_s, f_tok, flops.PEAK_H100_MEASURED),
        "mfu_989": flops.mfu(tokens_per_s, f_tok, flops.PEAK_H100_DATASHEET),
        "peak_gib": torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None,
        "compile_s": warm_times[0] if warm_times else None,  # first step: includes compilation
        "warmup_s": sum(warm_times),
        "step_ms_median": 1e3 * step_s,
        "step_ms_min": 1e3 * min(times),
        "step_ms_max": 1e3 * max(times),
        "flops_per_token": f_tok,
        "adapter_dtype": adapter_dtype,
    }


def run_config(
    shape: str,
    batch: int,
    seq: int,
    mode: str = "eager",
    grad_ckpt: bool = False,
    device: str | torch.device = "cuda",
    steps: int = 10,
    warmup: int | None = None,
    r: int = 16,
    autocast: bool = True,
) -> dict:
    """Benchmark one config and return its result dict; never raises for OOM or runtime errors.

    Failures are reported in "status" ("OOM" or "error: ...") so a sweep can continue; memory is
    released after every config (the traceback, which pins the dead frame's tensors, is dropped
    before collecting).
    """
    device = torch.device(device)
    if warmup is None:
        warmup = 5 if mode == "compile" else 3
    result = {
        "system": "pytorch-peft",
        "mode": mode,
        "shape": shape,
        "model_type": model_type(shape),
        "batch": batch,
        "seq": seq,
        "remat": "full" if grad_ckpt else "none",
        "lora_r": r,
        "autocast_bf16": autocast,
        "steps": steps,
        "warmup": warmup,
        "status": "ok",
        "tokens_per_s": None,
        "mfu_798": None,
        "mfu_989": None,
        "peak_gib": None,
        "compile_s": None,
        "step_ms_median": None,
        **_versions(),
        "gpu": _device_name(device),
    }
    try:
        result.update(_measure(shape, batch, seq, mode, grad_ckpt, device, steps, warmup, r, autocast))
    except Exception as exc:  # noqa: BLE001 - report and keep sweeping
        if _is_oom(exc):
            result["status"] = "OOM"
        else:
            result["status"] = f"error: {type(exc).__name__}: {str(exc)[:300]}"
            traceback.print_exc()
        if device.type == "cuda":
            result["peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    finally:
        if mode == "compile":
            torch._dynamo.reset()  # compiled graphs hold references to the model's parameters
        _free_memory(device)
    return result


def max_seq_search(
    shape: str = "8b",
    seqs=MAX_SEQ_SEARCH_DEFAULT,
    mode: str = "eager",
    device: str | torch.device = "cuda",
    steps: int = 2,
    warmup: int = 1,
    r: int = 16,
    autocast: bool = True,
    emit=print,
):
    """Longest context that trains at batch 1 with gradient checkpointing, trying seqs ascending.

    Stops at the first failure, since memory grows with seq; returns (largest ok seq, results).
    """
    best, results = None, []
    for seq in sorted(seqs):
        res = run_config(shape, 1, seq, mode, True, device, steps, warmup, r, autocast)
        res["search"] = "max_seq"
        results.append(res)
        emit(res)
        if res["status"] != "ok":
            break
        best = seq
    return best, results


def _emitter(out_path: str | None):
    def emit(result: dict) -> None:
        line = json.dumps(result)
        print("RESULT " + line, flush=True)
        if out_path:
            with open(out_path, "a") as f:
                f.write(line + "\n")

    return emit


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--shape", choices=sorted(SHAPES), default=None, help="model shape (default: 1b, or 8b with --max-seq-search)"
    )
    p.add_argument("--batch", type=int, nargs="+", default=[8])
    p.add_argument(
        "--seq",
        type=int,
        nargs="+",
        default=None,
        help="sequence length(s) (default 2048, or the search list with --max-seq-search)",
    )
    p.add_argument("--mode", choices=["eager", "compile"], nargs="+", default=["eager"])
    p.add_argument("--grad-ckpt", action="store_true", help="non-reentrant gradient checkpointing")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 2 in search)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3 eager / 5 compile; 1 in search)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--no-autocast", action="store_true", help="no bf16 autocast: fp32 adapter matmuls")
    p.add_argument("--device", default="cuda")
    p.add_argument(
        "--max-seq-search",
        action="store_true",
        help=f"batch 1, grad ckpt, largest of --seq (default {list(MAX_SEQ_SEARCH_DEFAULT)}) that fits",
    )
    p.add_argument("--out", default=None, help="append each result as a JSON line to this file")
    args = p.parse_args(argv)
    cap = os.environ.get("BENCH_MEMORY_GIB")  # emulate a smaller card (e.g. 79.6 GiB, an H100 80GB)
    if cap and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, float(cap) * 2**30 / total))

    emit = _emitter(args.out)
    autocast = not args.no_autocast
    failed = False
    if args.max_seq_search:
        for mode in args.mode:
            best, results = max_seq_search(
                args.shape or "8b",
                args.seq or MAX_SEQ_SEARCH_DEFAULT,
                mode,
                args.device,
                steps=args.steps or 2,
                warmup=1 if args.warmup is None else args.warmup,
                r=args.rank,
                autocast=autocast,
                emit=emit,
            )
            summary = {
                "search": "max_seq_summary",
                "system": "pytorch-peft",
                "mode": mode,
                "shape": args.shape or "8b",
                "batch": 1,
                "remat": "full",
                "max_seq": best,
                "tried": [(r_["seq"], r_["status"]) for r_ in results],
            }
            emit(summary)
            failed |= any(r_["status"].startswith("error") for r_ in results)
        return int(failed)

    for mode in args.mode:
        for batch in args.batch:
            for seq in args.seq or [2048]:
                res = run_config(
                    args.shape or "1b",
                    batch,
                    seq,
                    mode,
                    args.grad_ckpt,
                    args.device,
                    args.steps or 10,
                    args.warmup,
                    args.rank,
                    autocast,
                )
                emit(res)
                failed |= res["status"].startswith("error")
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
