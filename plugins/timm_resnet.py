"""timm ResNet family (ResNet, ResNet-D, SE-ResNet, ResNeXt): BasicBlock and Bottleneck, each one site
`out = ReLU(skip(x) + F(x))` with `skip` the downsample path when the block has one."""
from __future__ import annotations

from torch import nn

from ra_probe.sites import Site, Tap


def _bottleneck_branch(block: nn.Module):
    def branch(x, ctx):
        x = block.act1(block.bn1(block.conv1(x)))
        x = block.aa(block.act2(block.drop_block(block.bn2(block.conv2(x)))))
        x = block.bn3(block.conv3(x))
        return _tail(block, x)
    return branch


def _basic_branch(block: nn.Module):
    def branch(x, ctx):
        x = block.aa(block.act1(block.drop_block(block.bn1(block.conv1(x)))))
        x = block.bn2(block.conv2(x))
        return _tail(block, x)
    return branch


def _tail(block: nn.Module, x):
    if block.se is not None:
        x = block.se(x)
    if block.drop_path is not None:
        x = block.drop_path(x)
    return x


class TimmResNetAdapter:
    name = "timm-resnet"
    description = "timm ResNet / ResNet-D / SE-ResNet / ResNeXt (BasicBlock, Bottleneck; post-activation ReLU)"
    fallback = False

    def find(self, model: nn.Module) -> list[Site] | None:
        try:
            from timm.models.resnet import BasicBlock, Bottleneck, ResNet
        except ImportError:
            return None
        if not isinstance(model, ResNet):
            return None
        sites = []
        for path, block in model.named_modules():
            if isinstance(block, Bottleneck):
                branch, post = _bottleneck_branch(block), block.act3
            elif isinstance(block, BasicBlock):
                branch, post = _basic_branch(block), block.act2
            else:
                continue
            sites.append(Site(
                name=path, module_path=path, branch=branch,
                input_tap=Tap(path, "input"), output_tap=Tap(path, "output"),
                kind="identity" if block.downsample is None else "projection",
                skip=block.downsample, post=post, post_name="relu",
            ))
        return sites


ADAPTER = TimmResNetAdapter()
