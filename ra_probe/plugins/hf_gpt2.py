"""Hugging Face GPT-2 (pre-LN decoder): two identity sites per block, `x₁ = x + attn(ln_1(x))` and
`y = x₁ + mlp(ln_2(x₁))`; x₁ is read at the input of `ln_2`, the causal/padding mask comes from the
attention's captured call.
Each layer is also one block site, its residual update layer(x) − x (the default: see `both_levels`)."""
from __future__ import annotations

from torch import nn

from ra_probe.plugins._blocks import FamilyAdapter, has_layout, hf_layout, pre_norm_sites
from ra_probe.sites.records import Site

LAYOUT = ("ln_1", "attn", "ln_2", "mlp")


def sites_of(path: str, block: nn.Module) -> list[Site] | None:
    return pre_norm_sites(path, block, *LAYOUT) if has_layout(block, *LAYOUT) else None


ADAPTER = FamilyAdapter("hf-gpt2", "Hugging Face GPT-2 (pre-LN attention and MLP sites per block)",
                        hf_layout(*LAYOUT), sites_of)
