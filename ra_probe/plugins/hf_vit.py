"""Hugging Face ViT (pre-LN): two identity sites per layer, `x₁ = x + λ₁ dropout(attn(LN_before(x)))` and
`y = x₁ + λ₂ dropout(mlp(LN_after(x₁)))`, λ BEiT's layer scale (`lambda_1`, `lambda_2`; 1 when absent);
x₁ is read at the input of `layernorm_after`."""
from __future__ import annotations

import torch
from torch import nn

from ra_probe.plugins._blocks import FamilyAdapter, call_with, first_output, has_layout, hf_layout, transformer_sites
from ra_probe.sites.records import Site, Tap

LAYOUT = ("layernorm_before", "attention", "layernorm_after", "mlp", "dropout")


def _scaled(layer: nn.Module, index: int, x: torch.Tensor) -> torch.Tensor:
    scale = getattr(layer, f"lambda_{index}", None)
    return x if scale is None else scale * x


def sites_of(path: str, layer: nn.Module) -> list[Site] | None:
    if not has_layout(layer, *LAYOUT) or hasattr(layer, "window_size"):
        return None  # Swin's layers share the layout but attend within shifted windows: the generic detector's

    def attn(x, ctx):
        return _scaled(layer, 1, layer.dropout(first_output(call_with(layer.attention, layer.layernorm_before(x), ctx))))

    def mlp(x, ctx):
        return _scaled(layer, 2, layer.dropout(layer.mlp(layer.layernorm_after(x))))
    return transformer_sites(path, attn, mlp, Tap(f"{path}.layernorm_after", "input"),
                             ctx_module=f"{path}.attention")


ADAPTER = FamilyAdapter("hf-vit", "Hugging Face ViT (pre-LN attention and MLP sites per layer)",
                        hf_layout(*LAYOUT), sites_of)
