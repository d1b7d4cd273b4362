"""Hugging Face GPT-2 (pre-LN decoder): two identity sites per block, `x₁ = x + attn(ln_1(x))` and
`y = x₁ + mlp(ln_2(x₁))`; x₁ is read at the input of `ln_2`, the causal/padding mask comes from the
attention's captured call."""
from __future__ import annotations

from torch import nn

from ra_probe.plugins._blocks import (FamilyAdapter, call_with, first_output, has_layout, hf_layout,
                                      transformer_sites)
from ra_probe.sites import Site, Tap

LAYOUT = ("ln_1", "attn", "ln_2", "mlp")


def sites_of(path: str, block: nn.Module) -> list[Site] | None:
    if not has_layout(block, *LAYOUT):
        return None

    def attn(x, ctx):
        return first_output(call_with(block.attn, block.ln_1(x), ctx))

    def mlp(x, ctx):
        return block.mlp(block.ln_2(x))
    return transformer_sites(path, attn, mlp, Tap(f"{path}.ln_2", "input"), ctx_module=f"{path}.attn")


ADAPTER = FamilyAdapter("hf-gpt2", "Hugging Face GPT-2 (pre-LN attention and MLP sites per block)",
                        hf_layout(*LAYOUT), sites_of)
