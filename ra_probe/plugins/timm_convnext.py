"""timm ConvNeXt v1 and v2: ConvNeXtBlock `out = shortcut(x) + drop_path(γ ⊙ mlp(norm(dwconv(x))))`
(channels-last MLP between two permutes unless the block uses its conv MLP; GRN inside the v2 MLP)."""
from __future__ import annotations

import torch
from torch import nn

from ra_probe.plugins._blocks import FamilyAdapter, block_site, is_instance_of
from ra_probe.sites.records import Context, Site


def _branch(block: nn.Module):
    def branch(x: torch.Tensor, ctx: Context) -> torch.Tensor:
        x = block.conv_dw(x)
        if block.use_conv_mlp:
            x = block.mlp(block.norm(x))
        else:
            x = block.mlp(block.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        if block.gamma is not None:
            x = x.mul(block.gamma.reshape(1, -1, 1, 1))
        return block.drop_path(x)
    return branch


def sites_of(path: str, block: nn.Module) -> list[Site] | None:
    from timm.models.convnext import ConvNeXtBlock

    if not isinstance(block, ConvNeXtBlock):
        return None
    return [block_site(path, _branch(block), skip=block.shortcut)]


ADAPTER = FamilyAdapter("timm-convnext", "timm ConvNeXt v1 / v2 (depthwise conv + MLP blocks, LayerScale)",
                        is_instance_of("timm.models.convnext", "ConvNeXt"), sites_of)
