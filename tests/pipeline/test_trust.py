"""Every number right or visibly undetermined: the ways a probe used to return confident, wrong
results on models and data nobody tuned for, each reproduced on a small case."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY
from tiny_models import ResidualMLP, hf_config, saved
from torch import nn

from ra_probe import Settings, probe
from ra_probe.errors import UserError
from ra_probe.load.bundled.fcresnet import FCResNet
from ra_probe.load.data import Samples, load_samples
from ra_probe.load.loaded import LoadedModel
from ra_probe.load.models import load_model
from ra_probe.metrics.ra import median_rank, rank_summary


def random_fc_resnet() -> LoadedModel:
    torch.manual_seed(0)
    return LoadedModel(FCResNet(), "random-fc-resnet", "factory", input_shape=(64,), num_classes=10,
                       default_data="bundled/digits")


def probed(loaded: LoadedModel, **settings) -> dict:
    samples = load_samples(None, loaded, limit=settings.get("samples", 16))
    return probe(loaded, samples, Settings(**{"samples": 16, **settings}))


def ra3_check(report: dict) -> dict:
    return next(c for c in report["verdict"]["evidence"]["ra"]["checks"] if c["name"] == "RA3")


# ---- RA3: a rank that reaches k says nothing about rank ≤ C when k ≤ C ----

def test_rank_summary_by_hand():
    S = torch.tensor([[1.0, 0.5, 0.001, 0.0], [1.0, 0.5, 0.2, 0.0], [1.0, 0.5, 0.2, 0.1]])
    exact = rank_summary(S, 1e-2, classes=3)  # ranks 2, 3, 4 (= k): the median 3 is exact
    assert exact["rank_median"] == 3 and exact["rank_le_classes"] is True and exact["rank_mean"] is None
    assert exact["rank_saturated"] and exact["rank_at_least"] is None
    saturated = rank_summary(S[[1, 2, 2]], 1e-2, classes=10)  # median 4 = k ≤ C: undetermined
    assert saturated["rank_median"] is None and saturated["rank_at_least"] == 4
    assert saturated["rank_le_classes"] is None and "takes k > C triplets per site (--k 11)" in saturated["undetermined"]
    above = rank_summary(S[[1, 2, 2]], 1e-2, classes=3)  # median ≥ k = 4 > C = 3: known to exceed C
    assert above["rank_median"] is None and above["rank_le_classes"] is False and above["undetermined"] is None


def test_median_rank_over_sites_by_hand():
    def site(rank):
        return {"rank_median": None, "rank_at_least": 16} if rank is None else {"rank_median": rank}
    assert median_rank([site(9), site(9), site(None)], 16) == 9  # the saturated site sorts last
    assert median_rank([site(9), site(10), site(12), site(None)], 16) == 11
    assert median_rank([site(9), site(None), site(None)], 16) is None  # the median itself reaches k
    assert median_rank([site(9), site(None)], 16) is None


@pytest.mark.parametrize("name", ["random", "lowwd"])
def test_saturated_rank_with_k_at_most_classes_never_passes_ra3(name):
    loaded = random_fc_resnet() if name == "random" else load_model("bundled/fc-digits-lowwd")
    report = probed(loaded, k=8, align_k=4)
    ra3 = report["metrics"]["ra3"]
    assert ra3["classes"] == 10 and ra3["fully_connected"]
    saturated = [s for s in ra3["sites"] if s["rank_at_least"] == 8]
    assert saturated and all(s["rank_le_classes"] is None for s in saturated)
    assert ra3["undetermined"] == ["the rank reaches k = 8 ≤ C = 10: whether rank ≤ C takes k > C triplets per site (--k 11) to settle"]
    assert ra3_check(report)["passed"] is not True


def test_a_rank_limit_at_or_above_k_is_a_usage_error(cli):
    code, out, err = cli("check", "bundled/fc-digits", "--k", "8", "--fail-above-rank", "8")
    assert code == 2 and "can never fail" in err and out == ""


# ---- Text: a sentence is measured on its real tokens, whatever its batch companions ----

def text_samples(rows: list[list[int]], side: str = "right") -> Samples:
    """Token ids padded to the longest row on `side`, with the attention mask a tokenizer would give."""
    width = max(map(len, rows))
    ids, mask = torch.zeros(len(rows), width, dtype=torch.long), torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        place = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[i, place], mask[i, place] = torch.tensor(row), 1
    return Samples({"input_ids": ids, "attention_mask": mask}, None, "text")


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_a_sentence_spectrum_does_not_depend_on_its_batch_or_padding_side(family, tmp_path):
    loaded = load_model(saved(hf_config(family), tmp_path))
    short, long = [5, 6, 7], [5, 8, 9, 6, 7, 3]
    settings = Settings(k=3, samples=2, solver="dense")

    def spectra(samples):
        return {s["name"]: torch.tensor(s["singular_values"]) for s in probe(loaded, samples, settings)["sites"]}

    alone = [spectra(text_samples([row])) for row in (short, long)]
    for side in ("right", "left"):
        report = probe(loaded, text_samples([short, long], side), settings)
        assert report["data"]["tokens"] == [3, 6]
        for site in report["sites"]:  # the batch's mean is the mean of the sentences measured alone
            expected = (alone[0][site["name"]] + alone[1][site["name"]]) / 2
            assert torch.allclose(torch.tensor(site["singular_values"]), expected, rtol=1e-4)


# ---- Groups: a trajectory never runs across layers that are not residual ----

def test_a_group_ends_where_a_non_residual_layer_stands_between_sites():
    torch.manual_seed(0)
    model = nn.Sequential(ResidualMLP(8), nn.Linear(8, 8), nn.Tanh(), ResidualMLP(8), ResidualMLP(8))
    loaded = LoadedModel(model, "mixed", "factory", input_shape=(8,))
    report = probe(loaded, Samples(torch.randn(6, 8), None, "x"), Settings(k=3, samples=6))
    groups = [(s["name"], s["group"], s["group_start"]) for s in report["sites"]]
    assert groups == [("0", 0, "first site"),
                      ("3", 1, "its input is not the previous site's output (layers in between)"),
                      ("4", 1, None)]
    assert [g["sites"] for g in report["metrics"]["ra1"]["groups"]] == [["3", "4"]]


# ---- Cache: an entry follows what the model computes, not what it is called ----

FACTORY = '''
import torch
from torch import nn

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.f1, self.f2 = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return x + self.f2(torch.{act}(self.f1(x)))

class Net(nn.Module):
    input_shape = (8,)

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(Block(), Block())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.blocks(x))

def build():
    torch.manual_seed(0)
    return Net()
'''


def test_changed_model_code_with_the_same_name_and_weights_misses_the_cache(cli, tmp_path):
    factory = tmp_path / "net.py"
    reports = []
    for act in ("tanh", "sigmoid"):
        factory.write_text(FACTORY.format(act=act))
        code, _, err = cli("probe", f"{factory}:build", "--data", "synthetic", "--samples", "4", "--k", "3",
                           "--json", f"{act}.json", "--quiet")
        assert code == 0, err
        reports.append(json.loads((tmp_path / f"{act}.json").read_text()))
    assert not any("served from the cache" in m for m in reports[1]["messages"])
    assert reports[0]["sites"][0]["singular_values"] != reports[1]["sites"][0]["singular_values"]


# ---- One undefined sample does not turn a group's RA1/RA2 into null ----

class GatedResidual(nn.Module):
    """x + W relu(x): the branch and its Jacobian are exactly zero where x ≤ 0."""

    def __init__(self, width: int):
        super().__init__()
        self.gate, self.out = nn.ReLU(), nn.Linear(width, width, bias=False)

    def forward(self, x):
        return x + self.out(self.gate(x))


def test_a_sample_with_zero_branches_is_left_out_and_counted():
    torch.manual_seed(0)
    model = nn.Sequential(GatedResidual(6), GatedResidual(6), GatedResidual(6))
    x = torch.rand(5, 6) + 0.1
    x[2] = -x[2]  # every branch of sample 2 is exactly zero
    report = probe(LoadedModel(model, "gated", "factory", input_shape=(6,)), Samples(x, None, "x"),
                   Settings(k=3, samples=5))
    ra1, = report["metrics"]["ra1"]["groups"]
    ra2, = report["metrics"]["ra2"]["groups"]
    assert ra1["undefined_samples"] == 1 and ra2["undefined_samples"] == 1
    assert ra1["linearity"] is not None and ra2["score"] is not None and 0 < ra2["score"] <= 1
    assert report["verdict"]["ra"] != "not_applicable"


# ---- Samples that interact give a clear message, not wrong Jacobians ----

class BatchStatsNet(nn.Module):
    """A conv block whose BatchNorm keeps no running statistics: it normalizes with the batch's own."""

    input_shape = (2, 4, 4)

    def __init__(self):
        super().__init__()
        self.branch = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2, track_running_stats=False))
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head((x + self.branch(x)).flatten(1))


def test_batch_dependent_model_is_refused_with_one_line():
    loaded = LoadedModel(BatchStatsNet(), "batch-stats", "factory", input_shape=(2, 4, 4))
    with pytest.raises(UserError, match="samples interact"):
        probe(loaded, Samples(torch.randn(4, 2, 4, 4), None, "x"), Settings(k=2, samples=4))


def test_probe_leaves_the_callers_torch_state_as_it_was():
    loaded = load_model("bundled/fc-digits")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    try:
        probed(loaded, k=3, samples=4)
        assert torch.backends.cuda.matmul.allow_tf32 is True
        assert torch.equal(torch.rand(3), expected)  # the global generator did not move
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False


# ---- Labels and baselines are checked at the door: exit 2, one line, nothing written ----

@pytest.mark.parametrize("labels, shown", [(range(1, 11), "10"), ([-1] + [0] * 9, "-1")])
def test_labels_outside_the_classifier_rows_are_refused_before_measuring(cli, tmp_path, labels, shown):
    x = load_samples("bundled/digits", load_model("bundled/fc-digits"), limit=10).inputs
    np.savez(tmp_path / "bad.npz", x=x.numpy(), y=np.array(list(labels)))
    code, out, err = cli("probe", "bundled/fc-digits", "--data", "bad.npz", "--json", "r.json")
    assert code == 2 and "labels outside the classifier's rows [0, 10)" in err and shown in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r.json").exists()


def test_baseline_made_on_other_data_or_settings_is_refused(cli, tmp_path):
    assert cli("check", "bundled/fc-digits", "--samples", "8", "--require", "ra", "--json", "base.json")[0] in (0, 1)
    x = load_samples("bundled/digits", load_model("bundled/fc-digits"), limit=9).inputs[1:]
    np.savez(tmp_path / "other.npz", x=x.numpy())
    code, _, err = cli("check", "bundled/fc-digits", "--samples", "8", "--data", "other.npz", "--baseline", "base.json")
    assert code == 2 and "measured on other data" in err
    code, _, err = cli("check", "bundled/fc-digits", "--samples", "8", "--tol", "1e-4", "--baseline", "base.json")
    assert code == 2 and "other settings (tol 0.001 vs 0.0001)" in err


def test_a_model_whose_residual_adds_were_all_skipped_is_not_called_residual_free(cli):
    code, out, _ = cli("sites", f"{TINY}:flat_hidden")
    assert code == 0 and "no usable residual site: 1 residual add(s) found but skipped" in out
    assert "no residual connections found" not in out


def test_the_verdict_of_a_model_whose_adds_were_all_skipped_says_so(tmp_path):
    report = probe(f"{TINY}:flat_hidden", "synthetic", samples=2, k=2)
    reason = report["verdict"]["evidence"]["ra"]["reason"]
    assert report.verdict["ra"] == "not_applicable" and reason.startswith("no usable residual site: 1")
    assert reason in report.to_html()


def test_an_operation_without_a_forward_mode_derivative_is_one_line(cli):
    """A branch that calls a kernel forward-mode AD does not implement: one line naming the site and the
    operation, exit 2, no traceback."""
    code, _, err = cli(f"{TINY}:flash_net", "--data", "synthetic", "--samples", "4", "--k", "2", "--no-cache")
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: site blocks.0: Trying to use forward AD with "
                                                   "_scaled_dot_product_flash_attention_for_cpu")
