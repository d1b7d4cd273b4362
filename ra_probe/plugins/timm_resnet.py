"""timm ResNet family (ResNet, ResNet-D, SE-ResNet, ResNeXt): BasicBlock and Bottleneck, each one site
`out = ReLU(skip(x) + F(x))` with `skip` the downsample path (conv, or avgpool+conv in ResNet-D)."""
from __future__ import annotations

from torch import nn

from ra_probe.plugins._blocks import FamilyAdapter, block_site, chain, is_instance_of
from ra_probe.sites.records import Site

BOTTLENECK = ("conv1", "bn1", "act1", "conv2", "bn2", "drop_block", "act2", "aa", "conv3", "bn3", "se", "drop_path")
BASIC = ("conv1", "bn1", "drop_block", "act1", "aa", "conv2", "bn2", "se", "drop_path")


def sites_of(path: str, block: nn.Module) -> list[Site] | None:
    from timm.models.resnet import BasicBlock, Bottleneck

    if isinstance(block, Bottleneck):
        branch, post = chain(block, BOTTLENECK), block.act3
    elif isinstance(block, BasicBlock):
        branch, post = chain(block, BASIC), block.act2
    else:
        return None
    return [block_site(path, branch, skip=block.downsample, post=post, post_name="relu")]


ADAPTER = FamilyAdapter(
    "timm-resnet", "timm ResNet / ResNet-D / SE-ResNet / ResNeXt (BasicBlock, Bottleneck; post-activation ReLU)",
    is_instance_of("timm.models.resnet", "ResNet"), sites_of)
