"""The product's throughput: `lora-jax train` with a shipped config on a packed JSONL corpus.

What users run is what this times: the CLI's own config reader and `train()` (tokenizer, loader,
packing with segment ids, the attention kernel `model.attention=auto` picks, logging, evaluation
at the start and end, a checkpoint at the last step, the PEFT export). Nothing is downloaded: once
per shape it writes, under `--work`, a random-weight Hugging Face model (transformers, bf16
safetensors), a word-level tokenizer covering its vocabulary, and a corpus of `{"text"}` documents
of `--doc-words` random words (one token each). Prints `RESULT {json}`: the loop's tokens/s (its
own summary, first step excluded), the median step of `metrics.jsonl`, MFU, peak device memory,
compile seconds.

    python experiments/bench/cli_bench.py --shape 1b --config experiments/configs/llama-3.2-1b.yaml
    python experiments/bench/cli_bench.py --shape 8b --config experiments/configs/llama-3-8b.yaml --steps 8
    python experiments/bench/cli_bench.py --shape 8b --config experiments/configs/llama-3-8b-long.yaml \\
        --doc-words 139264 139264 --steps 3                     # one long document per row
    python experiments/bench/cli_bench.py --shape qwen3-1.7b --config experiments/configs/qwen3-1.7b.yaml
    python experiments/bench/cli_bench.py --shape gemma-3-1b --config experiments/configs/gemma-3-1b.yaml
    python experiments/bench/cli_bench.py --shape tiny --steps 5 --work /tmp/bench  # CPU smoke test
    python experiments/bench/cli_bench.py --shape gemma3-tiny --config experiments/configs/gemma-3-1b.yaml \\
        --steps 3 --set data.seq_len=64 --set train.batch_size=2 --doc-words 20 60 --work /tmp/bench  # CPU
    python experiments/bench/cli_bench.py --shape 1b --config experiments/configs/llama-3.2-1b.yaml \\
        --quantize fp8 --corpus zipf --steps 100 --hlo-dump hlo-1b-fp8    # FP8 base (issue #21)
    python experiments/bench/cli_bench.py --shape tiny --steps 5 --quantize fp8 --fp8-gemm on \\
        --fp8-scaling tensor --hlo-dump hlo --work /tmp/bench     # CPU: FP8 GEMMs emulated, HLO counted

FP8 rows (`--quantize fp8`, the same as `--set model.quantize=fp8`) also report `mfu_1979`, MFU
against the FP8 datasheet peak; every row reports `mfu_989` against the bf16 one, and `losses`, the
loss of every step (`--corpus zipf` gives a corpus whose loss moves).

The architecture is the shape's (shapes.py, each with its `model_type`); the config gives only the
run settings, so pair a family's shape with its config. FLOPs and MFU are the loop's own
(`lora_jax/flops.py`, read off the loaded model's config: per-family widths, Gemma's window).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))
sys.path.insert(0, _HERE)
sys.path.insert(0, _ROOT)

from shapes import config_for, get_shape  # noqa: E402

GIB = 2**30
PEAK_BF16, PEAK_FP8 = 989, 1979  # dense TFLOP/s, H100/H200 SXM datasheet (bf16, FP8)


def make_model(shape: str, out: str) -> None:
    """A random model of `shape`, built by transformers for the shape's family (`AutoConfig.for_model`
    of its `model_type`, `AutoModelForCausalLM.from_config`: Llama, Qwen3, Gemma 3) and saved as bf16
    safetensors, plus a word-level tokenizer whose words `w0 ... w{vocab-1}` are the token ids. Runs
    in its own process so torch frees the device before JAX starts."""
    import numpy as np
    import tokenizers
    import torch
    import transformers

    hf = get_shape(shape)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config_for(shape), dtype=torch.bfloat16)
    with torch.no_grad():  # random, non-zero weights everywhere (norms too)
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.02 if p.ndim > 1 else 0.1) + (1.0 if p.ndim == 1 else 0.0))
    tmp = out + ".tmp"
    model.save_pretrained(tmp, safe_serialization=True)
    vocab = {f"w{i}": i for i in range(hf["vocab_size"])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    bos, eos = hf.get("bos_token_id"), hf.get("eos_token_id")
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=f"w{1 if bos is None else bos}",
        eos_token=f"w{2 if eos is None else np.atleast_1d(eos)[0]}",
        **({"pad_token": f"w{hf['pad_token_id']}"} if hf.get("pad_token_id") is not None else {}),
    )
    fast.save_pretrained(tmp)
    os.replace(tmp, out)


CORPORA = ("random", "zipf")


def make_corpus(
    path: str, n_tokens: int, words: tuple[int, int], vocab: int, seed: int = 0, kind: str = "random"
) -> None:
    """`{"text"}` JSONL of random-length documents, about `n_tokens` in all, of words drawn
    uniformly ("random": nothing to learn, the loss stays near log(vocab)), or ("zipf") from 4,096
    words of Zipfian frequency (exponent 1.1), each word followed half the time by its fixed
    successor: something an adapter learns within a hundred steps (a loss curve that moves, for
    comparing recipes). Token ids, hence step times, are alike either way."""
    import numpy as np

    rng = np.random.default_rng(seed)
    hi = min(vocab, 128000) if vocab > 128000 else vocab - 8  # keep clear of the special ids
    words_k = np.arange(8, hi)
    if kind == "zipf":
        words_k = rng.permutation(words_k)[:4096]
        p = 1.0 / np.arange(1, len(words_k) + 1) ** 1.1
        p /= p.sum()
        successor = dict(zip(words_k.tolist(), rng.permutation(words_k).tolist()))
    total = 0
    with open(path + ".tmp", "w") as f:
        while total < n_tokens:
            n = int(rng.integers(words[0], words[1] + 1))
            if kind == "zipf":
                ids = rng.choice(words_k, n, p=p).tolist()
                follow = rng.random(n) < 0.5
                for i in range(1, n):
                    if follow[i]:
                        ids[i] = successor[ids[i - 1]]
            else:
                ids = rng.integers(8, hi, n).tolist()
            f.write(json.dumps({"text": " ".join(f"w{i}" for i in ids)}) + "\n")
            total += n
    os.replace(path + ".tmp", path)


def _step_times(run_dir: str) -> list[float]:
    """`step_s` of every logged step after the first (compiling) one, in order."""
    steps = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "step_s" in rec and rec["step"] > 1:
                steps.append(rec["step_s"])
    return steps


def _losses(run_dir: str) -> list[float]:
    """The training loss of every step, in order (`metrics.jsonl` has one line per step)."""
    out = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "loss" in rec and "step_s" in rec:
                out.append(rec["loss"])
    return out


def apply_fp8_options(args) -> None:
    """`--fp8-scaling` / `--fp8-gemm`: the settings of every `Fp8Kernel` the loader makes, through
    the quantiser it calls (`lora_jax.quant.quantize_fp8`), since the run config has no field for
    them. Part of each kernel's static spec, so of every jit cache key."""
    if args.fp8_scaling is None and args.fp8_gemm == "auto":
        return
    from lora_jax import fp8, quant

    def quantize_fp8(w, **kw):
        k = fp8.quantize_fp8(w, scaling=args.fp8_scaling or "row", **kw)
        return fp8.Fp8Kernel(k.codes, k.scale, k.spec._replace(gemm=True)) if args.fp8_gemm == "on" else k

    quant.quantize_fp8 = quantize_fp8


F8_CALL = "__cublas$lt$matmul$f8"


def hlo_calls(dump_dir: str) -> dict[str, dict[str, int]]:
    """{file: {custom-call target: count}} of each compiled train step under `dump_dir` (its
    `*after_optimizations.txt`): FP8 GEMMs show as `__cublas$lt$matmul$f8`."""
    import collections
    import glob
    import re

    out = {}
    for path in sorted(glob.glob(os.path.join(dump_dir, "*jit_train_step*after_optimizations.txt"))):
        with open(path) as f:
            out[os.path.basename(path)] = dict(
                collections.Counter(re.findall(r'custom_call_target="([^"]+)"', f.read()))
            )
    return out


def run(args) -> dict:
    import jax

    from lora_jax.cli import load_run_config
    from lora_jax.train.loop import train

    model_dir = os.path.join(args.work, f"model-{args.shape}")
    if not os.path.isdir(model_dir):
        t = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--make-model", args.shape, "--work", args.work], check=True)
        print(f"model written in {time.perf_counter() - t:.0f} s", flush=True)
    run_cfg = load_run_config(args.config).with_overrides(
        [f"model.path={model_dir}", f"train.steps={args.steps}", *args.overrides]
    )
    seq, batch = run_cfg.data.seq_len, run_cfg.train.batch_size
    need = int(args.steps * batch * seq * 1.3 / (1 - run_cfg.data.eval_fraction)) + 2 * seq
    vocab = get_shape(args.shape)["vocab_size"]
    corpus = "" if args.corpus == "random" else f"-{args.corpus}"
    data = os.path.join(args.work, f"corpus-{args.shape}{corpus}-{args.doc_words[0]}-{args.doc_words[1]}-{need}.jsonl")
    if not os.path.isfile(data):
        make_corpus(data, need, tuple(args.doc_words), vocab, kind=args.corpus)
    apply_fp8_options(args)
    out = os.path.join(args.work, f"run-{args.shape}-{os.getpid()}")
    run_cfg = run_cfg.with_overrides([f"data.train_file={data}", f"train.output_dir={out}"])
    result = {
        "system": "lora-jax train",
        "shape": args.shape,
        "model_type": get_shape(args.shape).get("model_type", "llama"),
        "config": os.path.relpath(args.config, _ROOT) if args.config else "demo",
        "overrides": args.overrides,
        "batch": batch,
        "seq": seq,
        "grad_accum": run_cfg.train.grad_accum,
        "packed": run_cfg.data.packing,
        "doc_words": args.doc_words,
        "remat": run_cfg.model.remat_policy,
        "attention": run_cfg.model.attention,
        "dropout": run_cfg.lora.lora_dropout,
        "quantize": run_cfg.model.quantize,
        **({"fp8_scaling": args.fp8_scaling or "row"} if run_cfg.model.quantize == "fp8" else {}),
        **({"fp8_gemm": args.fp8_gemm} if args.fp8_gemm != "auto" else {}),
        "corpus": args.corpus,
        "output_dir": out,
        "gpu": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        **({"cudnn_layout": "flat"} if args.cudnn_flat else {}),
    }
    try:
        t = time.perf_counter()
        summary = train(run_cfg, progress=False)
        result.update(
            status="ok",
            wall_s=time.perf_counter() - t,
            tokens_per_s=summary["tokens_per_s"],
            checkpoint_s=summary.get("checkpoint_s"),
            mfu_798=summary["mfu"],
            compile_s=summary["compile_s"],
            setup_s=summary["setup_s"],
            loss_first=summary["train_loss_first"],
            loss_last=summary["train_loss_last"],
            rows=summary["data"].get("n_train_rows"),
        )
        steps = _step_times(out)
        if steps:  # where the loop's time goes: a slow outlier shows against the median
            result["tokens_per_s_median_step"] = batch * seq / statistics.median(steps)
            result["step_s"] = [round(x, 4) for x in steps]
        result["losses"] = _losses(out)
        if result["mfu_798"]:  # the loop divides by 798 TFLOP/s; the H200's datasheet peaks instead
            result["mfu_989"] = result["mfu_798"] * 798 / PEAK_BF16
            if run_cfg.model.quantize == "fp8":
                result["mfu_1979"] = result["mfu_798"] * 798 / PEAK_FP8
    except Exception as e:  # an out-of-memory step is a result, not a crash of the suite
        msg = f"{type(e).__name__}: {e}"
        result.update(
            status="OOM" if "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower() else "error", error=msg[:2000]
        )
        traceback.print_exc()
    if args.hlo_dump:
        result["hlo_calls"] = hlo_calls(args.hlo_dump)
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        result["peak_gib"] = stats["peak_bytes_in_use"] / GIB
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--shape", default="1b", help="a shape of experiments/bench/shapes.py (its model_type picks the family)"
    )
    p.add_argument("--config", default=None, help="a run config YAML (default: the demonstration's)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument(
        "--doc-words",
        type=int,
        nargs=2,
        default=[200, 1800],
        metavar=("MIN", "MAX"),
        help="document lengths in words = tokens (default 200 1800)",
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--work", default=os.environ.get("BENCH_WORK", "/tmp/lora_jax_bench"))
    p.add_argument(
        "--cudnn-flat",
        action="store_true",
        help="packed cuDNN attention over the whole batch as one row (the kernel's other layout)",
    )
    p.add_argument("--corpus", choices=CORPORA, default="random", help="what the documents are made of (make_corpus)")
    p.add_argument("--quantize", choices=("nf4", "int8", "fp8"), help="the same as --set model.quantize=...")
    p.add_argument(
        "--fp8-scaling",
        choices=("row", "tensor"),
        help="with an FP8 base: how x and dy are scaled (lora_jax.fp8.quantize_fp8; default row)",
    )
    p.add_argument(
        "--fp8-gemm",
        choices=("auto", "on"),
        default="auto",
        help="on: FP8 GEMMs even where the device has none (XLA emulates them: a CPU smoke test)",
    )
    p.add_argument(
        "--hlo-dump",
        metavar="DIR",
        help="write the compiled HLO of the train step (module jit_train_step) under DIR, relative to --work "
        "(XLA_FLAGS --xla_dump_to), and count its custom calls into the result (hlo_calls)",
    )
    p.add_argument("--make-model", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quantize:
        args.overrides = [f"model.quantize={args.quantize}", *args.overrides]
    os.makedirs(args.work, exist_ok=True)
    if args.hlo_dump:  # read when jax initialises its backend, after this
        args.hlo_dump = os.path.join(args.work, args.hlo_dump)  # a relative path lies under --work
        flags = f"--xla_dump_to={args.hlo_dump} --xla_dump_hlo_module_re=jit_train_step --xla_dump_hlo_as_text"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
    if args.cudnn_flat:
        import functools

        from lora_jax.models import attention as attention_module

        attention_module._cudnn_packed = functools.partial(attention_module._cudnn_packed, flatten=True)
    if args.make_model:
        make_model(args.make_model, os.path.join(args.work, f"model-{args.make_model}"))
        return 0
    print("RESULT " + json.dumps(run(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
