"""Models the benchmarks share that need nothing of ra_probe, so that a benchmark can build them for an
earlier commit's package as well as for this tree's."""
from __future__ import annotations

import torch


def trained_like(module: torch.nn.Module, decay: float) -> None:
    """Scale the channels of every residual block's last BatchNorm by decay^c (c the channel index): ResNet's
    blocks and EfficientNet's inverted residuals."""
    from timm.models._efficientnet_blocks import InvertedResidual
    from timm.models.resnet import BasicBlock, Bottleneck

    with torch.no_grad():
        for block in module.modules():
            last = block.bn3 if isinstance(block, (Bottleneck, InvertedResidual)) else \
                block.bn2 if isinstance(block, BasicBlock) else None
            if last is not None:
                last.weight.mul_(decay ** torch.arange(float(last.num_features)))
