"""PEFT adapter directories (`adapter_config.json` + `adapter_model.safetensors`) <-> adapter trees.

The file layout is the one `peft.PeftModel.save_pretrained` writes (checked against PEFT 0.21); for a
Llama (other families: their layout's module names, e.g. GPT-2's `transformer.h.{i}.attn.c_attn`):

    base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_A.weight       [r, in]
    base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_B.weight       [out, r]
    base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_magnitude_vector   [out] (DoRA)
    base_model.model.{HF key of a base tensor}        a `modules_to_save` module, e.g. lm_head.weight

Flax `a` is `lora_A.weight.T`, `b` is `lora_B.weight.T`, `m` is the magnitude vector. Only real
entries are written: layers an adapter leaves alone are skipped and ranks padded to the largest
(`rank_pattern` with scanned layers) are sliced back to each module's own `r`.
Saving and loading stay together (under 500 lines): each is the other's inverse, key for key.

Loading is stricter than PEFT: a key the config does not explain, a key it needs that is absent
(DoRA magnitudes included) and a shape that does not fit the base are errors naming the key, so an
adapter is never run half-loaded or on the wrong base.

PiSSA: an adapter initialised with `init_lora_weights="pissa"` is trained against the residual base
`unmerge(params, lora0, lcfg)`, not the original weights. `save_peft` writes it as a plain LoRA
adapter (`init_lora_weights: true`) relative to that residual base: save the residual with
`save_pretrained(dir, residual_params, cfg)` and pass that directory as `base_model_name_or_path`
(or merge with `save_pretrained(..., lora=, lcfg=)`). PEFT adapters saved as PiSSA/OLoRA/CorDA/
LoftQ/LoRA-GA are relative to a base PEFT rewrites at load time, so `load_peft` refuses them; convert
them with PEFT (`save_pretrained(..., path_initial_model_for_weight_conversion=...)`) first.

This module moves tensors; `adapter_config.json` is read and written by `lora_jax.hf.peft_config`
(`read_peft_config` is importable from here too). Module names and shapes come from the layout
(`lora_jax.models.layout`); the adapter tree is built by `lora_jax.lora.tree.build_tree`.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import defaultdict
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from lora_jax.errors import CheckpointFormatError, ConfigError
from lora_jax.hf.load import np_dtype
from lora_jax.hf.names import Entry, flax_path, hf_entries
from lora_jax.hf.peft_config import ADAPTER_CONFIG, ADAPTER_WEIGHTS, peft_config_dict, read_peft_config
from lora_jax.hf.save import atomic_dir, check_export_target
from lora_jax.lora.config import LoraConfig
from lora_jax.lora.targets import Target, model_shape, plan_targets, shape_from_config
from lora_jax.lora.tree import adapter_paths, build_tree
from lora_jax.models.gemma3_config import Gemma3Config
from lora_jax.models.gpt2_config import GPT2Config
from lora_jax.models.layout import GEMMA3_LAYOUT, LLAMA_LAYOUT, Layout, get_path, layout_of
from lora_jax.models.llama_config import LlamaConfig

__all__ = ["save_peft", "load_peft", "apply_modules_to_save", "read_peft_config", "ADAPTER_WEIGHTS", "ADAPTER_CONFIG"]

PREFIX = "base_model.model."
_DTYPES = ("float32", "bfloat16", "float16")
_LORA_KEY = re.compile(
    rf"^{re.escape(PREFIX + LLAMA_LAYOUT.hf_layers)}\.(?P<layer>\d+)\.(?P<parent>{'|'.join(LLAMA_LAYOUT.parents)})\."
    rf"(?P<name>{'|'.join(LLAMA_LAYOUT.names)})\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$"
)


# ------------------------------------------------------------------------------------ base entries
def _config_from_params(params) -> LlamaConfig | GPT2Config | Gemma3Config:
    """A model config of the family of `params` with their tensor names and shapes (for the HF key
    table only: head counts are recovered up to a common factor, which changes no shape)."""
    shape = model_shape(params)
    layout = shape.layout
    layer0 = params[layout.layers] if shape.scan_layers else params[f"{layout.layers}_0"]
    vocab, hidden = params[layout.embed]["embedding"].shape
    if layout.family == "gpt2":  # one head: GPT-2's head count changes no tensor shape
        return GPT2Config(
            vocab_size=int(vocab),
            n_positions=int(params["wpe"]["embedding"].shape[0]),
            n_embd=int(hidden),
            n_layer=shape.num_layers,
            n_head=1,
            n_inner=shape.io["c_fc"][1],
            scan_layers=shape.scan_layers,
        )
    if GEMMA3_LAYOUT.layer_norms[2] in layer0:  # pre_feedforward_layernorm: Gemma 3's, not Llama's
        head_dim = int(layer0["self_attn"]["q_norm"]["scale"].shape[-1])
        return Gemma3Config(
            vocab_size=int(vocab),
            hidden_size=int(hidden),
            intermediate_size=shape.io["gate_proj"][1],
            num_hidden_layers=shape.num_layers,
            num_attention_heads=shape.io["q_proj"][1] // head_dim,
            num_key_value_heads=shape.io["k_proj"][1] // head_dim,
            head_dim=head_dim,
            attention_bias="bias" in layer0["self_attn"]["q_proj"],
            tie_word_embeddings=layout.lm_head not in params,
            scan_layers=shape.scan_layers,
        )
    sizes = {axis: n for p in layout.projections for axis, n in zip(p.axes, shape.io[p.name])}
    biases: dict[str, Any] = {  # LlamaConfig's bias flags, named by the layout
        p.bias: "bias" in layer0[p.parent][p.name] for p in layout.projections if isinstance(p.bias, str)
    }
    head_dim = math.gcd(sizes["heads"], sizes["kv_heads"])
    attn = layer0[layout.head_norm_parent]
    model_type = "llama"  # the family whose layout has these tensors
    if "q_norm" in attn:
        model_type, head_dim = "qwen3", int(attn["q_norm"]["scale"].shape[-1])
    elif "bias" in attn["q_proj"] and "bias" not in attn["o_proj"]:
        model_type, biases = "qwen2", {}
    return LlamaConfig(
        model_type=model_type,
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        intermediate_size=sizes["mlp"],
        num_hidden_layers=shape.num_layers,
        num_attention_heads=sizes["heads"] // head_dim,
        num_key_value_heads=sizes["kv_heads"] // head_dim,
        head_dim=head_dim,
        tie_word_embeddings=layout.lm_head not in params,
        scan_layers=shape.scan_layers,
        **biases,
    )


def _module_of(hf_key: str) -> str:
    return hf_key.rsplit(".", 1)[0]


def _saved_entries(cfg, modules) -> list[Entry]:
    """Base tensors of the `modules_to_save` modules, matched as PEFT does (name ends with)."""
    layout = layout_of(cfg)
    entries = [e for e in hf_entries(cfg) if any(_module_of(e.hf_key).endswith(m) for m in modules)]
    unmatched = [m for m in modules if not any(_module_of(e.hf_key).endswith(m) for e in entries)]
    if unmatched:
        tied = f" ({layout.lm_head} is tied to {layout.embed} in this model)" if cfg.tie_word_embeddings else ""
        examples = ", ".join(repr(m) for m in (layout.embed, layout.final_norm, *layout.layer_norms))
        raise ConfigError(
            f"modules_to_save={list(modules)}: {unmatched} match no module of the model{tied}; "
            f"modules of this {layout.family} model are e.g. {examples}"
        )
    return entries


def _short(keys, n: int = 8) -> str:
    keys = list(keys)
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


# -------------------------------------------------------------------------------------------- save
def _host(x) -> np.ndarray:
    return np.asarray(jax.device_get(x), np.float32)


def _adapter_tensors(
    lora, lcfg: LoraConfig, targets: list[Target], target_dtype, layout: Layout = LLAMA_LAYOUT
) -> dict[str, np.ndarray]:
    """PEFT tensors of the real (layer, projection) entries, checked against `lcfg` first."""
    scan = layout.layers in lora
    have = set(adapter_paths(lora))
    want = {layout.module_path(t.layer, t.name, scan) for t in targets}
    if have != want:
        parts = []
        if want - have:
            parts.append(
                f"lcfg targets {_short('/'.join(p) for p in sorted(want - have))} but the adapter "
                "tree has no entry there"
            )
        if have - want:
            parts.append(
                f"the adapter tree holds {_short('/'.join(p) for p in sorted(have - want))}, which lcfg does not target"
            )
        raise ConfigError(
            "; ".join(parts) + ". Pass the LoraConfig the adapters were made with (and the model config of their base)"
        )
    out: dict[str, np.ndarray] = {}
    by_path: dict[tuple, list[Target]] = defaultdict(list)
    for t in targets:
        by_path[layout.module_path(t.layer, t.name, scan)].append(t)
    for path, ts in by_path.items():
        mod = get_path(lora, path)
        where = "/".join(path)
        if lcfg.use_dora != ("m" in mod):
            raise ConfigError(
                f"adapter {where} {'lacks' if lcfg.use_dora else 'has'} a DoRA magnitude 'm' "
                f"but lcfg.use_dora={lcfg.use_dora}; pass the LoraConfig the adapters were made with"
            )
        leaves = {k: _host(v) for k, v in mod.items()}
        if scan:
            active = {t.layer for t in ts}
            stray = [i for i, s in enumerate(leaves["scale"]) if i not in active and s != 0]
            if stray:
                raise ConfigError(
                    f"adapter {where} is active (scale != 0) in layers {stray}, which lcfg does "
                    "not target; pass the LoraConfig the adapters were made with"
                )
        for t in ts:
            one = {k: (v[t.layer] if scan else v) for k, v in leaves.items()}
            a, b = one["a"], one["b"]
            if a.shape[0] != t.fan_in or b.shape[-1] != t.fan_out or a.shape[1] < t.r or b.shape[0] != a.shape[1]:
                raise ConfigError(
                    f"adapter {where} (layer {t.layer}) has a {list(a.shape)}, b {list(b.shape)}, "
                    f"which do not fit [{t.fan_in}, {t.r}] / [{t.r}, {t.fan_out}] of the model "
                    "and LoraConfig given; pass the configs the adapters were made with"
                )
            if np.any(a[:, t.r :]) or np.any(b[t.r :]):
                raise ConfigError(
                    f"adapter {where} (layer {t.layer}) has non-zero entries beyond its rank "
                    f"r={t.r} (padding); slicing them off would change the model"
                )
            if not math.isclose(float(one["scale"]), t.scale, rel_tol=1e-5):
                raise ConfigError(
                    f"adapter {where} (layer {t.layer}) has scale {float(one['scale'])!r}, but "
                    f"lcfg implies {t.scale!r} (lora_alpha/r{'' if not lcfg.use_rslora else ' with rsLoRA'}); "
                    "pass the LoraConfig the adapters were made with"
                )
            key = PREFIX + layout.hf_module(t.layer, t.name)
            out[f"{key}.lora_A.weight"] = np.ascontiguousarray(a[:, : t.r].T.astype(target_dtype))
            out[f"{key}.lora_B.weight"] = np.ascontiguousarray(b[: t.r].T.astype(target_dtype))
            if lcfg.use_dora:
                out[f"{key}.lora_magnitude_vector"] = np.ascontiguousarray(one["m"].astype(target_dtype))
    return out


def save_peft(
    out_dir: str,
    lora,
    lcfg: LoraConfig,
    cfg: LlamaConfig | GPT2Config | Gemma3Config,
    base_model_name_or_path: str | None = None,
    dtype: str = "float32",
    params=None,
    *,
    overwrite: bool = False,
) -> str:
    """Write `lora` as a PEFT adapter directory that `peft.PeftModel.from_pretrained` loads.

    cfg: the base model's config, of its family (fixes the shapes targets are planned against).
    dtype: tensor dtype in the file ("float32", "bfloat16", "float16").
    params: the (trained) parameters, needed only when `lcfg.modules_to_save` is set: those modules'
        weights are written as PEFT writes them (`base_model.model.lm_head.weight`, ...).
    overwrite: replace `out_dir` if it holds a previous adapter export (exactly adapter_config.json
        + adapter_model.safetensors); without it a non-empty `out_dir` is refused. A directory
        holding anything else, or a file at `out_dir`, is refused either way.
    Written into a temporary directory beside `out_dir`, renamed into place when complete: an error
    leaves `out_dir` as it was and nothing behind. Returns the directory.
    """
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype={dtype!r}; choose one of {_DTYPES}")
    check_export_target(out_dir, "peft", overwrite)
    target = np_dtype(dtype)
    shape = shape_from_config(cfg)
    gpt2 = shape.layout.family == "gpt2"
    targets = plan_targets(shape, lcfg)
    tensors = _adapter_tensors(lora, lcfg, targets, target, shape.layout)
    if lcfg.modules_to_save:
        if params is None:
            raise ConfigError(
                f"lcfg.modules_to_save={list(lcfg.modules_to_save)}: pass params= (the trained "
                "parameters) so save_peft can write those modules' weights"
            )
        scan = shape.layout.layers in params
        for e in _saved_entries(cfg, lcfg.modules_to_save):
            leaf = get_path(params, flax_path(e, scan))
            t = np.asarray(jax.device_get(leaf[e.layer] if (scan and e.layer is not None) else leaf))
            t = t.T if e.transpose else t
            if t.shape != e.hf_shape:
                raise ConfigError(
                    f"params tensor for {e.hf_key} has shape {list(t.shape)} but cfg implies "
                    f"{list(e.hf_shape)}; pass the params and model config of one model"
                )
            tensors[PREFIX + e.hf_key] = np.ascontiguousarray(t.astype(target))
    base = None if base_model_name_or_path is None else os.fspath(base_model_name_or_path)
    config = peft_config_dict(lcfg, base, [shape.layout.hf_module(t.layer, t.name) for t in targets])
    config["fan_in_fan_out"] = gpt2  # GPT-2's Conv1D stores [in, out] (PEFT sets it for Conv1D anyway)
    with atomic_dir(out_dir, "peft", overwrite) as tmp:
        save_file(tensors, os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(tmp, ADAPTER_CONFIG), "w") as f:
            # top level sorted as PEFT writes it; pattern dicts keep their order (first match wins)
            json.dump(dict(sorted(config.items())), f, indent=2)
    return os.path.abspath(out_dir)


# -------------------------------------------------------------------------------------------- load
def _canonical(key: str) -> str:
    """PEFT-saved key form: drop the adapter name that model state dicts carry (`.default.`)."""
    key = re.sub(r"\.(lora_A|lora_B)\.default\.weight$", r".\1.weight", key)
    key = re.sub(r"\.lora_magnitude_vector(\.default)?(\.weight)?$", ".lora_magnitude_vector", key)
    return key.replace(".modules_to_save.default.", ".")


def _read_tensors(adapter_dir: str) -> dict[str, np.ndarray]:
    path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if not os.path.isfile(path):
        pickled = [f for f in ("adapter_model.bin", "adapter_model.pt") if os.path.isfile(os.path.join(adapter_dir, f))]
        if pickled:
            raise CheckpointFormatError(
                f"{adapter_dir} holds only a pickled adapter ({', '.join(pickled)}); lora_jax never unpickles. "
                "Convert it once with peft: PeftModel.from_pretrained(base, dir).save_pretrained(dir, "
                "safe_serialization=True)"
            )
        raise CheckpointFormatError(
            f"no {ADAPTER_WEIGHTS} in {adapter_dir}; pass a directory written by "
            "peft's save_pretrained or lora_jax.save_peft"
        )
    out: dict[str, np.ndarray] = {}
    try:
        with safe_open(path, framework="np") as f:
            for key in f.keys():
                canon = _canonical(key)
                if canon in out:
                    raise CheckpointFormatError(
                        f"{path} holds {key!r} twice (with and without the adapter name); keep one"
                    )
                out[canon] = f.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as e:
        if isinstance(e, CheckpointFormatError):
            raise
        raise CheckpointFormatError(
            f"cannot read {path}: {e}. The file is truncated or not safetensors; copy or export the adapter again"
        ) from None
    return out


def _read_checked(adapter_dir, params):
    """Config, targets, and the adapter's tensors, all validated against `params`."""
    adapter_dir = os.fspath(adapter_dir)
    shape = model_shape(params)
    gpt2 = shape.layout.family == "gpt2"
    lcfg = read_peft_config(adapter_dir, fan_in_fan_out=gpt2)
    try:
        targets = plan_targets(shape, lcfg)
    except ConfigError as e:
        raise CheckpointFormatError(f"adapter {adapter_dir} does not fit this base model: {e}") from None
    tensors = _read_tensors(adapter_dir)

    expected: dict[str, tuple[int, ...]] = {}
    for t in targets:
        key = PREFIX + shape.layout.hf_module(t.layer, t.name)
        expected[f"{key}.lora_A.weight"] = (t.r, t.fan_in)
        expected[f"{key}.lora_B.weight"] = (t.fan_out, t.r)
        if lcfg.use_dora:
            expected[f"{key}.lora_magnitude_vector"] = (t.fan_out,)
    base_cfg = _config_from_params(params)
    base = {PREFIX + e.hf_key: e for e in hf_entries(base_cfg)}
    try:
        saved = (
            {PREFIX + e.hf_key: e for e in _saved_entries(base_cfg, lcfg.modules_to_save)}
            if lcfg.modules_to_save
            else {}
        )
    except ConfigError as e:
        raise CheckpointFormatError(f"adapter {adapter_dir}: {e}") from None
    # PEFT's save_embedding_layers writes embed_tokens / lm_head weights without modules_to_save;
    # PEFT loads them into the base, and so does apply_modules_to_save.
    layout = shape.layout
    for key in (f"{PREFIX}{layout.hf_base}.{layout.embed}.weight", f"{PREFIX}{layout.lm_head}.weight"):
        if key in tensors and key in base:
            saved.setdefault(key, base[key])
    for key, entry in saved.items():
        expected[key] = entry.hf_shape

    missing = sorted(k for k in expected if k not in tensors)
    extra = sorted(k for k in tensors if k not in expected)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing tensors: {_short(missing)}")
        if extra:
            hint = ""
            if any(_LORA_KEY.match(k) for k in extra):
                hint = (
                    " (adapter weights for modules or layers that adapter_config.json does not target on "
                    "this base: a different base model, or a config that does not match the weights)"
                )
            elif any(k.startswith(PREFIX) and k in base for k in extra):
                hint = " (base weights for modules not in modules_to_save)"
            parts.append(f"unexpected tensors: {_short(extra)}{hint}")
        raise CheckpointFormatError(f"adapter {adapter_dir}: " + "; ".join(parts))
    for key, want in expected.items():
        got = tuple(tensors[key].shape)
        if got != tuple(want):
            raise CheckpointFormatError(
                f"adapter {adapter_dir}: tensor {key} has shape {list(got)} but this base model and "
                f"{ADAPTER_CONFIG} imply {list(want)}; the adapter was made for a different base model "
                "(or its config does not match its weights)"
            )
    module_tensors = {saved[k]: tensors[k] for k in saved}
    return lcfg, shape, targets, tensors, module_tensors


def load_peft(adapter_dir: str, params, *, dtype: Any = jnp.float32, return_params: bool = False):
    """Read a PEFT LoRA/DoRA adapter directory for `params` -> `(lora, lcfg)`.

    The adapter tree follows `params` (scanned layers or not). dtype: of a, b and m (scales are fp32).
    Adapters with `modules_to_save` also carry trained base-module weights (e.g. lm_head): pass
    `return_params=True` to get `(lora, lcfg, params)` with them applied, or call
    `apply_modules_to_save(params, adapter_dir)`; without either they are not applied (a warning says so).
    Errors (unsupported config, missing / unexpected keys, wrong shapes, unreadable file) are
    `CheckpointFormatError`s naming the key or option.
    """
    lcfg, shape, targets, tensors, module_tensors = _read_checked(adapter_dir, params)
    lora = _tree_from_tensors(lcfg, shape, targets, tensors, dtype)
    if return_params:
        return lora, lcfg, _apply_modules(params, module_tensors)
    if module_tensors:
        warnings.warn(
            f"adapter {os.fspath(adapter_dir)} holds trained weights for "
            f"{sorted({_module_of(e.hf_key) for e in module_tensors})} (modules_to_save), which "
            "load_peft does not apply to params; use load_peft(..., return_params=True) or "
            "apply_modules_to_save(params, adapter_dir)",
            UserWarning,
            stacklevel=2,
        )
    return lora, lcfg


def apply_modules_to_save(params, adapter_dir: str):
    """`params` with the base-module weights a PEFT adapter carries (modules_to_save) put in place
    (new tree; leaves keep their dtype and sharding). The whole adapter is validated first."""
    *_, module_tensors = _read_checked(adapter_dir, params)
    return _apply_modules(params, module_tensors)


def _tree_from_tensors(lcfg: LoraConfig, shape, targets: list[Target], tensors, dtype) -> dict:
    """The adapter tree of validated PEFT tensors (transposed to Flax's `[in, r]` / `[r, out]`)."""

    def leaves_of(t: Target) -> dict[str, np.ndarray]:
        key = PREFIX + shape.layout.hf_module(t.layer, t.name)
        out = {
            "a": tensors[f"{key}.lora_A.weight"].astype(np.float32).T,
            "b": tensors[f"{key}.lora_B.weight"].astype(np.float32).T,
        }
        if lcfg.use_dora:
            out["m"] = tensors[f"{key}.lora_magnitude_vector"].astype(np.float32)
        return out

    return build_tree([(t, leaves_of(t)) for t in targets], shape, dtype)


def _apply_modules(params, module_tensors: dict[Entry, np.ndarray]):
    if not module_tensors:
        return params
    scan = model_shape(params).layout.layers in params
    flat = traverse_util.flatten_dict(params)
    by_leaf: dict[tuple, list[tuple[Entry, np.ndarray]]] = defaultdict(list)
    for e, t in module_tensors.items():
        by_leaf[flax_path(e, scan)].append((e, t))
    for path, items in by_leaf.items():
        leaf = flat[path]
        new = np.array(jax.device_get(leaf))  # a host copy; the original tree is left as is
        for e, t in items:
            t = (t.T if e.transpose else t).astype(new.dtype)
            if scan and e.layer is not None:
                new[e.layer] = t
            else:
                new[...] = t
        sharding = getattr(leaf, "sharding", None)
        flat[path] = jax.device_put(new, sharding) if sharding is not None else jnp.asarray(new)
    return traverse_util.unflatten_dict(flat)
