"""The model made ready to probe, in place and only for the duration of a probe: nothing of the
caller's model or global torch state is left changed."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ra_probe.load.offload import dispatched
from ra_probe.pipeline.settings import Settings


@contextmanager
def prepared(model: torch.nn.Module, settings: Settings) -> Iterator[torch.nn.Module]:
    """`model` itself, never a copy, made ready to probe for the duration of the block: eval mode,
    parameters frozen, on the probe's device and dtype, eval-mode BatchNorm2d as the per-channel affine
    map it computes, TF32 off (spectra in true float32), and scaled dot-product attention on its math
    kernel (the fused ones have no forward-mode derivative: a timm ViT made without `exportable` or an
    HF model on "sdpa" attention works as it is). A model dispatched across devices (accelerate's
    big-model hooks, `device_map`) keeps every block where it is and only takes the dtype (an offloaded
    weight's meta placeholder too: its hook streams it in that dtype). On exit every module's mode, its
    parameters (the same objects: offloading hooks put new ones in), their grad flags, devices and
    dtypes, the swapped BatchNorms, the TF32 flags and the attention kernels are as they were."""
    modes = {m: m.training for m in model.modules()}
    grads = {p: p.requires_grad for p in model.parameters()}
    data = {p: p.data for p in model.parameters()}
    parameters = {m: dict(m._parameters) for m in model.modules()}
    buffers = {m: dict(m._buffers) for m in model.modules()}
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
    with sdpa_kernel([SDPBackend.MATH]):  # fused attention kernels have no forward-mode derivative
        try:  # everything changed from here on is put back, whatever fails
            model.eval().requires_grad_(False)
            _affine_batch_norms(model, swapped)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
            if dispatched(model):  # torch's own `to`: accelerate's refuses a model with offloaded weights
                yield torch.nn.Module.to(model, dtype=settings.resolved_dtype())
            else:
                yield model.to(settings.resolved_device(), settings.resolved_dtype())
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
            for parent, name, original in swapped:
                setattr(parent, name, original)
            for module, kept in parameters.items():
                module._parameters.update(kept)
            for parameter, tensor in data.items():
                parameter.data = tensor
            for module, kept in buffers.items():
                module._buffers.update(kept)
            for parameter, flag in grads.items():
                parameter.requires_grad_(flag)
            for module, mode in modes.items():
                module.training = mode


class _ChannelAffine(torch.nn.Module):
    """An eval-mode BatchNorm2d as what it computes, x·scale + shift per channel: the same outputs, and
    a forward-mode product of one multiply instead of batch_norm's formula (~15% of a conv J·v on CPU)."""

    def __init__(self, norm: torch.nn.BatchNorm2d):
        super().__init__()
        scale = torch.rsqrt(norm.running_var + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight
        shift = -norm.running_mean * scale + (norm.bias if norm.bias is not None else 0.0)
        self.register_buffer("scale", scale.detach().reshape(1, -1, 1, 1))
        self.register_buffer("shift", shift.detach().reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def _affine_batch_norms(model: torch.nn.Module, swapped: list[tuple[torch.nn.Module, str, torch.nn.Module]]) -> None:
    """Swap every BatchNorm2d that has running statistics for its `_ChannelAffine` (one without them
    normalizes with its batch's statistics, which the independence check reports), recording in
    `swapped` what to put back, as (parent, name, original), as it goes."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is torch.nn.BatchNorm2d and child.running_mean is not None:
                setattr(parent, name, _ChannelAffine(child))
                swapped.append((parent, name, child))
