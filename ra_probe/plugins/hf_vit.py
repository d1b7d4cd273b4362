"""Hugging Face ViT (pre-LN): two identity sites per layer, `x₁ = x + λ₁ dropout(attn(LN_before(x)))` and
`y = x₁ + λ₂ dropout(mlp(LN_after(x₁)))`, λ BEiT's layer scale (`lambda_1`, `lambda_2`; 1 when absent);
x₁ is read at the input of `layernorm_after`. The MLP is `mlp` and the layer's `dropout` in transformers 5,
`intermediate` then `output`'s dense and dropout in 4.x (where ViT's `output` also adds the skip)."""
from __future__ import annotations

import torch
from torch import nn

from ra_probe.plugins._blocks import FamilyAdapter, call_with, first_output, has_layout, hf_layout, transformer_sites
from ra_probe.sites.records import Site, Tap

COMMON = ("layernorm_before", "attention", "layernorm_after")
LAYOUTS = (("mlp", "dropout"), ("intermediate", "output.dense", "output.dropout"))


def _scaled(layer: nn.Module, index: int, x: torch.Tensor) -> torch.Tensor:
    scale = getattr(layer, f"lambda_{index}", None)
    return x if scale is None else scale * x


def sites_of(path: str, layer: nn.Module) -> list[Site] | None:
    if not any(has_layout(layer, *COMMON, *own) for own in LAYOUTS) or hasattr(layer, "window_size"):
        return None  # Swin's layers share the layout but attend within shifted windows: the generic detector's
    if has_layout(layer, *LAYOUTS[0]):  # transformers 5
        after_attention, feed_forward = layer.dropout, lambda h: layer.dropout(layer.mlp(h))
    else:  # 4.x: the attention drops out inside
        after_attention, feed_forward = nn.Identity(), lambda h: layer.output.dropout(layer.output.dense(layer.intermediate(h)))

    def attn(x, ctx):
        return _scaled(layer, 1, after_attention(first_output(call_with(layer.attention, layer.layernorm_before(x), ctx))))

    def mlp(x, ctx):
        return _scaled(layer, 2, feed_forward(layer.layernorm_after(x)))
    return transformer_sites(path, attn, mlp, Tap(f"{path}.layernorm_after", "input"),
                             ctx_module=f"{path}.attention")


ADAPTER = FamilyAdapter("hf-vit", "Hugging Face ViT (pre-LN attention and MLP sites per layer)",
                        lambda model: any(hf_layout(*COMMON, *own)(model) for own in LAYOUTS), sites_of)
