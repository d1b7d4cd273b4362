"""Hugging Face ResNet (and models of the same layer design, e.g. RegNet): layers with `layer`,
`shortcut` and `activation`, `out = act(shortcut(x) + layer(x))`, the shortcut a 1×1 conv + BatchNorm
(ResNetShortCut) where the shape changes and the identity elsewhere."""
from __future__ import annotations

from torch import nn

from ra_probe.plugins._blocks import FamilyAdapter, block_site, chain, has_layout, hf_layout, module_name
from ra_probe.sites.records import Site

LAYOUT = ("layer", "shortcut", "activation")


def sites_of(path: str, block: nn.Module) -> list[Site] | None:
    if not has_layout(block, *LAYOUT):
        return None
    return [block_site(path, chain(block, ("layer",)), skip=block.shortcut, post=block.activation,
                       post_name=module_name(block.activation))]


ADAPTER = FamilyAdapter("hf-resnet", "Hugging Face ResNet (basic and bottleneck layers, post-activation)",
                        hf_layout(*LAYOUT), sites_of)
