"""timm Swin Transformer: two identity sites per block, (shifted) window attention and MLP. The block
takes (B, H, W, C) and flattens its tokens to (B, H·W, C) between the two; both sites are measured on
the flattened tokens, the attention branch restoring the (H, W) grid from the block's
`input_resolution` before it partitions windows."""
from __future__ import annotations

import torch
from torch import nn

from ra_probe.plugins._blocks import FamilyAdapter, is_instance_of, transformer_sites
from ra_probe.sites.records import Site, Tap


def _tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1, 2)


def sites_of(path: str, block: nn.Module) -> list[Site] | None:
    from timm.models.swin_transformer import SwinTransformerBlock

    if not isinstance(block, SwinTransformerBlock):
        return None

    def attn(x, ctx):
        grid = x.unflatten(1, tuple(block.input_resolution))
        return _tokens(block.drop_path1(block._attn(block.norm1(grid))))

    def mlp(x, ctx):
        return block.drop_path2(block.mlp(block.norm2(x)))
    return transformer_sites(path, attn, mlp, Tap(f"{path}.norm2", "input"),
                             entry=Tap(path, "input", _tokens), exit=Tap(path, "output", _tokens))


ADAPTER = FamilyAdapter("timm-swin", "timm Swin Transformer (window attention and MLP sites per block)",
                        is_instance_of("timm.models.swin_transformer", "SwinTransformer"), sites_of)
