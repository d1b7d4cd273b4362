"""Hugging Face Llama-style decoders (Llama, Mistral, Qwen2... any layer with Llama's layout): two
identity sites per layer, `x₁ = x + self_attn(RMSNorm(x))` and `y = x₁ + mlp(RMSNorm(x₁))`. The
attention's side inputs (causal mask, rotary position embeddings (cos, sin), position ids) come
from its captured call; x₁ is read at the input of `post_attention_layernorm`.
Each layer is also one block site, its residual update layer(x) − x (the default: see `both_levels`)."""
from __future__ import annotations

from torch import nn

from ra_probe.plugins._blocks import FamilyAdapter, has_layout, hf_layout, pre_norm_sites
from ra_probe.sites.records import Site

LAYOUT = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


def sites_of(path: str, layer: nn.Module) -> list[Site] | None:
    return pre_norm_sites(path, layer, *LAYOUT) if has_layout(layer, *LAYOUT) else None


ADAPTER = FamilyAdapter("hf-llama", "Hugging Face Llama-style decoders (attention and MLP sites per layer; "
                        "mask and rotary embeddings as side inputs)", hf_layout(*LAYOUT), sites_of)
