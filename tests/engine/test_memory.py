"""Memory sized from what a site's branch saves of one sample's forward: attention maps that grow with
the square of the tokens, an inverted residual's expanded channels, and results that the sizing leaves
as they are."""
from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ra_probe import probe
from ra_probe.engine import JacobianOperator, memory
from ra_probe.engine.memory import auto_batch_size, saved_bytes


def test_an_attention_branch_saves_the_square_of_its_tokens_and_its_chunks_shrink_as_much():
    """A ViT block's attention branch (on the math kernel, as a probe runs it) saves its attention maps,
    heads × tokens²: four times the tokens save more than eight times the bytes, where its MLP branch
    saves four times; the chunks of a probe of the attention site shrink more than the site's
    dimensions grow (a model of memory per dimension shrinks them 4×)."""
    torch.manual_seed(0)
    block = Block(16, num_heads=4).eval().requires_grad_(False)
    args = dict(k=4, align_k=4, width=2, vectors_per_call=4, itemsize=4)
    saved, mlp, chunk = {}, {}, {}
    with sdpa_kernel([SDPBackend.MATH]):
        for tokens in (64, 256):
            x = torch.randn(1, tokens, 16)
            saved[tokens] = saved_bytes(lambda x_: block.attn(block.norm1(x_)), x)
            mlp[tokens] = saved_bytes(lambda x_: block.mlp(block.norm2(x_)), x)
            dims = [[(tokens * 16, tokens * 16, "block", saved[tokens])]]
            chunk[tokens] = auto_batch_size(dims, 10**6, torch.device("cpu"), free=2**30, **args)
    assert saved[256] > 8 * saved[64], saved
    assert 3.5 * mlp[64] <= mlp[256] <= 4.5 * mlp[64], mlp
    assert chunk[64] > 6 * chunk[256], chunk


class InvertedResidual(nn.Module):
    """EfficientNet's block: 1×1 expansion to 6× the channels, 3×3 depthwise, 1×1 projection."""

    def __init__(self, channels: int):
        super().__init__()
        wide = 6 * channels
        self.body = nn.Sequential(nn.Conv2d(channels, wide, 1), nn.ReLU6(), nn.Conv2d(wide, wide, 3, padding=1, groups=wide),
                                  nn.ReLU6(), nn.Conv2d(wide, channels, 1))

    def forward(self, x):
        return self.body(x)


def test_an_inverted_residual_takes_fewer_vectors_per_call_than_its_tangents_allow(monkeypatch):
    """An inverted residual's activations are several times its input: a CPU call that holds 16 vectors'
    tangents within `CPU_CALL_BYTES` would hold many times that in temporaries, so it takes fewer
    vectors, as many as its measured saved bytes allow; the products are those of one call."""
    torch.manual_seed(0)
    branch = InvertedResidual(8).eval().requires_grad_(False)
    x = torch.randn(4, 8, 16, 16)
    tangents = x.numel() * x.element_size()  # one vector of every sample
    monkeypatch.setattr(memory, "CPU_CALL_BYTES", 16 * tangents)
    op = JacobianOperator(branch, x, vectors_per_call=16)
    assert op.saved_bytes() >= 6 * x[0].numel() * x.element_size()  # the expanded channels, at least once
    per_vector = x.shape[0] * memory.TEMPORARIES_PER_SAVED * op.saved_bytes()
    assert op._per_call() == max(1, 16 * tangents // per_vector) < 4, op._per_call()
    V = torch.randn(4, x[0].numel(), 16)
    wide = JacobianOperator(branch, x, vectors_per_call=16)
    monkeypatch.setattr(memory, "CPU_CALL_BYTES", 1 << 40)
    torch.testing.assert_close(op.matmat(V), wide.matmat(V), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(op.rmatmat(V), wide.rmatmat(V), rtol=1e-5, atol=1e-6)
    assert wide._per_call() == 16


def test_the_sizing_leaves_the_singular_values_as_they_are(monkeypatch):
    """A probe with a budget so small that every chunk holds one sample and every call one vector gives
    the singular values of the probe with the default sizing (all samples in one chunk, wide calls)."""
    from tiny_models import ConvNet

    torch.manual_seed(0)
    model, x = ConvNet(width=8), torch.randn(4, 3, 8, 8)
    options = dict(samples=4, k=4, solver="block", cache=False, null="none", device="cpu")
    default = probe(model, x, **options)
    monkeypatch.setattr(memory, "CPU_CALL_BYTES", 1)
    monkeypatch.setattr(memory, "free_bytes", lambda device: 1)
    tiny = probe(model, x, **options)
    assert default["timings"]["samples_per_chunk"] == 4 and tiny["timings"]["samples_per_chunk"] == 1
    for a, b in zip(default.sites, tiny.sites, strict=True):  # up to float32 rounding: a forward of one
        # sample may take other kernels than one of four, and the sites' inputs differ in the last bit
        torch.testing.assert_close(torch.tensor(a["singular_values"]), torch.tensor(b["singular_values"]),
                                   rtol=1e-6, atol=0)
