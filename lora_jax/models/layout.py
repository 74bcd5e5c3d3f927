"""Each model family's layout, written once: its projections (name, parent module, logical axes of the
`[in, out]` kernel, bias switch), the sizes of those axes for a config, and where its modules sit in
the Flax tree and in Hugging Face checkpoints.

Targeting (`lora.targets`), the HF key table (`hf.names`), sharding, quantisation and the FLOP model
read a `Layout` and spell no projection name themselves, so a new family is its model file plus one
`Layout`, added to `LAYOUTS`.

A projection's shape is its axes' sizes: q_proj's axes `("embed", "heads")` are both how it shards
and, through `Layout.dims`, its `[hidden_size, heads * head_dim]` shape, so the two cannot disagree.

Pure Python, importing nothing from jax or lora_jax: `config.py` (below every model) reads it, and
`flops.py` loads it by file path in processes without JAX.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

__all__ = [
    "Projection",
    "Layout",
    "LLAMA_LAYOUT",
    "QWEN2_LAYOUT",
    "QWEN3_LAYOUT",
    "MISTRAL_LAYOUT",
    "GEMMA3_LAYOUT",
    "GPT2_LAYOUT",
    "LAYOUTS",
    "LAYER_STACKS",
    "layout_of_params",
    "layout_of",
    "config_value",
    "get_path",
    "projection_names",
]


def config_value(cfg: Any, name: str, default: Any = None) -> Any:
    """A field of a config object (lora_jax's or transformers') or of a dict of config.json kwargs;
    `default` where it is absent or None."""
    value = cfg.get(name) if isinstance(cfg, Mapping) else getattr(cfg, name, None)
    return default if value is None else value


def get_path(tree, path):
    """The node of a nested dict at `path` (a tuple of keys): the one tree-path getter."""
    for key in path:
        tree = tree[key]
    return tree


@dataclass(frozen=True)
class Projection:
    """One per-layer linear map. `name` is its HF module name and its Flax `nn.Dense` name; `parent`
    the module holding it; `axes` the logical axes of its `[in, out]` kernel (sharding and shape);
    `bias` the config field that switches its bias on, or a constant."""

    name: str
    parent: str
    axes: tuple[str, str]
    bias: str | bool = False
    # the HF (and Flax) module name where it differs from `name`, the projection's key in the layout
    # (GPT-2 has a `c_proj` under both `attn` and `mlp`: keys "c_proj" and "mlp.c_proj")
    module: str | None = None

    @property
    def module_name(self) -> str:
        return self.module or self.name

    def has_bias(self, cfg: Any) -> bool:
        return bool(config_value(cfg, self.bias, False)) if isinstance(self.bias, str) else bool(self.bias)


@dataclass(frozen=True)
class Layout:
    """A family's module layout. Flax names mirror HF names: layer i is `model.layers.{i}` in a
    checkpoint, `layers` (scanned, stacked) or `layers_{i}` (unrolled) in the Flax tree."""

    family: str  # HF model_type
    projections: tuple[Projection, ...]  # in checkpoint (and targeting) order
    dims: Callable[[Any], Mapping[str, int]]  # config -> size of each logical axis
    layer_norms: tuple[str, ...]  # per-layer norms, checkpoint order
    # per-head norms (weight of size head_dim) inside the attention module, applied to q and k before
    # RoPE (Qwen3's `self_attn.q_norm`, `self_attn.k_norm`); not projections: never targeted
    head_norms: tuple[str, ...] = ()
    head_norm_parent: str = "self_attn"
    hf_base: str = "model"  # HF prefix of the decoder's modules (model.embed_tokens, model.norm)
    layers: str = "layers"
    embed: str = "embed_tokens"
    final_norm: str = "norm"
    lm_head: str = "lm_head"
    lm_head_axes: tuple[str, str] = ("embed", "vocab")
    embed_axes: tuple[str, str] = ("vocab", "embed")
    # the HF modules holding no weight LoRA could adapt, besides the containers, norms and embeddings
    # named above: per layer (relative to it) and at the top; with them, `hf_other_modules` is every
    # module `named_modules()` lists that is not a projection (what PEFT would refuse to adapt)
    layer_extras: tuple[str, ...] = ("mlp.act_fn",)
    top_extras: tuple[str, ...] = ("model.rotary_emb",)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.projections)

    @property
    def parents(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.parent for p in self.projections))

    def projection(self, name: str) -> Projection:
        for p in self.projections:
            if p.name == name:
                return p
        raise KeyError(f"{name!r} is not a projection of {self.family}; they are {', '.join(self.names)}")

    def parent(self, name: str) -> str:
        return self.projection(name).parent

    def shape(self, name: str, cfg: Any) -> tuple[int, int]:
        """`[in, out]` of one projection's Flax kernel (torch's `nn.Linear.weight` is `[out, in]`)."""
        dims = self.dims(cfg)
        fan_in, fan_out = self.projection(name).axes
        return int(dims[fan_in]), int(dims[fan_out])

    def shapes(self, cfg: Any) -> dict[str, tuple[int, int]]:
        return {p.name: self.shape(p.name, cfg) for p in self.projections}

    @property
    def hf_layers(self) -> str:
        return f"{self.hf_base}.{self.layers}"

    def hf_module(self, layer: int, name: str) -> str:
        """The HF module name PEFT matches targets against, e.g. `model.layers.3.self_attn.q_proj`."""
        return f"{self.hf_layers}.{layer}.{self.parent(name)}.{self.projection(name).module_name}"

    def hf_other_modules(self, num_layers: int) -> list[str]:
        """Every HF module name of the model that is not a projection (containers, norms, embeddings,
        activations, `lm_head`, the root `""`), as `named_modules()` of the transformers model has them."""
        base, out = self.hf_base, ["", self.hf_base, f"{self.hf_base}.{self.embed}", self.hf_layers]
        out += [f"{base}.{self.final_norm}", self.lm_head, *self.top_extras]
        for i in range(num_layers):
            layer = f"{self.hf_layers}.{i}"
            rel = [*self.parents, *self.layer_norms, *(f"{self.head_norm_parent}.{n}" for n in self.head_norms)]
            out += [layer, *(f"{layer}.{m}" for m in (*rel, *self.layer_extras))]
        return out

    def layer_path(self, layer: int, scan: bool) -> tuple[str, ...]:
        """Where layer `layer` lives in the Flax tree (scanned: the stack, indexed at `layer`)."""
        return (self.layers,) if scan else (f"{self.layers}_{layer}",)

    def module_path(self, layer: int, name: str, scan: bool) -> tuple[str, ...]:
        return self.layer_path(layer, scan) + (self.parent(name), self.projection(name).module_name)

    def kernel_axes(self) -> dict[tuple[str | None, str], tuple[str, str]]:
        """(parent, module) -> logical axes of its `[in, out]` kernel; parent None: a top-level module."""
        out: dict[tuple[str | None, str], tuple[str, str]] = {
            (p.parent, p.module_name): p.axes for p in self.projections
        }
        out[(None, self.lm_head)] = self.lm_head_axes
        return out


def _llama_dims(cfg: Any) -> dict[str, int]:
    d = config_value(cfg, "hidden_size")
    heads = config_value(cfg, "num_attention_heads")
    kv_heads = config_value(cfg, "num_key_value_heads", heads)
    head_dim = config_value(cfg, "head_dim", d // heads)
    return {
        "embed": d,
        "heads": heads * head_dim,
        "kv_heads": kv_heads * head_dim,
        "mlp": config_value(cfg, "intermediate_size"),
        "vocab": config_value(cfg, "vocab_size"),
    }


LLAMA_LAYOUT = Layout(
    family="llama",
    projections=(
        Projection("q_proj", "self_attn", ("embed", "heads"), "attention_bias"),
        Projection("k_proj", "self_attn", ("embed", "kv_heads"), "attention_bias"),
        Projection("v_proj", "self_attn", ("embed", "kv_heads"), "attention_bias"),
        Projection("o_proj", "self_attn", ("heads", "embed"), "attention_bias"),
        Projection("gate_proj", "mlp", ("embed", "mlp"), "mlp_bias"),
        Projection("up_proj", "mlp", ("embed", "mlp"), "mlp_bias"),
        Projection("down_proj", "mlp", ("mlp", "embed"), "mlp_bias"),
    ),
    dims=_llama_dims,
    layer_norms=("input_layernorm", "post_attention_layernorm"),
)


def _with_biases(layout: Layout, family: str, biases: Mapping[str, str | bool], **changes: Any) -> Layout:
    """`layout` renamed to `family`, with the bias switches of the projections in `biases` changed."""
    projections = tuple(replace(p, bias=biases.get(p.name, p.bias)) for p in layout.projections)
    return replace(layout, family=family, projections=projections, **changes)


# Qwen2: q/k/v always carry a bias, o_proj and the MLP never (transformers hard-codes both)
QWEN2_LAYOUT = _with_biases(
    LLAMA_LAYOUT,
    "qwen2",
    {"q_proj": True, "k_proj": True, "v_proj": True, "o_proj": False, "gate_proj": False}
    | {"up_proj": False, "down_proj": False},
)
# Qwen3: attention biases by `attention_bias`, no MLP bias, RMSNorm over each head of q and k
QWEN3_LAYOUT = _with_biases(
    LLAMA_LAYOUT,
    "qwen3",
    {"gate_proj": False, "up_proj": False, "down_proj": False},
    head_norms=("q_norm", "k_norm"),
)
# Mistral: no biases anywhere
MISTRAL_LAYOUT = _with_biases(LLAMA_LAYOUT, "mistral", {p.name: False for p in LLAMA_LAYOUT.projections})
# Gemma 3 (text): attention biases by `attention_bias`, no MLP bias, per-head q/k norms, and four
# norms per layer (around attention and around the MLP)
GEMMA3_LAYOUT = _with_biases(
    LLAMA_LAYOUT,
    "gemma3_text",
    {"gate_proj": False, "up_proj": False, "down_proj": False},
    head_norms=("q_norm", "k_norm"),
    layer_norms=(
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    ),
)


def _gpt2_dims(cfg: Any) -> dict[str, int]:
    d = config_value(cfg, "n_embd", config_value(cfg, "hidden_size"))  # GPT-2's name, or the common one
    return {
        "embed": d,
        "heads": d,
        "qkv": 3 * d,
        "mlp": config_value(cfg, "n_inner", 4 * d),
        "vocab": config_value(cfg, "vocab_size"),
    }


# GPT-2: HF's Conv1D projections (weights stored `[in, out]`, the Flax kernel layout: no transpose),
# all with biases; a fused q/k/v `c_attn`; `c_proj` under both `attn` and `mlp` (keys "c_proj" and
# "mlp.c_proj"); LayerNorms with biases; learned positions (`wpe`); lm_head tied to `wte`
GPT2_LAYOUT = Layout(
    family="gpt2",
    projections=(
        Projection("c_attn", "attn", ("embed", "qkv"), True),
        Projection("c_proj", "attn", ("heads", "embed"), True),
        Projection("c_fc", "mlp", ("embed", "mlp"), True),
        Projection("mlp.c_proj", "mlp", ("mlp", "embed"), True, module="c_proj"),
    ),
    dims=_gpt2_dims,
    layer_norms=("ln_1", "ln_2"),
    hf_base="transformer",
    layers="h",
    embed="wte",
    final_norm="ln_f",
    layer_extras=("attn.attn_dropout", "attn.resid_dropout", "mlp.act", "mlp.dropout"),
    top_extras=("transformer.wpe", "transformer.drop"),
)

LAYOUTS: dict[str, Layout] = {
    layout.family: layout for layout in (LLAMA_LAYOUT, QWEN2_LAYOUT, QWEN3_LAYOUT, MISTRAL_LAYOUT, GPT2_LAYOUT)
}
LAYOUTS[GEMMA3_LAYOUT.family] = GEMMA3_LAYOUT
# the names of scanned layer stacks ("layers", GPT-2's "h"): a leaf under one has a leading layer axis
LAYER_STACKS = frozenset(layout.layers for layout in LAYOUTS.values())


def layout_of_params(params: Mapping[str, Any]) -> Layout:
    """The layout of a parameter tree, told by its layer stack's name (`layers`, `h`, or `h_0`...);
    families sharing a stack name share projection names, so the first such layout serves."""
    for layout in LAYOUTS.values():
        if layout.layers in params or f"{layout.layers}_0" in params:
            return layout
    return LLAMA_LAYOUT


def layout_of(cfg: Any) -> Layout:
    """The layout of a config's family (its `model_type`; a config without one is a Llama)."""
    family = config_value(cfg, "model_type", "llama")
    if family not in LAYOUTS:
        raise KeyError(f"model_type {family!r} has no layout; known: {', '.join(LAYOUTS)}")
    return LAYOUTS[family]


def projection_names() -> frozenset[str]:
    """Every projection name of every family (what quantisation treats as a projection kernel)."""
    return frozenset(p.module_name for layout in LAYOUTS.values() for p in layout.projections)
