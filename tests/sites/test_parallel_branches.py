"""Blocks whose output is one sum of the skip and several branches, `x + a(h) + b(h)` with h = LN(x)
(Cohere's parallel attention and MLP, written as two adds), are one site whose branch is the branches'
sum: found by torch.fx and on a real forward alike, verified on the block's own input and output, and
measured with the Jacobian of a(h) + b(h)."""
from __future__ import annotations

import pytest
import torch
import transformers as tf
from tiny_models import saved
from torch import nn
from torch.func import jacrev

from ra_probe import probe
from ra_probe.engine.operators import JacobianOperator
from ra_probe.load.models import load_model
from ra_probe.load.samples import Samples
from ra_probe.sites.capture import capture
from ra_probe.sites.discover import discover as discover_sites


class Parallel(nn.Module):
    """x + a(LN(x)) + b(LN(x)), as two adds; `values` branches on the input's values, which torch.fx cannot
    trace (the real forward is watched instead)."""

    def __init__(self, width: int, values: bool = False):
        super().__init__()
        self.norm, self.values = nn.LayerNorm(width), values
        self.a = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))
        self.b = nn.Linear(width, width)

    def branches(self, x):
        h = self.norm(x)
        return self.a(h), self.b(h)

    def forward(self, x):
        if self.values and bool(x.abs().sum() == 0):
            return x
        h = self.norm(x)
        return x + self.a(h) + self.b(h)


class Sequential(Parallel):
    """x₁ = x + a(LN(x)), then x₁ + b(LN(x₁)): two sites, the inner sum being read by the second branch."""

    def forward(self, x):
        x = x + self.a(self.norm(x))
        return x + self.b(self.norm(x))


class Net(nn.Module):
    def __init__(self, block=Parallel, **kwargs):
        super().__init__()
        self.stem, self.head = nn.Linear(4, 6), nn.Linear(6, 3)
        self.blocks = nn.Sequential(block(6, **kwargs), block(6, **kwargs))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def discover(model: nn.Module, x: torch.Tensor):
    return discover_sites(model, Samples(x, None, "tensor"), torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("values", [False, True], ids=["torch.fx", "real forward"])
def test_a_sum_of_the_skip_and_two_branches_is_one_site_with_the_jacobian_of_their_sum(values):
    torch.manual_seed(0)
    model, x = Net(values=values).eval(), torch.randn(3, 4)
    report = discover(model, x)
    # before: torch.fx took x + a(h) alone, its output recomputed from the input; the real forward found the
    # inner add's result exposed nowhere and skipped it (0 sites)
    assert report.adapter == "generic" and report.skipped == ()
    assert [s.name for s in report.sites] == ["blocks.0", "blocks.1"]
    for site in report.sites:
        assert (site.input_tap.module, site.input_tap.where, site.input_tap.fn) == (site.name, "input", None)
        assert (site.output_tap.module, site.output_tap.where) == (site.name, "output")
        assert site.kind == "identity" and site.verify_error < 1e-6
    assert [len(g.sites) for g in report.groups] == [2]  # the first block's output is the second's input
    records = capture(model, x, report.sites, with_head=False).sites
    for site, block in zip(report.sites, model.blocks):
        record = records[site.name]
        expected = torch.stack([jacrev(lambda v: sum(block.branches(v)))(v) for v in record.x])  # noqa: B023
        dense = JacobianOperator(lambda v: site.branch(v, record.ctx), record.x).dense()  # noqa: B023
        torch.testing.assert_close(dense, expected, rtol=1e-5, atol=1e-6)


def test_a_residual_sum_read_again_by_the_next_branch_is_two_sites():
    torch.manual_seed(0)
    model, x = Net(block=Sequential).eval(), torch.randn(3, 4)
    report = discover(model, x)
    assert [s.name for s in report.sites] == [f"blocks.{i}.{b}" for i in (0, 1) for b in ("a", "b")]
    assert all(s.verify_error < 1e-6 for s in report.sites) and report.skipped == ()


def cohere(folder) -> str:
    config = tf.CohereConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8,
                             pad_token_id=0, bos_token_id=0, eos_token_id=0, architectures=["CohereModel"])
    return saved(config, folder)


def test_cohere_parallel_layers_are_one_site_each_measured_as_attention_plus_mlp_of_the_normed_input(tmp_path):
    loaded = load_model(cohere(tmp_path))
    model = loaded.module.double()
    ids = torch.randint(1, 40, (1, 5), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    # before: "a residual add whose result the forward exposes nowhere", no site
    report = probe(loaded, inputs, k=4, dtype="float64", tol=1e-12, null="none")
    assert report["skipped"] == []
    sites = report["sites"]
    assert [s["name"] for s in sites] == ["layers.0", "layers.1"]
    assert all(s["verify_error"] < 1e-10 and s["input_shape"] == [5, 16] for s in sites)
    calls = {}
    hooks = [layer.register_forward_pre_hook(lambda m, a, kw: calls.setdefault(m, (a, kw)), with_kwargs=True)
             for layer in model.layers]
    with torch.no_grad():
        model(**inputs)
    for hook in hooks:
        hook.remove()
    for site, layer in zip(sites, model.layers):
        args, kwargs = calls[layer]
        x = (args[0] if args else kwargs["hidden_states"])[0]
        side = {key: kwargs[key] for key in ("attention_mask", "position_embeddings")}

        def update(v, layer=layer, side=side):
            h = layer.input_layernorm(v[None])
            return (layer.self_attn(hidden_states=h, **side)[0] + layer.mlp(h))[0]
        J = jacrev(update)(x).reshape(5 * 16, 5 * 16)
        expected = torch.linalg.svdvals(J)[:4]
        assert torch.allclose(torch.tensor(site["singular_values"], dtype=torch.float64), expected, rtol=1e-6)
        assert expected[0] > 0
