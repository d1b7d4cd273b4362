"""timm EfficientNet / MobileNetV2 / MobileNetV3 / MobileNetV4 (MBConv family): a block is a site
only where it adds its input back (`has_skip`: stride 1 and equal channels); `out = x + F(x)`."""
from __future__ import annotations

from torch import nn

from ra_probe.plugins._blocks import FamilyAdapter, block_site, chain, is_instance_of
from ra_probe.sites.records import Site

# each block's forward, its children in order (timm/models/_efficientnet_blocks.py)
BRANCHES = {
    "ConvBnAct": ("conv", "bn1", "aa", "drop_path"),
    "DepthwiseSeparableConv": ("conv_s2d", "bn_s2d", "conv_dw", "bn1", "aa", "se", "conv_pw", "bn2", "drop_path"),
    "InvertedResidual": ("conv_s2d", "bn_s2d", "conv_pw", "bn1", "conv_dw", "bn2", "aa", "se", "conv_pwl", "bn3",
                         "drop_path"),
    "EdgeResidual": ("conv_exp", "bn1", "aa", "se", "conv_pwl", "bn2", "drop_path"),
    "UniversalInvertedResidual": ("dw_start", "pw_exp", "dw_mid", "se", "pw_proj", "dw_end", "layer_scale",
                                  "drop_path"),
}


def sites_of(path: str, block: nn.Module) -> list[Site] | None:
    # exact class names: CondConvResidual subclasses InvertedResidual but routes its convs on x
    names = BRANCHES.get(type(block).__name__)
    if names is None or not getattr(block, "has_skip", False):
        return None
    return [block_site(path, chain(block, names))]


ADAPTER = FamilyAdapter(
    "timm-efficientnet", "timm EfficientNet / MobileNetV2 / MobileNetV3 / MobileNetV4 (blocks with has_skip)",
    is_instance_of("timm.models", "EfficientNet", "MobileNetV3", "MobileNetV4"), sites_of)
