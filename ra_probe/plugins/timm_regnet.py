"""timm RegNet (RegNetX/Y/Z): Bottleneck `out = act(skip(x) + F(x))` and the pre-activation
PreBottleneck `out = skip(n(x)) + F(n(x))`; blocks without a shortcut (`downsample is None`, RegNetZ
stage entries) are not residual."""
from __future__ import annotations

from torch import nn

from ra_probe.plugins._blocks import FamilyAdapter, block_site, chain, is_instance_of, module_name
from ra_probe.sites.records import Site

BOTTLENECK = ("conv1", "conv2", "se", "conv3", "drop_path")
PRE_BOTTLENECK = ("norm1", "conv1", "norm2", "conv2", "se", "norm3", "conv3", "drop_path")


def sites_of(path: str, block: nn.Module) -> list[Site] | None:
    from timm.models import regnet

    if not isinstance(block, (regnet.Bottleneck, regnet.PreBottleneck)) or block.downsample is None:
        return None
    if isinstance(block, regnet.PreBottleneck):
        return [block_site(path, chain(block, PRE_BOTTLENECK), skip=nn.Sequential(block.norm1, block.downsample))]
    return [block_site(path, chain(block, BOTTLENECK), skip=block.downsample, post=block.act3,
                       post_name=module_name(block.act3))]


ADAPTER = FamilyAdapter("timm-regnet", "timm RegNetX / RegNetY / RegNetZ (bottleneck blocks with a shortcut)",
                        is_instance_of("timm.models.regnet", "RegNet"), sites_of)
