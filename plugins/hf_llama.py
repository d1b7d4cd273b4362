"""Hugging Face Llama-style decoders (Llama, Mistral, Qwen2... any layer with Llama's layout): two
identity sites per layer, `x₁ = x + self_attn(RMSNorm(x))` and `y = x₁ + mlp(RMSNorm(x₁))`. The
attention's side inputs (causal mask, rotary position embeddings (cos, sin), position ids) come
from its captured call; x₁ is read at the input of `post_attention_layernorm`."""
from __future__ import annotations

from torch import nn

from ra_probe.plugins._blocks import (FamilyAdapter, call_with, first_output, has_layout, hf_layout,
                                      transformer_sites)
from ra_probe.sites import Site, Tap

LAYOUT = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


def sites_of(path: str, layer: nn.Module) -> list[Site] | None:
    if not has_layout(layer, *LAYOUT):
        return None

    def attn(x, ctx):
        return first_output(call_with(layer.self_attn, layer.input_layernorm(x), ctx))

    def mlp(x, ctx):
        return layer.mlp(layer.post_attention_layernorm(x))
    return transformer_sites(path, attn, mlp, Tap(f"{path}.post_attention_layernorm", "input"),
                             ctx_module=f"{path}.self_attn")


ADAPTER = FamilyAdapter("hf-llama", "Hugging Face Llama-style decoders (attention and MLP sites per layer; "
                        "mask and rotary embeddings as side inputs)", hf_layout(*LAYOUT), sites_of)
