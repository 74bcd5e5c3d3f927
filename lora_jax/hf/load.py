"""Load a Hugging Face Llama directory (config.json + safetensors) into a Flax parameter tree.

Tensors stream one at a time from the safetensors files; each Flax leaf is assembled in one host
buffer (stacked over layers when scanning) and moved to its device(s) as soon as it is complete, so
host memory holds at most the leaves still being filled, never a second copy of the model.

With `quantize="nf4"` (QLoRA), `"int8"` or `"fp8"`, each projection tensor is quantised on its device(s) as it
is read, straight into the stacked quantised leaf there: host memory holds one tensor at a time
and the device never holds a full-precision projection beyond the one being quantised.
"""

from __future__ import annotations

import functools
import json
import os
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from safetensors import SafetensorError, safe_open

from lora_jax.errors import CheckpointFormatError, ConfigError
from lora_jax.hf.names import IGNORED_SUFFIXES, Entry, flax_path, hf_entries
from lora_jax.models.gemma3_config import Gemma3Config
from lora_jax.models.gpt2_config import GPT2Config
from lora_jax.models.layout import get_path
from lora_jax.models.llama_config import ARCHITECTURES, LlamaConfig, _hf_dict
from lora_jax.quant import check_kind, is_projection_kernel
from lora_jax.quant import quantize as quantize_kernel  # `quantize` is load_pretrained's argument
from lora_jax.sharding import DEFAULT_RULES, param_sharding, tree_shardings

__all__ = ["load_pretrained", "weight_files", "np_dtype"]

_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def np_dtype(name: str):
    return np.dtype(_NP_DTYPES[name])


def weight_files(path: str) -> list[str]:
    """The safetensors files of a HF model directory (index-aware); refuses pickled checkpoints."""
    if not os.path.isdir(path):
        raise CheckpointFormatError(
            f"model directory {path!r} does not exist; pass a Hugging Face "
            "model directory (config.json + *.safetensors)"
        )
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointFormatError(
                f"{index} is not a valid safetensors index ({e!r}); re-export the model"
            ) from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise CheckpointFormatError(
                f"{index} names files that are not there: {missing}; copy the whole model directory"
            )
        return [os.path.join(path, f) for f in files]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    pickled = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    if pickled:
        raise CheckpointFormatError(
            f"{path} holds only pickled weights ({', '.join(sorted(pickled))}); lora_jax never "
            "unpickles. Convert them once with transformers: "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
        )
    raise CheckpointFormatError(
        f"no model.safetensors or model.safetensors.index.json in {path}; "
        "pass a Hugging Face model directory saved with save_pretrained"
    )


def _open(file: str):
    try:
        return safe_open(file, framework="np")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointFormatError(
            f"cannot read {file}: {e}. The file is truncated or not safetensors; copy or export it again"
        ) from None


def _index_tensors(files: list[str]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """key -> (file, shape), read from the headers only."""
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in files:
        with _open(file) as f:
            for key in f.keys():
                found[key] = (file, tuple(f.get_slice(key).get_shape()))
    return found


def check_tensors(cfg: LlamaConfig, found: dict[str, tuple[str, tuple[int, ...]]]) -> list[Entry]:
    """Refuses missing or unexpected keys and shape mismatches, naming each."""
    entries = hf_entries(cfg)
    expected = {e.hf_key for e in entries}
    extra = sorted(
        k
        for k in found
        if k not in expected
        and not k.endswith(IGNORED_SUFFIXES)
        and not (cfg.tie_word_embeddings and k == "lm_head.weight")
    )
    missing = sorted(expected - set(found))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing tensors: {_short(missing)}")
        if extra:
            parts.append(f"unexpected tensors: {_short(extra)}")
        raise CheckpointFormatError(
            "; ".join(parts) + ". The weights do not match config.json "
            f"(wrong config, or not a {ARCHITECTURES.get(cfg.model_type, cfg.model_type)} checkpoint)"
        )
    for e in entries:
        shape = found[e.hf_key][1]
        if shape != e.hf_shape:
            raise CheckpointFormatError(
                f"tensor {e.hf_key} has shape {list(shape)} but config.json "
                f"implies {list(e.hf_shape)}; the config and weights disagree"
            )
    return entries


def _short(keys: list[str], n: int = 8) -> str:
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _nest(flat: dict[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value
    return tree


def load_pretrained(
    path: str,
    dtype: Any = None,
    mesh=None,
    *,
    scan_layers: bool = True,
    remat_policy: str = "none",
    mlp_chunk_tokens: int | None = None,
    compute_dtype: Any = None,
    rules=None,
    quantize: str | None = None,
    fuse_wide_adapters: bool = True,
    attention: str = "auto",
    place: Callable[[tuple[str, ...], np.ndarray], Any] | None = None,
):
    """Load a HF Llama-family directory (Llama, Qwen2, Qwen3, Mistral) -> `(LlamaConfig, params)`.

    dtype: parameter dtype (`"float32"`, `"bfloat16"`); None keeps the checkpoint's own.
    mesh: a `jax.sharding.Mesh`; each leaf goes straight to its sharding (`lora_jax.sharding`
        logical-axis `rules`), so each device receives only its shard.
    compute_dtype: activation dtype; defaults to the parameter dtype.
    quantize: `"nf4"` or `"int8"`: the seven projection kernels become `lora_jax.quant.QuantizedKernel`s
        (quantised from `dtype`, layer by layer as they stream in, sharded like the kernels);
        `"fp8"`: `lora_jax.fp8.Fp8Kernel`s (e4m3 codes, per-channel scales computed in fp32 from
        the `dtype` weights), multiplied in FP8 on GPUs that have FP8 GEMMs, dequantised elsewhere;
        embeddings, norms and the LM head stay in `dtype`. Such params run inside
        `lora_interception()` (`lj.apply`, training, `generate`).
    fuse_wide_adapters: `LlamaConfig.fuse_wide_adapters` (how the gate/up adapters run).
    mlp_chunk_tokens: run the MLP over chunks of this many tokens (long rows), or None.
    attention: `LlamaConfig.attention`, the attention kernel (`lora_jax.models.attention`).
    place: `(path, host array) -> array`, replacing the default placement; with `quantize`, it is
        called with the kernel's path for each array of a quantised kernel (assembled on the host).
    """
    check_kind(quantize)
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointFormatError(
            f"model directory {path!r} does not exist; pass a Hugging Face "
            "model directory (config.json + *.safetensors)"
        )
    hf_cfg = _config_from_hf(path)  # validates model type and options before reading weights
    files = weight_files(path)
    found = _index_tensors(files)
    entries = check_tensors(hf_cfg, found)
    if dtype is None:
        with _open(found[entries[0].hf_key][0]) as f:
            stored = f.get_slice(entries[0].hf_key).get_dtype()
        dtype = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(stored)
        if dtype is None:
            raise ConfigError(f"checkpoint dtype {stored} is not supported; pass dtype='float32' or 'bfloat16'")
    cfg = hf_cfg.replace(
        param_dtype=dtype,
        dtype=compute_dtype or dtype,
        scan_layers=scan_layers,
        remat_policy=remat_policy,
        mlp_chunk_tokens=mlp_chunk_tokens,
        fuse_wide_adapters=fuse_wide_adapters,
        attention=attention,
    )
    target = np_dtype(cfg.param_dtype)
    quantizer = None
    if quantize is not None:
        quantizer = _Quantizer(quantize, cfg, mesh, rules, place)
    if place is None:
        place = _placer(mesh, rules)

    # Group entries by destination leaf, so each leaf is filled, placed and released in turn.
    by_leaf: dict[tuple[str, ...], list[Entry]] = defaultdict(list)
    for e in entries:
        by_leaf[flax_path(e, cfg.scan_layers)].append(e)
    by_file: dict[str, list[Entry]] = defaultdict(list)
    for e in entries:
        by_file[found[e.hf_key][0]].append(e)

    buffers: dict[tuple[str, ...], np.ndarray] = {}
    remaining = {leaf: len(es) for leaf, es in by_leaf.items()}
    placed: dict[tuple[str, ...], Any] = {}
    for file, file_entries in by_file.items():
        with _open(file) as f:
            for e in file_entries:
                leaf = flax_path(e, cfg.scan_layers)
                try:
                    tensor = f.get_tensor(e.hf_key)
                except (SafetensorError, OSError, ValueError) as err:
                    raise CheckpointFormatError(
                        f"cannot read tensor {e.hf_key} from {file}: {err}; the file is truncated or corrupt"
                    ) from None
                if e.transpose:
                    tensor = tensor.T
                tensor = tensor.astype(target)
                if quantizer is not None and is_projection_kernel(e.path):
                    quantizer.add(leaf, e.layer if cfg.scan_layers else None, tensor)
                    del tensor
                    remaining[leaf] -= 1
                    if remaining[leaf] == 0:
                        placed[leaf] = quantizer.finish(leaf)
                    continue
                if e.layer is not None and cfg.scan_layers:
                    if leaf not in buffers:
                        buffers[leaf] = np.empty((cfg.num_hidden_layers,) + tensor.shape, target)
                    buffers[leaf][e.layer] = tensor
                else:
                    buffers[leaf] = np.ascontiguousarray(tensor)
                del tensor
                remaining[leaf] -= 1
                if remaining[leaf] == 0:
                    placed[leaf] = place(leaf, buffers.pop(leaf))
    return cfg, _nest(placed)


def _config_from_hf(path: str) -> Any:
    """The model config of a HF directory, by its model_type (GPT-2's own class, else a Llama-family)."""
    if _hf_dict(path).get("model_type") == "gpt2":
        return GPT2Config.from_hf(path)
    if _hf_dict(path).get("model_type") == "gemma3_text":
        return Gemma3Config.from_hf(path)
    return LlamaConfig.from_hf(path)


def _placer(mesh, rules):
    if mesh is None:
        return lambda path, array: jax.device_put(array)
    rules = rules or DEFAULT_RULES
    return lambda path, array: jax.device_put(array, param_sharding(path, array, mesh, rules=rules))


class _Quantizer:
    """Quantises projection tensors as they stream in and assembles each (stacked) quantised leaf.

    Default placement: each tensor goes to its device(s) with the kernel's sharding, is quantised
    there, and its codes are written into the leaf's layer slot (buffers donated, so one copy). With
    a custom `place`, leaves are assembled on the host and each array handed to `place`.
    """

    def __init__(self, kind: str, cfg: LlamaConfig, mesh, rules, place):
        self.kind, self.cfg, self.mesh, self.place = kind, cfg, mesh, place
        self.rules = tuple(sorted((rules or DEFAULT_RULES).items()))
        self.buffers: dict[tuple[str, ...], Any] = {}

    def add(self, leaf, layer: int | None, tensor: np.ndarray) -> None:
        """Quantise one tensor: the whole leaf (layer None) or layer `layer` of a stacked leaf."""
        n = self.cfg.num_hidden_layers if layer is not None else None
        module = leaf[-3:] if self.mesh is not None else None  # programs depend on the path only via shardings
        x_sh, quant, zeros, set_layer = _programs(
            self.kind, module, tensor.shape, tensor.dtype.name, n, self.mesh, self.rules
        )
        if self.place is not None:
            return self._add_host(leaf, layer, jax.device_get(quant(tensor)))
        x = jax.device_put(tensor, x_sh)
        if layer is None:
            self.buffers[leaf] = quant(x)
            return
        if leaf not in self.buffers:
            self.buffers[leaf] = zeros()
        self.buffers[leaf] = set_layer(self.buffers[leaf], x, layer)

    def _add_host(self, leaf, layer, q):
        if layer is None:
            self.buffers[leaf] = q
            return
        if leaf not in self.buffers:
            n = self.cfg.num_hidden_layers
            parts, tree = jax.tree.flatten(q)
            self.buffers[leaf] = jax.tree.unflatten(tree, [np.zeros((n,) + a.shape, a.dtype) for a in parts])
        for buf, part in zip(jax.tree.leaves(self.buffers[leaf]), jax.tree.leaves(q)):
            buf[layer] = part

    def finish(self, leaf):
        """The completed leaf, placed."""
        q = self.buffers.pop(leaf)
        if self.place is not None:
            q = jax.tree.map(lambda a: self.place(leaf, np.ascontiguousarray(a)), q)
        return q


@functools.lru_cache(maxsize=64)
def _programs(
    kind: str, module_path: tuple[str, ...], shape: tuple[int, ...], dtype: str, layers: int | None, mesh, rules: tuple
):
    """(sharding of one [in, out] tensor, jitted quantiser, jitted zeros of the stacked leaf, jitted
    "quantise into layer i" with the leaf donated), with shardings from the logical-axis rules of the
    kernel's path (`layers`: the stack depth of a scanned leaf, None for a leaf that is one tensor)."""
    quant = functools.partial(quantize_kernel, kind=kind, dtype=dtype)
    abstract = jax.eval_shape(quant, jax.ShapeDtypeStruct(shape, dtype))
    lead = () if layers is None else (layers,)
    x_sh = slice_sh = leaf_sh = None
    if mesh is not None:
        path = (("layers",) if layers is not None else ()) + module_path
        full = jax.tree.map(lambda s: jax.ShapeDtypeStruct(lead + s.shape, s.dtype), abstract)
        kernel = jax.ShapeDtypeStruct(lead + shape, dtype)
        leaf_sh = get_path(tree_shardings(_nest({path: full}), mesh, dict(rules)), path)
        x_sh = get_path(tree_shardings(_nest({path: kernel}), mesh, dict(rules)), path)
        slice_sh = leaf_sh
        if layers is not None:  # a layer slice shards like the stacked leaf without its layer axis
            drop = lambda s: NamedSharding(mesh, PartitionSpec(*s.spec[1:]))
            x_sh, slice_sh = drop(x_sh), jax.tree.map(drop, leaf_sh)
    zeros = jax.jit(lambda: jax.tree.map(lambda a: jnp.zeros(lead + a.shape, a.dtype), abstract), out_shardings=leaf_sh)
    set_layer = jax.jit(lambda buf, x, i: _set_layer(buf, quant(x), i), donate_argnums=(0,), out_shardings=leaf_sh)
    return x_sh, jax.jit(quant, out_shardings=slice_sh), zeros, set_layer


def _set_layer(buffers, q, layer):
    return jax.tree.map(lambda b, s: jax.lax.dynamic_update_index_in_dim(b, s, layer, 0), buffers, q)
