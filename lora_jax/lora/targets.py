"""Deciding, once, which projections get an adapter, with what rank and scale (PEFT's rules).

Matching runs on Hugging Face module names (`model.layers.3.self_attn.q_proj`) so `target_modules`,
`exclude_modules`, `layers_to_transform`, `rank_pattern` and `alpha_pattern` mean exactly what they
mean in PEFT. The result, a list of `Target`s, drives init, merge, export and import alike.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

from lora_jax.errors import ConfigError
from lora_jax.lora.config import LoraConfig
from lora_jax.models.layout import LLAMA_LAYOUT, Layout, layout_of, layout_of_params

__all__ = [
    "Target",
    "ModelShape",
    "plan_targets",
    "resolved_targets",
    "model_shape",
    "shape_from_config",
    "hf_module_name",
]


class ModelShape(NamedTuple):
    """What targeting needs to know of a parameter tree."""

    num_layers: int
    scan_layers: bool
    io: dict  # projection name -> (in, out)
    layout: Layout = LLAMA_LAYOUT  # the family's projections, in targeting order


class Target(NamedTuple):
    layer: int
    name: str  # projection, e.g. "q_proj"
    parent: str  # "self_attn" or "mlp"
    r: int
    alpha: float
    scale: float
    fan_in: int
    fan_out: int

    @property
    def hf_name(self) -> str:
        return hf_module_name(self.layer, self.name)


def hf_module_name(layer: int, name: str, layout: Layout = LLAMA_LAYOUT) -> str:
    return layout.hf_module(layer, name)


def model_shape(params, layout: Layout | None = None) -> ModelShape:
    """Layer count, scanning and projection shapes, read off a parameter tree of `layout`'s family
    (default: the family its layer stack names, `layout_of_params`)."""
    layout = layout_of_params(params) if layout is None else layout
    stack, first = layout.layers, layout.projections[0]
    if stack in params:
        layer0 = params[stack]
        num_layers = int(layer0[first.parent][first.module_name]["kernel"].shape[0])
        scan = True
    else:
        keys = [k for k in params if k.startswith(f"{stack}_")]
        if not keys:
            raise ConfigError(
                f"the parameter tree has no '{stack}' or '{stack}_<i>' entries; pass the "
                "params of lora_jax.Llama (from load_pretrained or Llama.init)"
            )
        num_layers, scan, layer0 = len(keys), False, params[f"{stack}_0"]
    io = {}
    for p in layout.projections:
        shape = layer0[p.parent][p.module_name]["kernel"].shape
        io[p.name] = (int(shape[-2]), int(shape[-1]))
    return ModelShape(num_layers, scan, io, layout)


def shape_from_config(cfg, layout: Layout | None = None) -> ModelShape:
    """The `ModelShape` a model config implies, so targets can be planned without parameters."""
    layout = layout_of(cfg) if layout is None else layout
    return ModelShape(cfg.num_hidden_layers, cfg.scan_layers, layout.shapes(cfg), layout)


def _target_match(lcfg: LoraConfig, key: str, targets: str | tuple[str, ...]) -> bool:
    """PEFT's check_target_module_exists; `targets` is `lcfg.target_modules` with `all-linear`
    resolved to the family's projection names."""
    excl = lcfg.exclude_modules
    if excl:
        if isinstance(excl, str):
            if re.fullmatch(excl, key):
                return False
        elif key in excl or any(key.endswith(f".{e}") for e in excl):
            return False
    # PEFT never puts an adapter inside a module it saves whole
    if any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in lcfg.modules_to_save):
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    found = key in targets or any(key.endswith(f".{t}") for t in targets)
    if found and lcfg.layers_to_transform is not None:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        found = m is not None and int(m.group("idx")) in lcfg.layers_to_transform
    return found


def resolved_targets(lcfg: LoraConfig, layout: Layout) -> str | tuple[str, ...]:
    """`lcfg.target_modules`, with `all-linear` resolved to `layout`'s projections (PEFT: every
    Linear / Conv1D but the output head, matched by the last part of their names)."""
    if lcfg.target_modules == "all-linear":
        return tuple(dict.fromkeys(p.module_name for p in layout.projections))
    return lcfg.target_modules


def _pattern_value(pairs, key: str, default):
    """PEFT's get_pattern_key: the first pattern matching the end of the module name."""
    for pattern, value in pairs:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def plan_targets(shape: ModelShape, lcfg: LoraConfig) -> list[Target]:
    """Every adapted (layer, projection), with its rank and scale; errors name what exists."""
    if lcfg.layers_to_transform is not None:
        bad = [i for i in lcfg.layers_to_transform if i >= shape.num_layers]
        if bad:
            raise ConfigError(
                f"layers_to_transform={list(lcfg.layers_to_transform)} includes {bad}, but "
                f"the model has layers 0..{shape.num_layers - 1}"
            )
    layout = shape.layout
    projections = layout.names
    names = [layout.hf_module(i, n) for i in range(shape.num_layers) for n in projections]
    for pattern in (*dict(lcfg.rank_pattern), *dict(lcfg.alpha_pattern)):
        if not any(re.match(rf"(.*\.)?({pattern})$", k) for k in names):
            raise ConfigError(
                f"pattern key {pattern!r} matches no module; module names look like "
                f"{names[0]!r} (projections: {', '.join(projections)})"
            )
    wanted = resolved_targets(lcfg, layout)
    others = [k for k in layout.hf_other_modules(shape.num_layers) if _target_match(lcfg, k, wanted)]
    if others:
        what = (
            "LoRA on embeddings or lm_head is not supported (use modules_to_save for them)"
            if others[0].rsplit(".", 1)[-1] in (layout.embed, layout.lm_head)
            else "PEFT cannot adapt it either"
        )
        raise ConfigError(
            f"target_modules={_show(lcfg.target_modules)} matches {others[0]!r}, which is not a "
            f"projection ({what}); the adaptable modules are {', '.join(projections)} (full names "
            rf"like {names[0]!r}): narrow the pattern, e.g. r'.*\.(q_proj|v_proj)', or use exclude_modules"
        )
    targets = []
    for i in range(shape.num_layers):
        for name in projections:
            key = layout.hf_module(i, name)
            if not _target_match(lcfg, key, wanted):
                continue
            r = _pattern_value(lcfg.rank_pattern, key, lcfg.r)
            alpha = _pattern_value(lcfg.alpha_pattern, key, lcfg.lora_alpha)
            scale = alpha / math.sqrt(r) if lcfg.use_rslora else alpha / r
            fan_in, fan_out = shape.io[name]
            targets.append(Target(i, name, layout.parent(name), r, float(alpha), scale, fan_in, fan_out))
    if not targets:
        raise ConfigError(
            f"target_modules={_show(lcfg.target_modules)} matches no module"
            + (
                f" (with layers_to_transform={list(lcfg.layers_to_transform)})"
                if lcfg.layers_to_transform is not None
                else ""
            )
            + f"; the adaptable modules are {', '.join(projections)} "
            f"(full names like {names[0]!r}), or use 'all-linear'"
        )
    return targets


def _show(t):
    return repr(t) if isinstance(t, str) else repr(list(t))
