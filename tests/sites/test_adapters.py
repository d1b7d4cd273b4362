"""Adapters and the generic detector on random-init timm models, tiny Hugging Face models built from
configs, and modules written here: site counts, kinds, verification against the block output."""
from __future__ import annotations

import pytest
import timm
import tiny_models
import torch
from conftest import TINY
from torch import nn
from torch.func import jacrev

from ra_probe import Settings, probe
from ra_probe.engine import JacobianOperator
from ra_probe.load.data import Samples
from ra_probe.load.models import load_model
from ra_probe.plugins import generic, timm_resnet
from ra_probe.plugins._blocks import FamilyAdapter, block_site, chain
from ra_probe.sites.capture import capture
from ra_probe.sites.registry import find_sites, registered_adapters
from ra_probe.sites.verify import verify_sites


def discover(model: nn.Module, x, adapters=None):
    report = find_sites(model, adapters)
    return verify_sites(report, capture(model, x, report, with_head=False))


def timm_model(name: str, **kwargs) -> nn.Module:
    model = timm.create_model(name, pretrained=False, exportable=True, **kwargs)
    return model.eval().requires_grad_(False)


# name, create_model kwargs, input size, sites, identity sites, adapter
TIMM = [
    ("resnet50", {"zero_init_last": False}, 64, 16, 12, "timm-resnet"),
    ("resnet18", {"zero_init_last": False}, 64, 8, 5, "timm-resnet"),
    ("convnext_tiny", {}, 64, 18, 18, "timm-convnext"),
    ("vit_tiny_patch16_224", {"img_size": 64}, 64, 24, 24, "timm-vit"),
    ("swin_tiny_patch4_window7_224", {}, 224, 24, 24, "timm-swin"),
    ("efficientnet_b0", {}, 64, 9, 9, "timm-efficientnet"),
    ("regnety_002", {}, 64, 13, 9, "timm-regnet"),
]


@pytest.mark.parametrize("name,kwargs,size,count,identity,adapter", TIMM, ids=[t[0] for t in TIMM])
def test_timm_site_counts_verified_against_block_outputs(name, kwargs, size, count, identity, adapter):
    torch.manual_seed(0)
    report = discover(timm_model(name, **kwargs), torch.randn(2, 3, size, size))
    assert report.adapter == adapter
    assert report.skipped == ()
    assert len(report.sites) == count
    assert sum(s.kind == "identity" for s in report.sites) == identity
    assert sum(s.kind == "projection" for s in report.sites) == count - identity
    assert max(s.verify_error for s in report.sites) < 1e-5


@pytest.mark.parametrize("name,kwargs", [("resnet18", {"zero_init_last": False}),
                                         ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8})])
def test_generic_detector_agrees_with_the_family_adapter(name, kwargs):
    torch.manual_seed(0)
    model, x = timm_model(name, **kwargs), torch.randn(2, 3, 32, 32)
    family, found = discover(model, x), discover(model, x, [generic.ADAPTER])
    assert found.adapter == "generic" and found.skipped == ()
    assert [(s["name"], s["kind"], s["post"], s["group"]) for s in found.describe()] == \
           [(s["name"], s["kind"], s["post"], s["group"]) for s in family.describe()]
    captured = capture(model, x, family.sites, with_head=False)
    for ours, theirs in zip(found.sites, family.sites):  # the same branch function on the same input
        record = captured.sites[theirs.name]
        torch.testing.assert_close(ours.branch(record.x, record.ctx), theirs.branch(record.x, record.ctx))


class GatedBlock(nn.Module):
    """Two adds and a side input: h = x + scale·mix(norm(x)); out = relu(h + ff(h))."""

    def __init__(self, width: int):
        super().__init__()
        self.norm, self.mix = nn.LayerNorm(width), nn.Linear(width, width)
        self.ff = nn.Sequential(nn.Linear(width, 2 * width), nn.Tanh(), nn.Linear(2 * width, width))

    def forward(self, x, scale):
        h = x + self.mix(self.norm(x)) * scale
        return torch.relu(h + self.ff(h))


class GatedNet(nn.Module):
    def __init__(self, width: int = 6, depth: int = 3, shared: bool = False):
        super().__init__()
        self.stem, self.gate = nn.Linear(4, width), nn.Linear(4, 1)
        blocks = [GatedBlock(width)] * depth if shared else [GatedBlock(width) for _ in range(depth)]
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        scale, h = torch.sigmoid(self.gate(x)), self.stem(x)
        for block in self.blocks:
            h = block(h, scale)
        return self.head(h)


def test_generic_detector_finds_the_sites_of_an_unseen_module_with_side_inputs():
    torch.manual_seed(0)
    model, x = GatedNet().eval(), torch.randn(5, 4)
    report = discover(model, x)
    assert report.adapter == "generic" and report.skipped == ()
    assert [s.name for s in report.sites] == [f"blocks.{i}.{b}" for i in range(3) for b in ("mix", "ff")]
    assert [s.post_name for s in report.sites] == [None, "relu"] * 3
    assert all(s.kind == "identity" and s.verify_error < 1e-6 for s in report.sites)
    # the extracted branch, side input included, has the Jacobian of scale·mix(norm(x)) per sample
    site, block = report.sites[0], model.blocks[0]
    record = capture(model, x, [site], with_head=False).sites[site.name]
    scale = torch.sigmoid(model.gate(x))
    expected = torch.stack([jacrev(lambda v: block.mix(block.norm(v)) * s)(v) for v, s in zip(record.x, scale)])  # noqa: B023
    dense = JacobianOperator(lambda v: site.branch(v, record.ctx), record.x).dense()
    torch.testing.assert_close(dense, expected, rtol=1e-5, atol=1e-6)


def test_a_block_called_several_times_is_a_site_per_call_each_with_its_own_input_and_side_inputs():
    torch.manual_seed(0)
    model, x = GatedNet(shared=True).eval(), torch.randn(5, 4)
    report = discover(model, x)
    assert report.adapter == "generic" and report.skipped == ()
    assert [s.name for s in report.sites] == [f"blocks.0.{b}@{i}" for i in (1, 2, 3) for b in ("mix", "ff")]
    assert all(s.verify_error < 1e-6 for s in report.sites)
    records = capture(model, x, report.sites, with_head=False).sites
    for before, after in zip(report.sites, report.sites[1:]):  # in forward order: each input is the last output
        torch.testing.assert_close(records[after.name].x, records[before.name].y, rtol=0, atol=0)


FLAT = [(tiny_models.FlatMLP, ["f1", "g1"]), (tiny_models.FlatChain, ["f1", "g1"]),
        (tiny_models.FlatTied, ["f1@1", "f1@2", "f1@3"]), (tiny_models.FlatFunctionalNorm, ["f1", "g1"])]


@pytest.mark.parametrize("model_class,names", FLAT, ids=[f[0].__name__ for f in FLAT])
def test_generic_detector_finds_residual_adds_written_in_the_models_own_forward(model_class, names):
    torch.manual_seed(0)
    model, x = model_class().eval(), torch.randn(5, 8)
    report = discover(model, x)
    assert report.adapter == "generic" and report.skipped == ()
    assert [s.name for s in report.sites] == names
    assert all(s.kind == "identity" and s.verify_error < 1e-6 for s in report.sites)
    records = capture(model, x, report.sites, with_head=False).sites
    for before, after in zip(report.sites, report.sites[1:]):
        torch.testing.assert_close(records[after.name].x, records[before.name].y, rtol=0, atol=0)


def test_a_forward_the_generic_detector_cannot_trace_is_reported_as_skipped():
    report = discover(tiny_models.FlatGuarded().eval(), torch.randn(5, 8))
    assert report.adapter == "generic" and report.sites == ()
    assert [s.name for s in report.skipped] == ["model"]
    assert report.skipped[0].reason.startswith("forward not traceable by torch.fx")


def shared_timm_basic_block() -> nn.Module:
    from timm.models.resnet import BasicBlock

    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    return tiny_models.SharedBlockNet(nn.Conv2d(3, 4, 3, padding=1), BasicBlock(4, 4), head)


def residual_mlp_sites(path: str, module: nn.Module):
    return [block_site(path, chain(module, ["branch"]))] if isinstance(module, tiny_models.ResidualMLP) else None


SHARED = [("mlp", tiny_models.shared_block, residual_mlp_sites, (8,), None),
          ("timm-basic-block", shared_timm_basic_block, timm_resnet.sites_of, (3, 6, 6), "relu")]


@pytest.mark.parametrize("factory,sites_of,shape,post", [s[1:] for s in SHARED], ids=[s[0] for s in SHARED])
def test_a_shared_block_is_a_site_per_call_for_family_adapters_and_the_generic_detector(factory, sites_of, shape,
                                                                                         post):
    torch.manual_seed(0)
    model, x = factory().eval(), torch.randn(2, *shape)
    family = FamilyAdapter("shared", "", lambda m: isinstance(m, tiny_models.SharedBlockNet), sites_of)
    for adapter in (family, generic.ADAPTER):
        report = discover(model, x, [adapter])
        assert report.skipped == ()
        assert [(s.name, s.kind, s.post_name) for s in report.sites] == \
               [(f"block@{i}", "identity", post) for i in (1, 2, 3)]
        assert all(s.verify_error < 1e-6 for s in report.sites)
        records = capture(model, x, report.sites, with_head=False).sites
        torch.testing.assert_close(records["block@1"].x, model.stem(x), rtol=0, atol=0)
        for i in (1, 2):
            torch.testing.assert_close(records[f"block@{i + 1}"].x, records[f"block@{i}"].y, rtol=0, atol=0)


def test_every_call_of_a_shared_block_is_probed():
    samples = Samples(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)), None, "synthetic")
    report = probe(load_model(f"{TINY}:shared_block"), samples, Settings(k=3, batch_size=2))
    assert report["skipped"] == []
    assert [s["name"] for s in report["sites"]] == ["block@1", "block@2", "block@3"]
    for site in report["sites"]:
        assert site["verify_error"] < 1e-6 and site["singular_values"][0] > 0


def test_a_model_without_residual_connections_has_no_sites():
    from ra_probe.load.bundled.fcresnet import FCResNet

    report = discover(FCResNet(skip=False).eval(), torch.randn(4, 64))
    assert report.sites == () and report.skipped == ()


def test_every_builtin_adapter_is_registered_through_entry_points():
    names = [a.name for a in registered_adapters()]
    assert names[-1] == "generic"
    assert {"timm-resnet", "timm-resnetv2", "timm-regnet", "timm-convnext", "timm-vit", "timm-swin",
            "timm-efficientnet", "hf-resnet", "hf-bert", "hf-vit", "hf-gpt2", "hf-llama"} <= set(names)
