"""Write a Flax Llama as a Hugging Face model directory (config.json + safetensors, sharded + index
above `max_shard_size`), tensor by tensor, into a temporary directory renamed into place at the end,
so a failure never leaves a half-written model behind."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Iterator

import jax
import numpy as np
from safetensors.numpy import save_file

from lora_jax.config import LlamaConfig
from lora_jax.errors import ConfigError
from lora_jax.hf.load import np_dtype
from lora_jax.hf.names import flax_path, hf_entries

__all__ = ["save_pretrained", "parse_size", "atomic_dir", "TOKENIZER_FILES"]

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


def hf_tensors(params, cfg: LlamaConfig, dtype: str) -> Iterator[tuple[str, np.ndarray]]:
    """(HF key, torch-layout numpy tensor), one at a time, fetched from device as needed."""
    target = np_dtype(dtype)
    for e in hf_entries(cfg):
        leaf = _get(params, flax_path(e, cfg.scan_layers))
        if e.layer is not None and cfg.scan_layers:
            leaf = leaf[e.layer]
        t = np.asarray(jax.device_get(leaf))
        if e.transpose:
            t = t.T
        yield e.hf_key, np.ascontiguousarray(t.astype(target))


def write_model(out_dir: str, tensors: Iterator[tuple[str, np.ndarray]], cfg: LlamaConfig, dtype: str,
                max_shard_size: int | str = "5GB", tokenizer_dir: str | None = None) -> None:
    limit = parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
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
    """Write a transformers-loadable model directory; with `lora`, the merged model (W + s*B*A folded
    in fp32, cast once). Returns the directory."""
    dtype = dtype or cfg.param_dtype
    if lora is not None:
        from lora_jax.lora.tree import merge

        if lcfg is None:
            raise ConfigError("save_pretrained got lora= but no lcfg=; pass the LoraConfig of the adapter")
        tensors = _merged_tensors(params, lora, lcfg, cfg, dtype)
    else:
        tensors = hf_tensors(params, cfg, dtype)
    write_model(out_dir, tensors, cfg, dtype, max_shard_size, tokenizer_dir)
    return os.path.abspath(out_dir)


def _merged_tensors(params, lora, lcfg, cfg: LlamaConfig, dtype: str):
    """Merge one layer-stacked leaf at a time, so host memory holds one leaf, not the model twice."""
    from lora_jax.lora.tree import merge

    merged = merge(params, lora, lcfg)
    yield from hf_tensors(merged, cfg, dtype)
