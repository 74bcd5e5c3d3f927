"""Write a Flax Llama as a Hugging Face model directory (config.json + safetensors, sharded + index
above `max_shard_size`), tensor by tensor, into a temporary directory renamed into place at the end,
so a failure never leaves a half-written model behind.

A quantised base (`lora_jax.quant`, QLoRA) is written dequantised, one layer slice at a time, in
fp32 arithmetic cast once to the export dtype; merged with adapters, the merge runs on that fp32
slice (dequantise, add s*A@B in fp32, cast once)."""

from __future__ import annotations

import functools
import json
import os
import shutil
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from lora_jax.config import LlamaConfig
from lora_jax.errors import ConfigError
from lora_jax.hf.load import np_dtype
from lora_jax.hf.names import flax_path, hf_entries
from lora_jax.quant import dequantize, is_quantized

__all__ = ["save_pretrained", "parse_size", "atomic_dir", "TOKENIZER_FILES"]

_NP_DTYPE_NAMES = ("float32", "bfloat16", "float16")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "chat_template.jinja", "generation_config.json")


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
                       ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


class atomic_dir:
    """Context manager: write into `<out>.tmp-<pid>`, then replace `out` only on success."""

    def __init__(self, out_dir: str, overwrite: bool = True):
        self.out = os.path.abspath(os.fspath(out_dir))
        if os.path.exists(self.out) and not overwrite:
            raise ConfigError(f"{self.out} already exists; choose another directory or pass overwrite=True")
        self.tmp = f"{self.out}.tmp-{os.getpid()}"

    def __enter__(self) -> str:
        shutil.rmtree(self.tmp, ignore_errors=True)
        os.makedirs(self.tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if os.path.exists(self.out):
            old = f"{self.out}.old-{os.getpid()}"
            os.rename(self.out, old)
            os.rename(self.tmp, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.makedirs(os.path.dirname(self.out) or ".", exist_ok=True)
            os.rename(self.tmp, self.out)
        return False


def _get(tree, path):
    node = tree
    for p in path:
        node = node[p]
    return node


def hf_tensors(params, cfg: LlamaConfig, dtype: str, entries=None) -> Iterator[tuple[str, np.ndarray]]:
    """(HF key, torch-layout numpy tensor), one at a time, fetched from device as needed."""
    target = np_dtype(dtype)
    for e in hf_entries(cfg) if entries is None else entries:
        leaf = _get(params, flax_path(e, cfg.scan_layers))
        if e.layer is not None and cfg.scan_layers:
            leaf = leaf[e.layer]
        if is_quantized(leaf):
            leaf = _dequantize_slice(leaf)
        t = np.asarray(jax.device_get(leaf))
        if e.transpose:
            t = t.T
        yield e.hf_key, np.ascontiguousarray(t.astype(target))


def write_model(out_dir: str, tensors: Iterator[tuple[str, np.ndarray]], cfg: LlamaConfig, dtype: str,
                max_shard_size: int | str = "5GB", tokenizer_dir: str | None = None) -> None:
    limit = parse_size(max_shard_size)
    weight_map: dict[str, str] = {}
    total = 0
    with atomic_dir(out_dir) as tmp:
        pending: dict[str, np.ndarray] = {}
        pending_bytes = 0
        n = 0

        def flush():
            nonlocal pending, pending_bytes, n
            if pending:
                n += 1
                name = f"shard-{n:05d}.safetensors"
                save_file(pending, os.path.join(tmp, name), metadata={"format": "pt"})
                for k in pending:
                    weight_map[k] = name
                pending, pending_bytes = {}, 0

        for key, t in tensors:
            if pending and pending_bytes + t.nbytes > limit:
                flush()
            pending[key] = t
            pending_bytes += t.nbytes
            total += t.nbytes
        flush()
        # Name the files as transformers does, now that the count is known.
        names = {}
        for i in range(1, n + 1):
            final = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            os.rename(os.path.join(tmp, f"shard-{i:05d}.safetensors"), os.path.join(tmp, final))
            names[f"shard-{i:05d}.safetensors"] = final
        if n > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {k: names[v] for k, v in weight_map.items()}}
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg.to_hf_dict(dtype), f, indent=2)
        if tokenizer_dir:
            for name in TOKENIZER_FILES:
                src = os.path.join(tokenizer_dir, name)
                if os.path.isfile(src):
                    shutil.copy2(src, os.path.join(tmp, name))


def save_pretrained(out_dir: str, params, cfg: LlamaConfig, lora=None, lcfg=None, *,
                    dtype: str | None = None, max_shard_size: int | str = "5GB",
                    tokenizer_dir: str | None = None) -> str:
    """Write a transformers-loadable model directory; with `lora`, the merged model (W + s*A@B, DoRA:
    m * (W + s*A@B) / ||W + s*A@B||, as `lora_jax.merge`), folded in fp32 and cast once to `dtype`.

    Merging streams: each adapted kernel is merged one layer slice at a time as it is written, so
    memory holds the model, one merged slice and the shard being filled, never a merged copy of the
    model.
    dtype: of the written tensors (default: the params' dtype, `cfg.param_dtype`).
    Returns the directory.
    """
    dtype = dtype or cfg.param_dtype
    if dtype not in _NP_DTYPE_NAMES:
        raise ConfigError(f"dtype={dtype!r}; choose one of {_NP_DTYPE_NAMES}")
    if lora is not None:
        if lcfg is None:
            raise ConfigError("save_pretrained got lora= but no lcfg=; pass the LoraConfig of the adapter")
        tensors = _merged_tensors(params, _adapters_by_kernel(params, lora, cfg), cfg, dtype)
    else:
        tensors = hf_tensors(params, cfg, dtype)
    write_model(out_dir, tensors, cfg, dtype, max_shard_size, tokenizer_dir)
    return os.path.abspath(out_dir)


def _adapters_by_kernel(params, lora, cfg: LlamaConfig) -> dict[tuple[str, ...], dict]:
    """Kernel path -> adapter leaves, checked against the model before anything is written."""
    from lora_jax.lora.tree import adapter_paths

    kernels = {flax_path(e, cfg.scan_layers) for e in hf_entries(cfg)}
    out = {}
    for path in adapter_paths(lora):
        kpath = path + ("kernel",)
        if kpath not in kernels:
            raise ConfigError(f"the adapter tree has an entry at {'/'.join(path)}, which is not a kernel of "
                              f"this model ({'scanned' if cfg.scan_layers else 'unscanned'} layers); pass the "
                              "adapters made for these params")
        mod = _get(lora, path)
        w = _get(params, kpath)
        if mod["a"].shape[:-1] != w.shape[:-1] or mod["b"].shape[-1] != w.shape[-1]:
            raise ConfigError(f"adapter {'/'.join(path)} has a {list(mod['a'].shape)}, b {list(mod['b'].shape)}, "
                              f"which do not fit the kernel {list(w.shape)}")
        out[kpath] = mod
    return out


@jax.jit
def _dequantize_slice(q):
    return dequantize(q, jnp.float32)


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def _merge_slice(w, a, b, scale, m=None, *, out_dtype):
    """One `[in, out]` kernel merged as `lora_jax.merge` does, in fp32, cast once; torch layout out.
    A quantised kernel is dequantised in fp32 first."""
    w = dequantize(w, jnp.float32) if is_quantized(w) else w
    merged = w.astype(jnp.float32) + scale.astype(jnp.float32) * (a.astype(jnp.float32) @ b.astype(jnp.float32))
    if m is not None:
        norm = jnp.sqrt(jnp.sum(jnp.square(merged), axis=0))
        factor = jnp.where(scale != 0, m.astype(jnp.float32) / norm, 1.0)
        merged = merged * factor[None, :]
    return merged.T.astype(out_dtype)


def _merged_tensors(params, adapters: dict, cfg: LlamaConfig, dtype: str):
    """`hf_tensors` with each adapted kernel merged one (layer) slice at a time as it is written."""
    target = np_dtype(dtype)
    for e in hf_entries(cfg):
        path = flax_path(e, cfg.scan_layers)
        mod = adapters.get(path)
        if mod is None:
            yield from hf_tensors(params, cfg, dtype, entries=[e])
            continue
        pick = (lambda x: x[e.layer]) if (e.layer is not None and cfg.scan_layers) else (lambda x: x)
        m = pick(mod["m"]) if "m" in mod else None
        t = _merge_slice(pick(_get(params, path)), pick(mod["a"]), pick(mod["b"]), pick(mod["scale"]), m,
                         out_dtype=target)
        yield e.hf_key, np.ascontiguousarray(np.asarray(jax.device_get(t)))
