"""Language models: token positions (all real tokens or the last one), block sites beside attention and
MLP sites, Transformer Block Coupling, RA2 alignment in wide calls, and collapse on next tokens, checked
against dense Jacobians built with autograd the way the coupling paper builds them."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import tiny_models
import torch
import transformers as tf

from ra_probe import load_report, probe
from ra_probe.engine import DenseOperator, JacobianOperator
from ra_probe.errors import UserError
from ra_probe.metrics import nc as nc_metrics
from ra_probe.metrics import ra as ra_metrics
from ra_probe.pipeline.measure import GroupMeasurement, _measure_alignment, alignment_partners
from ra_probe.pipeline.settings import Settings
from ra_probe.sites.records import Site, Tap

TEXT = {"vocab_size": 40, "max_position_embeddings": 8}
LAYERS = dict(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32)
MODELS = {  # class, config, sites at the family's default level
    "gpt2": ("GPT2LMHeadModel", tf.GPT2Config(vocab_size=40, n_positions=8, n_embd=16, n_layer=3, n_head=2,
                                              bos_token_id=0, eos_token_id=0), 3),
    "llama": ("LlamaForCausalLM", tf.LlamaConfig(**TEXT, **LAYERS, num_key_value_heads=1, bos_token_id=0,
                                                 eos_token_id=0), 3),
    "bert": ("BertForSequenceClassification", tf.BertConfig(**TEXT, **LAYERS), 6),
}


def tiny(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cls, config, _ = MODELS[family]
    return getattr(tf, cls)(config).eval()


def sentences(n: int = 2, length: int = 6, padded: int = 0) -> dict[str, torch.Tensor]:
    """Token ids; the last sentence has `padded` padding tokens on the right."""
    ids = torch.randint(1, 40, (n, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if padded:
        mask[-1, -padded:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def block_jacobians(model: torch.nn.Module, paths: list[str], inputs: dict, last: bool) -> list[torch.Tensor]:
    """Each block's residual update Jacobian, dense, by one backward pass per output coordinate (as the
    coupling paper builds it): at the last token, ∂(y − x)_T/∂x_T (d × d), or for all tokens
    ∂(y − x)/∂x (T·d × T·d), for the first sentence of `inputs`."""
    model = model.double()
    leaves, outputs, handles = {}, {}, []
    for path in paths:
        layer = model.get_submodule(path)

        def pre(module, args, kwargs, path=path):
            x = (args[0] if args else kwargs["hidden_states"]).detach().requires_grad_(True)
            leaves[path] = x
            return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

        def post(module, args, kwargs, out, path=path):
            outputs[path] = out if isinstance(out, torch.Tensor) else out[0]
        handles += [layer.register_forward_pre_hook(pre, with_kwargs=True),
                    layer.register_forward_hook(post, with_kwargs=True)]
    with torch.enable_grad():
        model(**{k: v[:1] for k, v in inputs.items()})
    for h in handles:
        h.remove()
    jacobians = []
    for path in paths:
        x, y = leaves[path], outputs[path]
        out = y[0, -1] if last else y[0].reshape(-1)
        rows = [torch.autograd.grad(out[r], x, retain_graph=True)[0][0] for r in range(out.numel())]
        J = torch.stack([r[-1] if last else r.reshape(-1) for r in rows])
        jacobians.append(J - torch.eye(J.shape[0], dtype=J.dtype))
    model.float()
    return jacobians


def paper_coupling(Js: list[torch.Tensor], K: int) -> torch.Tensor:
    """The paper's formula on full SVDs: c_ij = ‖ |U_jᵀ J_i V_j| − S_i ‖_F / tr(S_i), top K."""
    svds = [torch.linalg.svd(J) for J in Js]
    L = len(Js)
    out = torch.zeros(L, L, dtype=torch.float64)
    for i in range(L):
        S_i = torch.diag(svds[i][1][:K])
        for j in range(L):
            U, _, Vh = svds[j]
            M = U[:, :K].T @ Js[i] @ Vh[:K].T
            out[i, j] = torch.linalg.norm(M.abs() - S_i) / torch.trace(S_i)
    return out


def test_coupling_agrees_with_the_papers_dense_formula_on_a_tiny_llama():
    model, inputs = tiny("llama"), sentences(1)
    report = probe(model, inputs, k=8, coupling_k=(3, 8), tokens="last", site_level="block", dtype="float64",
                   tol=1e-12, null="none")
    groups = report["metrics"]["coupling"]["groups"]
    assert len(groups) == 1 and groups[0]["sites"] == ["model.layers.0", "model.layers.1", "model.layers.2"]
    Js = block_jacobians(model, groups[0]["sites"], inputs, last=True)
    for K in (3, 8):
        expected = paper_coupling(Js, K)
        got = torch.tensor(groups[0]["matrices"][str(K)], dtype=torch.float64)
        assert torch.allclose(got, expected, atol=1e-4), (K, got, expected)
        off = ~torch.eye(3, dtype=torch.bool)
        assert groups[0]["mean"][str(K)] == pytest.approx(expected[off].mean().item(), abs=1e-4)
        assert expected[off].min() > 1e-3  # random blocks are not coupled: the test compares real numbers


@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("tokens", ["all", "last"])
def test_block_sites_measure_the_dense_jacobian_of_the_chosen_tokens(family, tokens):
    model, inputs = tiny(family), sentences(1, length=4)
    report = probe(model, inputs, k=4, tokens=tokens, site_level="block", dtype="float64", tol=1e-12, null="none")
    assert report["settings"]["tokens"] == tokens and report["settings"]["site_level"] == "block"
    sites = report["sites"]
    assert len(sites) == 3 and all(s["level"] == "block" for s in sites)
    for site, J in zip(sites, block_jacobians(model, [s["name"] for s in sites], inputs, last=tokens == "last")):
        assert J.shape[0] == (16 if tokens == "last" else 4 * 16)
        # the report's shapes are the Jacobian's: one token's at the last token (before: T × d there too)
        assert site["input_shape"] == site["output_shape"] == ([16] if tokens == "last" else [4, 16])
        expected = torch.linalg.svdvals(J)[:4]
        assert torch.allclose(torch.tensor(site["singular_values"], dtype=torch.float64), expected, rtol=1e-6)


@pytest.mark.parametrize("family", list(MODELS))
def test_last_token_runs_take_the_last_real_token_of_padded_sentences(family):
    """Default sites of each family (blocks for decoders, attention and MLP for BERT); a sentence padded
    on either side is measured at its last real token: as the same sentence without padding."""
    model, inputs = tiny(family), sentences(1, length=6)
    _, _, count = MODELS[family]
    plain = probe(model, {k: v[:, :4] for k, v in inputs.items()}, k=3, tokens="last", null="none")
    assert len(plain["sites"]) == count and plain["data"]["tokens"] == [4]
    for padding in (slice(4, 6), slice(0, 2)):  # right, then left
        ids, mask = inputs["input_ids"].clone(), torch.ones_like(inputs["input_ids"])
        ids[:, padding], mask[:, padding] = 0, 0
        if padding.start == 0:
            ids[:, 2:] = inputs["input_ids"][:, :4]
        padded = probe(model, {"input_ids": ids, "attention_mask": mask}, k=3, tokens="last", null="none")
        for a, b in zip(plain["sites"], padded["sites"]):
            assert a["name"] == b["name"]
            assert b["singular_values"] == pytest.approx(a["singular_values"], rel=1e-4)
            assert a["singular_values"][0] > 0


def test_tokens_last_refuses_data_without_tokens():
    with pytest.raises(UserError, match="tokens last"):
        probe("bundled/fc-digits", samples=4, k=2, tokens="last", null="none")


def test_batched_alignment_equals_one_pair_at_a_time():
    """M_ij from one wide product per site equals U_jᵀ (J_i V_j) pair by pair, for matrix-free and
    formed operators, and coupling follows from the same M."""
    torch.manual_seed(0)
    B, d, k, L = 2, 12, 5, 4
    weights = [torch.randn(d, d, dtype=torch.float64) / d ** 0.5 for _ in range(L)]
    xs = torch.randn(B, d, dtype=torch.float64)
    ops = {f"s{i}": (JacobianOperator(lambda x, W=W: torch.tanh(x @ W), xs, vectors_per_call=2) if i % 2 else
                     DenseOperator(torch.randn(B, d, d, dtype=torch.float64))) for i, W in enumerate(weights)}
    svds = {}
    for name, op in ops.items():
        U, S, Vh = torch.linalg.svd(op.dense())
        svds[name] = SimpleNamespace(U=U[:, :, :k], S=S[:, :k], V=Vh.mT[:, :, :k])
    members = [Site(name, "", lambda x, c: x, Tap(""), Tap("")) for name in ops]
    out = GroupMeasurement(0, timing={name: {} for name in ops})
    settings = Settings(k=k, align_k=3, coupling_k=(2, 5))
    _measure_alignment(members, alignment_partners(members, settings), svds, ops, settings, out)
    for i in ops:
        for j in ops:
            if i == j:
                continue
            M = svds[j].U.mT @ ops[i].matmat(svds[j].V)
            assert torch.allclose(out.alignment[i, j], ra_metrics.alignment_score(M[:, :3, :3], svds[i].S[:, :3]))
            assert torch.allclose(out.heatmap[i, j], M[:, :3, :3].abs().sum(dim=0))
            for K in (2, 5):
                assert torch.allclose(out.coupling[i, j, K], ra_metrics.coupling_score(M[:, :K, :K], svds[i].S[:, :K]))
    assert ops["s1"].vectors_per_call == 2  # the wide call leaves the solver's vectors per call as it was


def test_coupling_k_above_k_is_refused():
    with pytest.raises(UserError, match="coupling_k"):
        Settings(k=4, coupling_k="3,10").validate()
    settings = Settings(k=10, coupling_k="10, 3,3")
    settings.validate()
    assert settings.coupling_k == (3, 10)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_next_token_collapse_of_a_causal_lm_against_its_head(family):
    """NC of a causal LM: tokens are the samples, next tokens the classes (those seen at least twice), the
    LM head the classifier: the same numbers as NC computed by hand from the model's last hidden states."""
    model = tiny(family)
    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6], [6, 7, 5, 6, 7, 5, 6, 7], [7, 5, 6, 7, 5, 6, 7, 9]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    nc = probe(model, inputs, k=2, null="none", samples=3)["metrics"]["nc"]
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    features = out.hidden_states[-1][:, :-1].reshape(-1, 16)  # after the final norm: the head's input
    labels, predictions = ids[:, 1:].reshape(-1), out.logits[:, :-1].argmax(-1).reshape(-1)
    head = model.get_output_embeddings().weight
    if family == "gpt2":
        assert head is model.transformer.wte.weight  # tied to the input embeddings
    expected = nc_metrics.neural_collapse(features.double(), labels, head.detach(), predictions)
    assert nc["labels_from"] == "next tokens"
    # next tokens 6 (×7), 7 (×7), 5 (×6) seen twice or more (5 a class on average: NC is measured); 9 once
    assert (nc["classes"], nc["classes_dropped"], nc["samples"], nc["samples_dropped"]) == (3, 1, 20, 1)
    for key in ("nc1", "nc2_equinorm_means", "nc2_equinorm_weights", "nc2_equiangular", "nc3", "nc4"):
        assert nc[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-9), key


def test_an_encoder_with_a_classifier_keeps_its_sentence_level_collapse():
    """A sentence classifier's samples stay its sentences (its logits are per sentence, not per token)."""
    nc = probe(tiny("bert"), sentences(6), k=2, null="none")["metrics"]["nc"]
    assert nc["labels_from"] == "predictions" and nc["classifier_classes"] == 2
    assert nc["samples"] + nc["samples_dropped"] == 6


def test_sublayer_sites_chain_attention_and_mlp_in_one_group():
    """Attention and MLP sites are grouped as the residual stream chains them: attn₀, mlp₀, attn₁...,
    each site's input the previous one's output."""
    report = probe(tiny("llama"), sentences(2), k=2, site_level="sublayer", null="none")
    names = [s["name"] for s in report["sites"]]
    assert names == [f"model.layers.{i}.{part}" for i in range(3) for part in ("attn", "mlp")]
    assert {s["group"] for s in report["sites"]} == {0} and report["metrics"]["ra2"]["groups"][0]["sites"] == names


def test_cli_takes_the_llm_options_and_refuses_bad_ones(cli, tmp_path):
    folder = tmp_path / "gpt2"
    tiny("gpt2").save_pretrained(folder)
    code, _, err = cli(folder, "--tokens", "first", "-q")
    assert code == 2 and "tokens must be one of all, last" in err
    code, _, err = cli(folder, "--k", 4, "--coupling-k", "2,8", "-q")
    assert code == 2 and "coupling_k values must be ≤ k" in err
    code, out, err = cli(folder, "--data", "synthetic", "--k", 4, "--samples", 2, "--tokens", "last", "--coupling-k",
                         "2,4", "--null", "none", "--json", "r.json")
    assert code == 0, err
    with open("r.json") as f:  # the cli fixture runs in its own working folder
        report = json.load(f)
    assert report["settings"]["coupling_k"] == [2, 4] and report["metrics"]["coupling"]["K"] == [2, 4]
    assert [s["level"] for s in report["sites"]] == ["block"] * 3


def test_an_llm_report_reads_back_renders_and_compares(cli, tmp_path):
    folder = tmp_path / "gpt2"
    tiny("gpt2").save_pretrained(folder)
    common = ("--data", "synthetic", "--k", 3, "--samples", 2, "--tokens", "last", "--coupling-k", "2,3", "--null", "none")
    assert cli(folder, *common, "--json", "block.json", "--html", "block.html")[0] == 0
    assert cli(folder, *common, "--sites", "sublayer", "--json", "sub.json")[0] == 0
    report = load_report("block.json")  # validated against the schema on the way in
    assert report["metrics"]["nc"]["labels_from"] == "next tokens"
    page = open("block.html", encoding="utf-8").read()
    assert all(f'id="fig-coupling-0-{K}"' in page for K in (2, 3))
    code, out, err = cli("compare", "block.json", "sub.json", "--html", "both.html")
    assert code == 0, err


def test_a_deep_group_measures_a_sample_of_pairs_equal_to_the_exact_ones_and_estimates_the_score():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[tiny_models.ResidualMLP(6) for _ in range(20)], torch.nn.Linear(6, 3)).eval()
    x = torch.randn(6, 6, generator=torch.Generator().manual_seed(1))
    runs = {pairs: probe(model, x, k=3, align_pairs=pairs, null="none", cache=False) for pairs in ("auto", "all")}
    sampled, exact = (runs[p]["metrics"]["ra2"]["groups"][0] for p in ("auto", "all"))
    assert (sampled["pairs"], exact["pairs_measured"], sampled["pairs_measured"]) == (380, 380, 6 * 20)
    measured = [(i, j) for i in range(20) for j in range(20) if sampled["matrix"][i][j] is not None and i != j]
    assert len(measured) == 120 and all(exact["matrix"][i][j] is not None for i in range(20) for j in range(20))
    for i, j in measured:  # a measured pair is the exact run's number
        assert sampled["matrix"][i][j] == pytest.approx(exact["matrix"][i][j], rel=1e-6)
    assert sampled["score"] == pytest.approx(ra_metrics.pair_mean(sampled["matrix"]))
    assert sampled["score"] == pytest.approx(exact["score"], abs=0.05)
    products = {p: sum(s["timing"]["align_products"] for s in runs[p]["sites"]) for p in runs}
    assert products["auto"] / products["all"] == pytest.approx(120 / 380)
    assert runs["auto"]["settings"]["align_pairs"] == "auto"
