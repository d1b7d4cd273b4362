"""timm Vision Transformers (ViT, DeiT, BEiT, EVA): two identity sites per block, attention and MLP,
`x₁ = x + drop_path(γ₁ ⊙ attn(norm1(x)))`, `y = x₁ + drop_path(γ₂ ⊙ mlp(norm2(x₁)))` (γ: LayerScale,
or BEiT/EVA's gamma vectors); post-norm blocks (ResPostBlock, EvaBlockPostNorm) norm the branch
output instead. x₁ is read at the input of norm2 (pre-norm) or mlp (post-norm). Side inputs of the
attention (attention mask, BEiT's shared relative position bias, EVA's rotary embedding) come from
the block's captured call."""
from __future__ import annotations

import torch
from torch import nn

from ra_probe.plugins._blocks import FamilyAdapter, is_instance_of, side_inputs, transformer_sites
from ra_probe.sites.records import Site, Tap


def _scale(block: nn.Module, index: int, x: torch.Tensor) -> torch.Tensor:
    """LayerScale module `ls{i}` (timm ViT) or gamma vector `gamma_{i}` (BEiT, EVA), when present."""
    layer_scale = getattr(block, f"ls{index}", None)
    if layer_scale is not None:
        return layer_scale(x)
    gamma = getattr(block, f"gamma_{index}", None)
    return x if gamma is None else gamma * x


def _attention_kwargs(block: nn.Module, ctx) -> dict:
    """The block's side inputs under the names its attention takes."""
    side = side_inputs(block, ctx)
    return {name: value for name, value in side.items() if name in ("attn_mask", "is_causal", "rope",
                                                                       "shared_rel_pos_bias")}


def _pre_norm(path: str, block: nn.Module) -> list[Site]:
    def attn(x, ctx):
        return block.drop_path1(_scale(block, 1, block.attn(block.norm1(x), **_attention_kwargs(block, ctx))))

    def mlp(x, ctx):
        return block.drop_path2(_scale(block, 2, block.mlp(block.norm2(x))))
    return transformer_sites(path, attn, mlp, Tap(f"{path}.norm2", "input"), ctx_module=path)


def _post_norm(path: str, block: nn.Module) -> list[Site]:
    def attn(x, ctx):
        return block.drop_path1(block.norm1(block.attn(x, **_attention_kwargs(block, ctx))))

    def mlp(x, ctx):
        return block.drop_path2(block.norm2(block.mlp(x)))
    return transformer_sites(path, attn, mlp, Tap(f"{path}.mlp", "input"), ctx_module=path)


def sites_of(path: str, block: nn.Module) -> list[Site] | None:
    from timm.models import beit, eva, vision_transformer

    if isinstance(block, (vision_transformer.Block, beit.Block, eva.EvaBlock)):
        return _pre_norm(path, block)
    if isinstance(block, (vision_transformer.ResPostBlock, eva.EvaBlockPostNorm)):
        return _post_norm(path, block)
    return None


ADAPTER = FamilyAdapter(
    "timm-vit", "timm ViT / DeiT / BEiT / EVA (attention and MLP sites per block, LayerScale)",
    is_instance_of("timm.models", "VisionTransformer", "Beit", "Eva"), sites_of)
