"""Write a Flax Llama as a Hugging Face model directory (config.json + safetensors, sharded + index
above `max_shard_size`), tensor by tensor.

Exports never destroy what they did not write (`atomic_dir`): everything is written into a fresh
temporary directory beside the target and renamed into place only once complete, so a failure
leaves the target as it was and no temporary behind. A target that holds anything is refused unless
`overwrite=True`, and even then only a previous export of the same kind (recognised by its exact
contents, `is_previous_export`) is replaced; a file at the target is always refused.

A quantised base (`lora_jax.quant`, QLoRA, or `lora_jax.fp8`) is written dequantised (an FP8 base
in the params' dtype: its e4m3-rounded weights, not the original ones), one layer slice at a time, in
fp32 arithmetic cast once to the export dtype; merged with adapters, the merge runs on that fp32
slice (dequantise, add s*A@B in fp32, cast once)."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from lora_jax.errors import ConfigError
from lora_jax.hf.load import np_dtype
from lora_jax.hf.names import flax_path, hf_entries
from lora_jax.lora.tree import adapter_paths
from lora_jax.models.layout import get_path
from lora_jax.models.llama_config import LlamaConfig
from lora_jax.quant import dequantize, is_quantized

__all__ = [
    "save_pretrained",
    "parse_size",
    "atomic_dir",
    "check_export_target",
    "is_previous_export",
    "EXPORT_KINDS",
    "TOKENIZER_FILES",
]

_NP_DTYPE_NAMES = ("float32", "bfloat16", "float16")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
)

# ------------------------------------------------------------------------------------------ sizes
_UNITS = (
    ("TIB", 2**40),
    ("GIB", 2**30),
    ("MIB", 2**20),
    ("KIB", 2**10),
    ("TB", 10**12),
    ("GB", 10**9),
    ("MB", 10**6),
    ("KB", 10**3),
    ("B", 1),
)
_SIZE = re.compile(r"(?P<num>\d+(\.\d*)?|\.\d+)\s*(?P<unit>[KMGT]I?B|B)?")


def parse_size(size: int | str, what: str = "max_shard_size") -> int:
    """Bytes in `size`: an integer of bytes (5000000000, "5000000000") or a number with a unit, as
    transformers writes them ("5GB", "500MB", "1.5GiB"; KB/MB/GB/TB are powers of 10, KiB/MiB/GiB/TiB
    of 2; case-insensitive). Anything else, or a size below one byte, is a `ConfigError` naming it."""
    forms = "e.g. 5GB, 500MB, 2GiB, or an integer number of bytes such as 5000000000"
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise ConfigError(f"{what}={size!r} is not a size; use {forms}")
    if isinstance(size, int):
        value = size
    else:
        m = _SIZE.fullmatch(size.strip().upper())
        if m is None:
            raise ConfigError(f"{what}={size!r} is not a size; use {forms}")
        mult = dict(_UNITS)[m["unit"]] if m["unit"] else 1
        if not m["unit"] and not m["num"].isdigit():
            raise ConfigError(f"{what}={size!r}: a size without a unit is a whole number of bytes; use {forms}")
        value = int(float(m["num"]) * mult)
    if value < 1:
        raise ConfigError(f"{what}={size!r} must be at least 1 byte; use {forms}")
    return value


# ----------------------------------------------------------------------------------- safe targets
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")

# kind -> (what it is, in messages; the files an export of that kind writes). A directory holding
# only such files, with the required ones, is a previous export that overwrite=True may replace.
EXPORT_KINDS = {
    "peft": "PEFT adapter (adapter_config.json + adapter_model.safetensors)",
    "model": "Hugging Face model (config.json + model*.safetensors)",
}


def _export_names(kind: str, names: set[str]) -> tuple[bool, list[str]]:
    """(has the files an export of `kind` must have, the names an export of `kind` never writes)."""
    if kind == "peft":
        allowed = required = {"adapter_config.json", "adapter_model.safetensors"}
        return required <= names, sorted(names - allowed)
    if kind == "model":
        weights = {n for n in names if n == "model.safetensors" or _SHARD.fullmatch(n)}
        allowed = {"config.json", "model.safetensors.index.json", *TOKENIZER_FILES} | weights
        return "config.json" in names and bool(weights), sorted(names - allowed)
    raise ValueError(f"unknown export kind {kind!r}; one of {sorted(EXPORT_KINDS)}")


def is_previous_export(path: str, kind: str) -> bool:
    """Whether directory `path` holds exactly what an export of `kind` ("peft" or "model") writes:
    the required files, only plain files, nothing else. Such a directory may be replaced with
    `overwrite=True`; any other is refused even then."""
    try:
        entries = list(os.scandir(path))
    except OSError:
        return False
    if any(e.is_symlink() or not e.is_file() for e in entries):
        return False
    complete, foreign = _export_names(kind, {e.name for e in entries})
    return complete and not foreign


def check_export_target(out_dir, kind: str, overwrite: bool = False) -> str:
    """The absolute path of `out_dir` if an export of `kind` may be written there, else a
    `ConfigError` naming the path and the way out. Writes nothing.

    Allowed: a path that does not exist yet (parents are created), an empty directory, and with
    `overwrite` a directory holding a previous export of the same kind (`is_previous_export`).
    Refused: a file or symbolic link at the path, a non-empty directory without `overwrite`, and
    with it a directory holding anything an export does not write.
    """
    what = EXPORT_KINDS[kind]
    out = os.path.abspath(os.fspath(out_dir))
    if os.path.islink(out):
        raise ConfigError(
            f"{out} is a symbolic link; refusing to replace it. Export to the directory "
            f"it points to ({os.path.realpath(out)}) or to a new path"
        )
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(
            f"{out} is a file, not a directory; refusing to replace it with a {what}. Choose a new or empty directory"
        )
    if not os.path.isdir(out):
        parent = os.path.dirname(out)
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if parent and not os.path.isdir(parent):
            raise ConfigError(f"cannot export to {out}: {parent} is a file, not a directory")
        return out
    try:
        names = os.listdir(out)
    except OSError as e:
        raise ConfigError(f"cannot export to {out}: {e.strerror or e}") from None
    if not names:
        return out
    if not overwrite:
        raise ConfigError(
            f"{out} is not empty; refusing to export a {what} over it (nothing was "
            "changed). Choose a new or empty directory, or pass --overwrite "
            "(overwrite=True) to replace a previous export there"
        )
    if not is_previous_export(out, kind):
        _, foreign = _export_names(kind, set(names))
        held = f"it holds {_short(foreign)}, which" if foreign else "its contents"
        raise ConfigError(
            f"{out} is not a previous {what} export ({held} an export never writes); "
            "refusing to replace it even with --overwrite (nothing was changed). "
            "Choose a new or empty directory"
        )
    return out


def _short(names, n: int = 5) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


class atomic_dir:
    """Context manager for writing one export: `with atomic_dir(out, kind, overwrite) as tmp:` write
    the files into `tmp`, a new directory beside `out` (`<out>.tmp-XXXXXXXX`); on success it is
    renamed to `out`, on any error it is removed and `out` is left as it was.

    `out` is checked (`check_export_target`) on entry and again just before the rename, so a
    directory that filled up meanwhile is not replaced either. A previous export being replaced
    (overwrite) is first renamed aside, then deleted once the new one is in place; if the new one
    cannot be put in place the old one is renamed back."""

    def __init__(self, out_dir, kind: str, overwrite: bool = False):
        self.kind, self.overwrite = kind, overwrite
        self.out = check_export_target(out_dir, kind, overwrite)
        self.tmp: str | None = None

    def __enter__(self) -> str:
        parent = os.path.dirname(self.out)
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create {parent} to export into: {e.strerror or e}") from None
        # os.mkdir, not tempfile.mkdtemp: the export keeps the umask's permissions, not 0700
        self.tmp = f"{self.out}.tmp-{uuid.uuid4().hex[:8]}"
        os.mkdir(self.tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                self._commit()
            except BaseException:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False

    def _commit(self) -> None:
        tmp = self.tmp
        assert tmp is not None  # set by __enter__, which precedes every __exit__
        check_export_target(self.out, self.kind, self.overwrite)
        if not os.path.isdir(self.out):
            os.rename(tmp, self.out)  # fails if a non-empty `out` appeared meanwhile
        elif not os.listdir(self.out):
            os.rmdir(self.out)  # fails if something was written into it meanwhile
            os.rename(tmp, self.out)
        else:  # a previous export, checked above
            old = f"{self.out}.old-{uuid.uuid4().hex[:8]}"
            os.rename(self.out, old)
            try:
                os.rename(tmp, self.out)
            except BaseException:
                os.rename(old, self.out)
                raise
            shutil.rmtree(old, ignore_errors=True)


def hf_tensors(params, cfg: LlamaConfig, dtype: str, entries=None) -> Iterator[tuple[str, np.ndarray]]:
    """(HF key, torch-layout numpy tensor), one at a time, fetched from device as needed."""
    target = np_dtype(dtype)
    for e in hf_entries(cfg) if entries is None else entries:
        leaf = get_path(params, flax_path(e, cfg.scan_layers))
        if e.layer is not None and cfg.scan_layers:
            leaf = leaf[e.layer]
        if is_quantized(leaf):
            leaf = _dequantize_slice(leaf)
        t = np.asarray(jax.device_get(leaf))
        if e.transpose:
            t = t.T
        yield e.hf_key, np.ascontiguousarray(t.astype(target))


def write_model(
    out_dir: str,
    tensors: Iterator[tuple[str, np.ndarray]],
    cfg: LlamaConfig,
    dtype: str,
    max_shard_size: int | str = "5GB",
    tokenizer_dir: str | None = None,
    *,
    overwrite: bool = False,
) -> None:
    limit = parse_size(max_shard_size)
    weight_map: dict[str, str] = {}
    total = 0
    with atomic_dir(out_dir, "model", overwrite) as tmp:
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
            index = {"metadata": {"total_size": total}, "weight_map": {k: names[v] for k, v in weight_map.items()}}
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg.to_hf_dict(dtype), f, indent=2)
        if tokenizer_dir:
            for name in TOKENIZER_FILES:
                src = os.path.join(tokenizer_dir, name)
                if os.path.isfile(src):
                    shutil.copy2(src, os.path.join(tmp, name))


def save_pretrained(
    out_dir: str,
    params,
    cfg: LlamaConfig,
    lora=None,
    lcfg=None,
    *,
    dtype: str | None = None,
    max_shard_size: int | str = "5GB",
    tokenizer_dir: str | None = None,
    overwrite: bool = False,
) -> str:
    """Write a transformers-loadable model directory; with `lora`, the merged model (W + s*A@B, DoRA:
    m * (W + s*A@B) / ||W + s*A@B||, as `lora_jax.merge`), folded in fp32 and cast once to `dtype`.

    Merging streams: each adapted kernel is merged one layer slice at a time as it is written, so
    memory holds the model, one merged slice and the shard being filled, never a merged copy of the
    model.
    dtype: of the written tensors (default: the params' dtype, `cfg.param_dtype`).
    max_shard_size: "5GB", "500MB", "2GiB" or an integer of bytes (`parse_size`).
    overwrite: replace `out_dir` if it holds a previous model export (config.json + model*.safetensors
        [+ index, tokenizer files] and nothing else); without it a non-empty `out_dir` is refused.
        A directory holding anything else, or a file at `out_dir`, is refused either way.
    Written into a temporary directory beside `out_dir`, renamed into place when complete: an error
    leaves `out_dir` as it was. Returns the directory.
    """
    dtype = dtype or cfg.param_dtype
    if dtype not in _NP_DTYPE_NAMES:
        raise ConfigError(f"dtype={dtype!r}; choose one of {_NP_DTYPE_NAMES}")
    parse_size(max_shard_size)
    check_export_target(out_dir, "model", overwrite)
    if lora is not None:
        if lcfg is None:
            raise ConfigError("save_pretrained got lora= but no lcfg=; pass the LoraConfig of the adapter")
        tensors = _merged_tensors(params, _adapters_by_kernel(params, lora, cfg), cfg, dtype)
    else:
        tensors = hf_tensors(params, cfg, dtype)
    write_model(out_dir, tensors, cfg, dtype, max_shard_size, tokenizer_dir, overwrite=overwrite)
    return os.path.abspath(out_dir)


def _adapters_by_kernel(params, lora, cfg: LlamaConfig) -> dict[tuple[str, ...], dict]:
    """Kernel path -> adapter leaves, checked against the model before anything is written."""
    kernels = {flax_path(e, cfg.scan_layers) for e in hf_entries(cfg)}
    out = {}
    for path in adapter_paths(lora):
        kpath = path + ("kernel",)
        if kpath not in kernels:
            raise ConfigError(
                f"the adapter tree has an entry at {'/'.join(path)}, which is not a kernel of "
                f"this model ({'scanned' if cfg.scan_layers else 'unscanned'} layers); pass the "
                "adapters made for these params"
            )
        mod = get_path(lora, path)
        w = get_path(params, kpath)
        if mod["a"].shape[:-1] != w.shape[:-1] or mod["b"].shape[-1] != w.shape[-1]:
            raise ConfigError(
                f"adapter {'/'.join(path)} has a {list(mod['a'].shape)}, b {list(mod['b'].shape)}, "
                f"which do not fit the kernel {list(w.shape)}"
            )
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
        t = _merge_slice(
            pick(get_path(params, path)), pick(mod["a"]), pick(mod["b"]), pick(mod["scale"]), m, out_dtype=target
        )
        t = t if e.transpose else t.T  # `_merge_slice` gives torch's [out, in]; Conv1D (GPT-2) keeps [in, out]
        yield e.hf_key, np.ascontiguousarray(np.asarray(jax.device_get(t)))
