"""How a layer is called, as transformers 4.x layers are: a block that returns `(y,) + rest` and
takes side inputs, a forward torch.fx traces only with its optional arguments fixed while the model
passes them (a decoder layer given its causal mask), a key/value cache among a traced branch's
side inputs (replayed, it would grow; its positions kept), and a tuple's item read twice."""
from __future__ import annotations

import torch
from torch import nn
from torch.func import jacrev

from ra_probe.engine import JacobianOperator
from ra_probe.sites.capture import capture
from ra_probe.sites.registry import find_sites
from ra_probe.sites.verify import verify_sites


def found(model, x):
    report = find_sites(model, run=lambda: model(x[:1]))
    captured = capture(model, x, report, with_head=False)
    return verify_sites(report, captured), captured


class MaskedPair(nn.Module):
    """`h = f(x) * mask`, returned as `(x + h,) + (weights,)`: the add's result is read nowhere but in
    the returned tuple, and recomputing it needs the mask."""

    def __init__(self, width: int = 6):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))

    def forward(self, x, mask):
        h = self.f(x) * mask
        rest = (h.softmax(-1),)
        return (x + h,) + rest


class Optional(MaskedPair):
    """A flag the forward branches on in Python: torch.fx traces it only with every optional argument
    at its default, which drops the mask the model passes."""

    def forward(self, x, mask=None, output_weights=False):
        h = self.f(x)
        if mask is not None:
            h = h * mask
        out = x + h
        return (out, h.softmax(-1)) if output_weights else (out,)


class Cache:
    """Keys kept across calls, as a transformers cache keeps them: each update returns all of them."""

    def __init__(self):
        self.keys = None

    def update(self, k):
        self.keys = k if self.keys is None else torch.cat([self.keys, k], dim=1)
        return self.keys


class CachedAttention(nn.Module):
    def __init__(self, width: int = 6):
        super().__init__()
        self.k, self.o = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x, past_key_values=None, cache_position=None):
        keys = self.k(x) if past_key_values is None else past_key_values.update(self.k(x))
        length = cache_position[-1] + 1  # positions are not state: T5 reads its query length so
        return self.o(torch.tanh(x * keys.sum(1, keepdim=True) / length))  # a sum over the keys: the cache's length shows


class CachedLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = CachedAttention()

    def forward(self, x, past_key_values=None, cache_position=None):
        return x + self.attn(x, past_key_values=past_key_values, cache_position=cache_position)


class Layers(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layers = nn.ModuleList([layer(), layer()])

    def forward(self, x):
        mask = (x[..., :1] > 0).float()
        for layer in self.layers:
            cache = Cache()  # one per layer, as transformers' caches hold a layer's keys each
            x = layer(x, past_key_values=cache, cache_position=torch.arange(x.shape[1])) \
                if isinstance(layer, CachedLayer) else layer(x, mask=mask)[0]
        return x


def check_branch(model, report, captured):
    """The first site's branch is the layer's own residual branch, by a dense Jacobian."""
    site, layer = report.sites[0], model.layers[0]
    record = captured.sites[site.name]
    dense = JacobianOperator(lambda v: site.branch(v, record.ctx), record.x).dense()
    mask = (record.x[..., :1] > 0).float()
    expected = torch.stack([jacrev(lambda v, m=m: layer.f(v) * m)(v) for v, m in zip(record.x, mask)])
    torch.testing.assert_close(dense, expected.reshape(dense.shape), rtol=1e-4, atol=1e-6)


def test_a_block_returning_its_output_first_in_a_tuple_built_with_side_inputs_is_a_site():
    torch.manual_seed(0)
    model = Layers(MaskedPair).eval()
    report, captured = found(model, torch.randn(3, 4, 6))  # before: "an intermediate value computed with side inputs"
    assert [(s.name, s.output_tap.module, s.output_tap.where) for s in report.sites] == \
           [(f"layers.{i}", f"layers.{i}", "output") for i in (0, 1)] and report.skipped == ()
    assert all(s.verify_error < 1e-6 for s in report.sites)
    check_branch(model, report, captured)


def test_a_forward_traced_with_its_arguments_fixed_is_watched_when_the_model_passes_them():
    torch.manual_seed(0)
    model = Layers(Optional).eval()
    report, captured = found(model, torch.randn(3, 4, 6))  # before: skipped, the branch without the mask
    assert [s.name for s in report.sites] == ["layers.0", "layers.1"] and report.skipped == ()
    assert all(s.verify_error < 1e-6 for s in report.sites)
    check_branch(model, report, captured)
    blind = find_sites(model)  # without a forward the graph is all there is: its sites, verified later
    assert [s.name for s in blind.sites] == ["layers.0", "layers.1"]


def test_a_cache_among_a_traced_branch_side_inputs_is_left_out_when_it_is_replayed():
    torch.manual_seed(0)
    model = Layers(CachedLayer).eval()
    report, captured = found(model, torch.randn(3, 4, 6))  # before: keys doubled by the replay, skipped
    assert [s.name for s in report.sites] == ["layers.0", "layers.1"] and report.skipped == ()
    assert all(s.verify_error < 1e-6 for s in report.sites)


class Attention(nn.Module):
    def __init__(self, width: int = 6):
        super().__init__()
        self.f = nn.Linear(width, width)

    def forward(self, x):
        return x + self.f(x), self.f.weight


class SharedRead(nn.Module):
    """ALBERT's layer: its attention's output read twice, `out[0]`, for the FFN and for the skip."""

    def __init__(self, width: int = 6):
        super().__init__()
        self.attention, self.ffn, self.norm = Attention(width), nn.Linear(width, width), nn.LayerNorm(width)

    def forward(self, x, mask=None):
        out = self.attention(x)
        return (self.norm(torch.tanh(self.ffn(out[0])) + out[0]),) + out[1:]


def test_a_tuple_item_read_twice_is_one_value_and_its_add_a_site():
    torch.manual_seed(0)
    model = Layers(SharedRead).eval()
    report, _ = found(model, torch.randn(3, 4, 6))  # before: the FFN's add unseen, two reads of out[0]
    assert [(s.name, s.post_name) for s in report.sites] == \
           [(f"layers.{i}{b}", post) for i in (0, 1) for b, post in ((".attention", None), ("", "layernorm"))]
    assert report.skipped == () and all(s.verify_error < 1e-6 for s in report.sites)
