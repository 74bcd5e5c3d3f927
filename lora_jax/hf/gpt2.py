"""GPT-2's Hugging Face tensor table (`GPT2LMHeadModel`), built from `GPT2_LAYOUT`.

Conv1D weights are stored `[in, out]`, the Flax kernel layout: no entry is transposed. LayerNorms
carry a weight (Flax `scale`) and a bias; the LM head is tied to `transformer.wte`.
"""

from __future__ import annotations

from lora_jax.models.layout import GPT2_LAYOUT

__all__ = ["gpt2_entries"]

# (hf_key, path, layer, transpose, hf_shape, stack): the fields of `lora_jax.hf.names.Entry`, which
# builds them (importing it here would be an import cycle)
Row = tuple[str, tuple[str, ...], int | None, bool, tuple[int, ...], str | None]


def gpt2_entries(cfg) -> list[Row]:
    """Every tensor a `GPT2LMHeadModel` checkpoint of this config holds, in checkpoint order."""
    layout = GPT2_LAYOUT
    dims = layout.dims(cfg)
    d, vocab, stack = dims["embed"], dims["vocab"], layout.layers
    base = layout.hf_base
    entries: list[Row] = [
        (f"{base}.{layout.embed}.weight", (layout.embed, "embedding"), None, False, (vocab, d), None),
        (f"{base}.wpe.weight", ("wpe", "embedding"), None, False, (cfg.n_positions, d), None),
    ]

    def norm(prefix: str, name: str, layer: int | None) -> list[Row]:
        return [
            (f"{prefix}.{name}.weight", (name, "scale"), layer, False, (d,), stack),
            (f"{prefix}.{name}.bias", (name, "bias"), layer, False, (d,), stack),
        ]

    shapes = layout.shapes(cfg)
    ln_1, ln_2 = layout.layer_norms
    for i in range(cfg.n_layer):
        prefix = f"{layout.hf_layers}.{i}"
        entries += norm(prefix, ln_1, i)
        for p in layout.projections:
            if p.parent == "mlp" and p.name == layout.projections[2].name:
                entries += norm(prefix, ln_2, i)  # ln_2 sits between attn and mlp
            fan_in, fan_out = shapes[p.name]
            module = (p.parent, p.module_name)
            key = f"{prefix}.{p.parent}.{p.module_name}"
            entries.append((f"{key}.weight", module + ("kernel",), i, False, (fan_in, fan_out), stack))
            entries.append((f"{key}.bias", module + ("bias",), i, False, (fan_out,), stack))
    entries += norm(base, layout.final_norm, None)
    return entries
