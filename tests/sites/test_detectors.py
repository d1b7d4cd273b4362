"""The generic detector beyond torch.fx: modules watched on a real forward (a transformers model
without adapter), blocks a family adapter leaves, blocks that return tuples or dicts, skips passed in
by the caller, windowed tensors, and a fixed sample of the model zoo through the command line."""
from __future__ import annotations

import inspect
import weakref

import pytest
import timm
import tiny_models
import torch
import transformers as tf
from conftest import TINY
from torch import nn
from torch.func import jacrev

from ra_probe.engine import JacobianOperator
from ra_probe.load.data import Samples
from ra_probe.plugins._blocks import FamilyAdapter, block_site, chain
from ra_probe.sites import registry
from ra_probe.sites.capture import capture
from ra_probe.sites.discover import discover
from ra_probe.sites.registry import find_sites
from ra_probe.sites.verify import verify_sites


def found(model, x, **inputs):
    """Sites found with a real forward available (as the pipeline does) and verified on `x`."""
    run = (lambda: model(x[:1])) if x is not None else (lambda: model(**{k: v[:1] for k, v in inputs.items()}))
    report = find_sites(model, run=run)
    captured = capture(model, x if x is not None else inputs, report, with_head=False)
    return verify_sites(report, captured), captured


def tiny_distilbert():
    torch.manual_seed(0)
    config = tf.DistilBertConfig(vocab_size=40, dim=16, n_layers=2, n_heads=2, hidden_dim=32,
                                 max_position_embeddings=16, attn_implementation="eager")
    return tf.DistilBertModel(config).eval().requires_grad_(False)


def test_a_transformers_model_torch_fx_cannot_trace_is_seen_on_its_real_forward():
    model = tiny_distilbert()
    ids = torch.randint(0, 40, (3, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    blind = find_sites(model)  # without a forward, torch.fx alone: the layers are not traceable
    assert blind.sites == () and any("not traceable by torch.fx" in s.reason for s in blind.skipped)
    report, captured = found(model, None, input_ids=ids, attention_mask=mask)
    assert report.adapter == "generic" and report.skipped == ()
    assert [(s.name, s.kind, s.post_name) for s in report.sites] == \
           [(f"transformer.layer.{i}.{b}", "identity", "layernorm") for i in (0, 1) for b in ("attention", "ffn")]
    assert max(s.verify_error for s in report.sites) < 1e-6
    # the replayed branch is the layer's attention, per sample (no padding: no mask)
    site, layer = report.sites[0], model.transformer.layer[0]
    record = captured.sites[site.name]
    dense = JacobianOperator(lambda v: site.branch(v, record.ctx), record.x).dense()
    if "query" in inspect.signature(layer.attention.forward).parameters:  # transformers 4.x
        def attention(v):
            return layer.attention(v, v, v, torch.ones(v.shape[:2]))[0]
    else:
        def attention(v):
            return layer.attention(v, attention_mask=None)[0]
    expected = torch.stack([jacrev(lambda v: attention(v[None])[0])(v) for v in record.x]).reshape(dense.shape)
    torch.testing.assert_close(dense, expected, rtol=1e-4, atol=1e-6)


SMALL = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
             attn_implementation="eager")
DECODERS = [  # layouts no adapter knows, each with a pitfall: config, sites, kinds
    # a key/value cache among the captured arguments (replayed, it would grow); one parallel residual
    (lambda: tf.GPTNeoXModel(tf.GPTNeoXConfig(intermediate_size=32, **SMALL)), ["layers.0", "layers.1"]),
    # the MLP's add on tokens flattened with the batch (B·T, d) and read back reshaped
    (lambda: tf.OPTModel(tf.OPTConfig(ffn_dim=32, word_embed_proj_dim=16, **SMALL)),
     [f"decoder.layers.{i}.{b}" for i in (0, 1) for b in ("self_attn", "fc1")]),
    # the skip passed into the attention and the MLP by their layer
    (lambda: tf.BloomModel(tf.BloomConfig(vocab_size=40, hidden_size=16, n_layer=2, n_head=2,
                                          attn_implementation="eager")),
     [f"h.{i}.{b}" for i in (0, 1) for b in ("self_attention", "mlp")]),
]


@pytest.mark.parametrize("make,names", DECODERS, ids=["gpt-neox", "opt", "bloom"])
def test_decoders_without_adapter_have_every_residual_site_verified(make, names):
    torch.manual_seed(0)
    model = make().eval().requires_grad_(False)
    ids = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(0))
    report, _ = found(model, None, input_ids=ids, attention_mask=torch.ones_like(ids))
    assert report.skipped == () and [s.name for s in report.sites] == names
    assert all(s.verify_error < 1e-5 for s in report.sites)


def test_a_resnet_family_model_with_block_classes_the_adapter_does_not_know_gets_every_block():
    torch.manual_seed(0)
    model = timm.create_model("skresnet18", pretrained=False).eval().requires_grad_(False)
    report, _ = found(model, torch.randn(2, 3, 32, 32))
    assert report.adapter == "timm-resnet" and report.skipped == ()
    assert len(report.sites) == 8 and sum(s.kind == "projection" for s in report.sites) == 3
    assert [s.module_path for s in report.sites] == [f"layer{i}.{j}" for i in range(1, 5) for j in (0, 1)]
    assert all(s.post_name == "relu" and s.verify_error < 1e-5 for s in report.sites)


class ScaledMLP(tiny_models.ResidualMLP):
    """A later layout of a known block: its branch now has a layer scale, which the adapter below ignores."""

    def __init__(self, width: int):
        super().__init__(width)
        self.gamma = torch.nn.Parameter(torch.linspace(0.2, 2.0, width))

    def forward(self, x):
        return x + self.gamma * self.branch(x)


def test_a_block_whose_family_site_the_forward_refuses_is_handed_to_the_generic_detector(monkeypatch):
    # before: the scaled block was skipped ("post(skip(x)+F(x)) differs from the block output")
    torch.manual_seed(0)
    model = torch.nn.Sequential(tiny_models.ResidualMLP(8), ScaledMLP(8)).eval().requires_grad_(False)
    family = FamilyAdapter("mlp-family", "", lambda m: isinstance(m, torch.nn.Sequential),
                           lambda path, m: [block_site(path, chain(m, ["branch"]))]
                           if isinstance(m, tiny_models.ResidualMLP) else None)
    monkeypatch.setattr(registry, "_RUNTIME", [family])
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    report = discover(model, Samples(x, None, "synthetic"), torch.device("cpu"), torch.float32)
    assert report.skipped == () and report.adapter == "mlp-family"
    assert [(s.name, s.adapter) for s in report.sites] == [("0", "mlp-family"), ("1", "generic")]
    assert all(s.verify_error < 1e-6 for s in report.sites)
    site, block = report.sites[1], model[1]
    record = capture(model, x, report.sites, with_head=False).sites[site.name]
    dense = JacobianOperator(lambda v: site.branch(v, record.ctx), record.x).dense()
    expected = torch.stack([jacrev(lambda v: block.gamma * block.branch(v))(v) for v in record.x])
    torch.testing.assert_close(dense, expected, rtol=1e-5, atol=1e-6)


class AddingAttention(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.dense = torch.nn.Linear(width, width)

    def forward(self, x):
        return x + self.dense(x).tanh()


class LayerWithInnerSite(torch.nn.Module):
    """ALBERT's layout: the layer registers nothing before its attention, whose own forward adds the first
    skip; the layer's forward adds the second after it."""

    def __init__(self, width: int):
        super().__init__()
        self.attention = AddingAttention(width)
        self.ffn = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU())

    def forward(self, x):
        h = self.attention(x)
        return h + self.ffn(h)


def test_sites_are_in_the_order_the_forward_computes_them_and_chain_in_one_group():
    # before: the layer's site (registered first) came before its attention's, and the group split in two
    torch.manual_seed(0)
    model = torch.nn.Sequential(LayerWithInnerSite(6), LayerWithInnerSite(6)).eval().requires_grad_(False)
    report, _ = found(model, torch.randn(3, 6))
    assert [s.name for s in report.sites] == ["0.attention", "0", "1.attention", "1"]
    assert len(report.groups) == 1 and report.skipped == ()


class MixerWithOwnAdd(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.lin = torch.nn.Linear(width, width)

    def forward(self, x):
        return x + self.lin(x).tanh()


class BlockNamingItsBranchAfterTheMixer(torch.nn.Module):
    """EfficientFormerV2's layout: the block's first branch is named after its mixer, which has an add of its own."""

    def __init__(self, width: int):
        super().__init__()
        self.mixer, self.mlp = MixerWithOwnAdd(width), torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU())

    def forward(self, x):
        h = x + 0.5 * self.mixer(x)
        return h + self.mlp(h)


def test_a_branch_named_after_a_child_with_its_own_add_keeps_both_sites_apart():
    # before: both were named "0.mixer", one's captured values overwrote the other's and it was skipped
    # ("its branch cannot be recomputed" with a torch shape error, or a wrong verification)
    torch.manual_seed(0)
    model = torch.nn.Sequential(BlockNamingItsBranchAfterTheMixer(6)).eval().requires_grad_(False)
    x = torch.randn(3, 6)
    report, captured = found(model, x)
    assert sorted(s.name for s in report.sites) == ["0.mixer", "0.mixer:inner", "0.mlp"] and report.skipped == ()
    site = next(s for s in report.sites if s.name == "0.mixer")
    record, mixer = captured.sites[site.name], model[0].mixer
    dense = JacobianOperator(lambda v: site.branch(v, record.ctx), record.x).dense()
    expected = torch.stack([jacrev(lambda v: 0.5 * mixer(v))(v) for v in x])
    torch.testing.assert_close(dense, expected, rtol=1e-5, atol=1e-6)


def test_blocks_returning_tuples_or_dicts_are_sites_and_a_block_taking_a_tuple_is_skipped_in_words():
    torch.manual_seed(0)
    model = tiny_models.OutputShapes().eval()
    report, _ = found(model, torch.randn(4, 8))
    assert [s.name for s in report.sites] == ["pair", "dict"]
    assert all(s.verify_error < 1e-6 for s in report.sites)
    assert [(s.name, s.reason) for s in report.skipped] == \
           [("pair_in:add", "the block's input is a tuple, not one tensor: no Jacobian of one tensor to measure")]


def test_a_skip_the_caller_passes_in_is_a_projection_site_and_a_functional_relu_its_post_op():
    torch.manual_seed(0)
    model = tiny_models.ShortcutTree().eval()
    report, _ = found(model, torch.randn(4, 6))
    assert [(s.name, s.kind, s.post_name) for s in report.sites] == [("tree1", "projection", "relu"),
                                                                     ("tree2", "identity", "relu")]
    assert all(s.verify_error < 1e-6 for s in report.sites)


def test_the_forward_recorder_holds_none_of_the_forwards_activations():
    """The runtime detector's record of a forward keeps no tensor the forward made (it kept the input of
    every elementwise op, which a post-op may replay: at 768 px the whole forward's activations, 0.27 GB
    an attention block), and still replays the post-op after the add on a new value."""
    from ra_probe.sites.detect import runtime

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.made = nn.Linear(6, 6), []

        def forward(self, x):
            h = self.fc(x)
            self.made.append(weakref.ref(h))  # tanh's input
            return torch.relu(x + torch.tanh(h))

    block, x = Block().eval(), torch.randn(3, 6)
    frames = runtime.record(block, lambda: block(x), {""})
    assert len(frames) == 1 and len(frames[0].adds) == 1
    assert block.made[0]() is None
    (site,), _ = runtime.sites_of(frames[0])
    t = torch.randn(3, 6)
    assert site.post_name == "relu" and torch.equal(site.post(t), torch.relu(t))


def test_windowed_tensors_are_measured_per_sample_and_do_not_count_as_interacting_samples():
    torch.manual_seed(0)
    model = tiny_models.Windowed().eval()
    x = torch.randn(3, 4, 4, 4)
    report = discover(model, Samples(x, None, "x"), torch.device("cpu"), torch.float32)  # before: refused as "samples interact"
    assert [s.name for s in report.sites] == ["blocks.0", "blocks.1"]
    assert all(s.in_shape == s.out_shape == (4, 4, 4) for s in report.sites)  # 4 windows of 4 tokens
    # a sample's Jacobian spans its four windows: block-diagonal, one block per window
    site, block = report.sites[0], model.blocks[0]
    record = capture(model, x, [site], with_head=False).sites[site.name]
    dense = JacobianOperator(lambda v: site.branch(v, record.ctx), record.x).dense()
    expected = torch.stack([jacrev(lambda v: block(v) - v)(v) for v in record.x]).reshape(dense.shape)
    torch.testing.assert_close(dense, expected, rtol=1e-5, atol=1e-6)


class ResizedPosition(torch.nn.Module):
    """A position embedding resized to the input's grid and added (as SAM 2's Hiera does), then a
    residual conv block."""

    def __init__(self):
        super().__init__()
        self.pos = torch.nn.Parameter(torch.randn(1, 3, 2, 2))
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        x = x + torch.nn.functional.interpolate(self.pos, size=x.shape[-2:])
        return x + self.conv(x)


def test_two_heads_averaged_and_a_position_embedding_are_not_residual_sites():
    torch.manual_seed(0)
    model = timm.create_model("levit_128s", pretrained=False, img_size=32).eval()  # distillation heads averaged
    names = [s.name for s in find_sites(model).sites]
    assert names and "model" not in names
    report, _ = found(ResizedPosition().eval(), torch.randn(2, 3, 4, 4))
    assert [(s.name, s.input_tap.where) for s in report.sites] == [("model", "input")] and report.skipped == ()
    assert report.sites[0].verify_error < 1e-6


ZOO = [  # one model per mechanism: (reference, options, sites)
    ("timm/skresnet18", ["--no-pretrained", "--input-shape", "3,32,32"], 8),  # family adapter + generic
    ("timm/dla46x_c", ["--no-pretrained", "--input-shape", "3,32,32"], 12),  # skip passed in, runtime trace
    ("tests/tiny_models.py:Windowed", [], 2),  # windows: rows per sample
]


@pytest.mark.parametrize("ref,options,count", ZOO, ids=[z[0] for z in ZOO])
def test_zoo_sample_is_probed_from_the_command_line(cli, ref, options, count, request):
    ref = str(request.config.rootpath / ref) if ref.startswith("tests/") else ref
    code, out, err = cli(ref, *options, "--data", "synthetic", "--samples", "1", "--k", "2", "--json", "r.json",
                         "--quiet", "--no-cache")
    assert code == 0 and "Traceback" not in out + err
    import json
    from pathlib import Path

    report = json.loads(Path("r.json").read_text())
    assert len(report["sites"]) == count and report["skipped"] == []
    assert all(s["singular_values"][0] > 0 for s in report["sites"])


def test_a_forward_torch_fx_cannot_trace_has_its_adds_found_and_a_module_without_adds_is_not_skipped(cli):
    code, out, _ = cli("sites", f"{TINY}:flat_guarded")  # a test on values: before, "not traceable", no site
    assert code == 0 and "│ model │ identity" in out and "Skipped" not in out
    code, out, _ = cli("sites", f"{TINY}:flat_hidden")  # one add found, read by no module: one skip, in words
    assert code == 0 and "1 residual add(s) found but skipped" in out and "exposes nowhere" in out


class TextAndImage(torch.nn.Module):
    """Needs token ids and pixel values (as CLIP does); a forward without the pixels fails on None."""

    def __init__(self):
        super().__init__()
        self.embed, self.conv = torch.nn.Embedding(10, 4), torch.nn.Conv2d(3, 4, 1)

    def forward(self, input_ids=None, pixel_values=None):
        return self.embed(input_ids).mean(1) + self.conv(pixel_values).mean((2, 3))


def test_a_model_given_only_some_of_the_inputs_it_needs_is_one_line_naming_them():
    from ra_probe.errors import UserError

    samples = Samples({"input_ids": torch.randint(0, 10, (2, 3))}, None, "synthetic")
    with pytest.raises(UserError, match="^data 'synthetic' does not fit the model: the model also takes "
                                        "pixel_values, which the data does not give$"):
        discover(TextAndImage().eval(), samples, torch.device("cpu"), torch.float32)  # before: AttributeError on None.shape


class OldStyleGelu(torch.autograd.Function):
    """A custom op written without setup_context (as Bloom's GELU is): torch.func cannot use it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.nn.functional.gelu(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        normal = torch.distributions.Normal(0.0, 1.0)
        return grad * (normal.cdf(x) + x * normal.log_prob(x).exp())  # GELU's derivative, Φ(x) + x φ(x)


class OldGelu(torch.nn.Module):
    def forward(self, x):
        return OldStyleGelu.apply(x)


class CustomFunctionNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.f, self.act, self.head = torch.nn.Linear(4, 4), OldGelu(), torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.head(x + self.act(self.f(x)))


def test_a_branch_with_a_custom_function_torch_func_cannot_differentiate_is_measured_by_autograd():
    from ra_probe import Settings, probe
    from ra_probe.load.loaded import LoadedModel

    torch.manual_seed(0)
    model = CustomFunctionNet().eval().requires_grad_(False)
    x = torch.randn(3, 4)
    # before: "site model: its branch calls a custom autograd.Function that torch.func cannot differentiate"
    report = probe(LoadedModel(model, "custom", "python", input_shape=(4,)), Samples(x, None, "x"),
                   Settings(k=4, samples=3, null="none", solver="dense"))
    branch = lambda v: torch.nn.functional.gelu(model.f(v))  # noqa: E731 - the same branch in plain torch ops
    expected = torch.stack([jacrev(branch)(v) for v in x])
    assert report["sites"][0]["singular_values"] == pytest.approx(
        torch.linalg.svdvals(expected).mean(0).tolist(), rel=1e-4)  # σ_i averaged over the samples
    # the operator's products themselves: J V and Jᵀ U against the dense Jacobian
    operator = JacobianOperator(lambda v, ctx: model.act(model.f(v)), x, {})
    v, u = torch.randn(3, 4, 2), torch.randn(3, 4, 2)
    torch.testing.assert_close(operator.matmat(v), expected @ v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(operator.rmatmat(u), expected.mT @ u, rtol=1e-5, atol=1e-6)


class TanhNoVmapRule(torch.autograd.Function):
    """A modern custom op (setup_context) without a vmap rule: torch.func's vmap refuses it."""

    @staticmethod
    def forward(x):
        return x.tanh()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class TanhNoJvpRule(TanhNoVmapRule):
    """The same op with a vmap rule but no jvp rule: forward-mode products are refused."""

    generate_vmap_rule = True


@pytest.mark.parametrize("function", [TanhNoVmapRule, TanhNoJvpRule])
def test_custom_functions_without_a_vmap_or_jvp_rule_get_their_products_from_autograd(function):
    # before: RuntimeError "does not have vmap support" and NotImplementedError "You must implement the jvp
    # function", a traceback and a refused site where autograd computes the products
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(4, 4), torch.randn(3, 4)
    expected = torch.stack([jacrev(lambda v: layer(v).tanh())(v) for v in x])
    operator = JacobianOperator(lambda v, ctx: function.apply(layer(v)), x, {})
    v, u = torch.randn(3, 4, 2), torch.randn(3, 4, 2)
    torch.testing.assert_close(operator.matmat(v), expected @ v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(operator.rmatmat(u), expected.mT @ u, rtol=1e-5, atol=1e-6)


def test_an_lstm_branch_without_forward_mode_gets_its_products_from_autograd():
    # before: "Trying to use forward AD with mkldnn_rnn_layer ...", the whole probe refused (timm's sequencer)
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(4, 3, batch_first=True, bidirectional=True).eval().requires_grad_(False)
    x = torch.randn(2, 5, 4)
    expected = torch.stack([jacrev(lambda v: lstm(v[None])[0][0])(v).reshape(30, 20) for v in x])
    operator = JacobianOperator(lambda v, ctx: lstm(v)[0], x, {})
    v, u = torch.randn(2, 20, 3), torch.randn(2, 30, 3)
    torch.testing.assert_close(operator.matmat(v), expected @ v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(operator.rmatmat(u), expected.mT @ u, rtol=1e-5, atol=1e-6)
