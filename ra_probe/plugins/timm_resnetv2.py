"""timm ResNetV2 (pre-activation, BiT): PreActBasic / PreActBottleneck `out = skip(x) + F(x)` with
F starting at the block's own pre-activation norm1 and the projection skip reading norm1(x) too;
also the post-activation Bottleneck some ResNetV2 variants use (`out = ReLU(skip(x) + F(x))`)."""
from __future__ import annotations

from torch import nn

from ra_probe.plugins._blocks import FamilyAdapter, block_site, chain, is_instance_of, module_name
from ra_probe.sites.records import Site

PREACT_BASIC = ("norm1", "conv1", "norm2", "conv2", "drop_path")
PREACT_BOTTLENECK = ("norm1", "conv1", "norm2", "conv2", "norm3", "conv3", "drop_path")
BOTTLENECK = ("conv1", "norm1", "conv2", "norm2", "conv3", "norm3", "drop_path")


def sites_of(path: str, block: nn.Module) -> list[Site] | None:
    from timm.models import resnetv2

    if isinstance(block, (resnetv2.PreActBasic, resnetv2.PreActBottleneck)):
        names = PREACT_BASIC if isinstance(block, resnetv2.PreActBasic) else PREACT_BOTTLENECK
        skip = None if block.downsample is None else nn.Sequential(block.norm1, block.downsample)
        return [block_site(path, chain(block, names), skip=skip)]
    if isinstance(block, resnetv2.Bottleneck):
        return [block_site(path, chain(block, BOTTLENECK), skip=block.downsample, post=block.act3,
                           post_name=module_name(block.act3))]
    return None


ADAPTER = FamilyAdapter("timm-resnetv2", "timm ResNetV2 / BiT (pre-activation blocks)",
                        is_instance_of("timm.models.resnetv2", "ResNetV2"), sites_of)
