"""Real answers: the verdict against the same architecture at random init, no pass from inputs that
cannot carry information, reproducible random inits, provenance, and reports that read back."""
from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import TINY
from tiny_models import ResidualMLP, hf_config, saved
from torch import nn

import ra_probe
from ra_probe.errors import UserError
from ra_probe.load.bundled.fcresnet import FCResNet
from ra_probe.load.models import load_model
from ra_probe.load.reinit import random_init, timm_builder
from ra_probe.metrics.nc import neural_collapse
from ra_probe.report.console import print_report
from ra_probe.report.schema import SCHEMA_VERSION, schema_errors


def digits(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    from ra_probe.load.data import load_samples

    samples = load_samples("bundled/digits", load_model("bundled/fc-digits"), limit=n)
    return samples.inputs, samples.labels


def ra_check(report, name: str) -> dict:
    return next(c for c in report["verdict"]["evidence"]["ra"]["checks"] if c["name"] == name)


# ---- the null model: the verdict of a trained network against its own random init ----

def test_trained_model_stands_out_from_its_random_init(bundled_reports):
    report = bundled_reports["fc-digits"]
    null = report["metrics"]["null"]
    assert null["status"] == "measured" and null["seed"] == report["settings"]["seed"] + 1
    # --samples auto: the contrast is decided after the first round of 2 of the null's 8 samples
    assert null["samples"] == report["metrics"]["sampling"]["null_measured"] == 2
    assert report["settings"]["null_samples"] == 8 and null["sites"] == len(report["sites"])
    assert null["init"].startswith("FCResNet(skip=True)")
    contrast = ra_check(report, "RA2 vs init")
    ratio = report["metrics"]["ra2"]["mean_score"] / null["ra2"]["mean_score"]
    assert contrast["passed"] and contrast["value"] == pytest.approx(ratio) and ratio > 10
    assert null["ratio"]["ra2"] == pytest.approx(ratio)
    assert report["verdict"]["ra"] == "present"
    assert "random init" in report["verdict"]["evidence"]["ra"]["control"]
    # the control that trains with less weight decay does not stand out from its init: never present
    lowwd = bundled_reports["fc-digits-lowwd"]
    assert ra_check(lowwd, "RA2 vs init")["passed"] is False and lowwd["verdict"]["ra"] == "absent"
    assert "does not stand out" in lowwd["verdict"]["evidence"]["ra"]["reason"]


def test_random_init_is_never_present_and_the_caller_model_is_untouched():
    torch.manual_seed(3)
    model = FCResNet().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = digits(32)
    report = ra_probe.probe(model, (x, y), samples=32, k=8)
    assert report.verdict["ra"] == "absent"
    assert ra_check(report, "RA2 vs init")["value"] < 4
    assert report["metrics"]["null"]["init"] == "a copy of the module with every layer's reset_parameters()"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cli_trained_and_random_init_verdicts(cli, tmp_path):
    code, out, _ = cli("bundled/fc-digits", "-q", "--samples", "32")
    assert code == 0 and "RA present" in out
    (tmp_path / "nets.py").write_text("from ra_probe.load.bundled.fcresnet import FCResNet\n"
                                      "def untrained():\n    return FCResNet()\n")
    code, out, _ = cli("nets.py:untrained", "--data", "bundled/digits", "--samples", "32", "-q", "--json", "r.json")
    assert code == 0 and "RA absent" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["metrics"]["null"]["init"] == "nets.py:untrained called again"


def test_null_none_says_the_verdict_has_no_control():
    x, y = digits(16)
    report = ra_probe.probe("bundled/fc-digits", (x, y), samples=16, k=8, null="none")
    assert report["metrics"]["null"] == {"status": "off", "reason": "--null none: the verdict has no control"}
    assert report["verdict"]["evidence"]["ra"]["control"].startswith("none: --null none")
    assert all(c["name"] != "RA2 vs init" for c in report["verdict"]["evidence"]["ra"]["checks"])
    with pytest.raises(UserError, match="null must be one of init, none"):
        ra_probe.probe("bundled/fc-digits", (x, y), null="untrained")


def test_a_module_no_layer_can_reinitialize_has_no_null_and_says_why():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(*(ResidualMLP(8) for _ in range(3)))
            self.gain = nn.Parameter(torch.ones(8))

        def forward(self, x):
            return self.block(x) * self.gain

    report = ra_probe.probe(Scaled(), torch.randn(8, 8), samples=8, k=4)
    null = report["metrics"]["null"]
    assert null["status"] == "unavailable" and "no layer re-initializes gain" in null["reason"]
    assert report["verdict"]["evidence"]["ra"]["control"].startswith("none: the architecture could not be")


def test_a_factory_that_loads_its_own_weights_is_reinitialized_layer_by_layer():
    torch.manual_seed(0)
    trained = nn.Sequential(ResidualMLP(8), ResidualMLP(8))
    state = trained.state_dict()

    def factory():  # returns the same weights whatever the seed
        model = nn.Sequential(ResidualMLP(8), ResidualMLP(8))
        model.load_state_dict(state)
        return model, "factory"
    init = random_init(factory, trained, seed=1)
    assert init.how == "a copy of the module with every layer's reset_parameters()"
    assert not torch.equal(init.module.state_dict()["0.branch.0.weight"], state["0.branch.0.weight"])
    again = random_init(factory, trained, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(init.module.state_dict().values(), again.module.state_dict().values()))


def test_timm_null_has_no_exactly_zero_branches():
    import timm

    model = timm.create_model("resnet18", pretrained=False, num_classes=4)  # zero_init_last: zero branches
    assert model.layer1[0].bn2.weight.abs().max() == 0
    init = random_init(timm_builder("resnet18", num_classes=4), model, seed=1)
    assert init.how == "timm.create_model('resnet18', pretrained=False, zero_init_last=False, num_classes=4)"
    assert init.module.layer1[0].bn2.weight.abs().min() > 0
    vit = random_init(timm_builder("test_vit", num_classes=4), timm.create_model("test_vit", num_classes=4), seed=1)
    assert vit.how == "timm.create_model('test_vit', pretrained=False, num_classes=4)"  # no zero_init_last there


# ---- no evidence from too few samples ----

def test_classes_of_one_sample_carry_no_collapse():
    H = torch.randn(8, 5, dtype=torch.float64)
    W = torch.randn(10, 5, dtype=torch.float64)
    alone = neural_collapse(H, torch.arange(8), W, torch.arange(8))
    assert alone["classes"] == 0 and alone["classes_dropped"] == 8 and alone["classifier_classes"] == 10
    assert all(alone[k] is None for k in ("nc1", "nc2_equinorm_means", "nc2_equiangular", "nc3", "nc4"))
    assert alone["undetermined"].startswith("NC needs at least 2 samples in each of at least 2 classes")
    # singletons are left out; the rest is measured exactly as without them
    H = torch.randn(22, 5, dtype=torch.float64)
    labels = torch.tensor([0] * 5 + [1] * 6 + [2] + [3] + [4] * 9)
    mixed = neural_collapse(H, labels, W, labels)
    keep = labels != 2
    keep &= labels != 3
    alone_free = neural_collapse(H[keep], labels[keep], W, labels[keep])
    assert mixed["classes"] == 3 and mixed["classes_dropped"] == 2 and mixed["samples"] == 20
    assert mixed["nc1"] is not None
    assert mixed["nc1"] == pytest.approx(alone_free["nc1"]) and mixed["nc3"] == pytest.approx(alone_free["nc3"])


def test_one_sample_per_class_shows_nc_undetermined_and_no_verdict(capsys):
    x, y = digits(64)
    first = torch.stack([torch.nonzero(y == c)[0, 0] for c in range(8)])  # one sample in each of 8 classes
    report = ra_probe.probe("bundled/fc-digits", (x[first], y[first]), k=4, null="none")
    nc = report["metrics"]["nc"]
    assert nc["nc1"] is None and nc["nc4"] is None and nc["classes"] == 0
    evidence = report["verdict"]["evidence"]["nc"]
    assert report.verdict["nc"] == "undetermined" and evidence["checks"] == []
    assert evidence["reason"] == nc["undetermined"]
    print_report(report.to_dict())
    assert "NC needs at least 2 samples" in capsys.readouterr().out
    # with some classes measured, the report says on how many of the classifier's
    fives = torch.cat([torch.nonzero(y == c)[:5, 0] for c in range(4)] + [first[4:]])
    scoped = ra_probe.probe("bundled/fc-digits", (x[fives], y[fives]), k=4, null="none")
    assert scoped.verdict["nc"] not in ("not_applicable", "undetermined")
    assert scoped["verdict"]["evidence"]["nc"]["scope"] == ("measured on 4 of the classifier's 10 classes (20 samples); "
                                                            "4 class(es) with one sample left out")


def test_alignment_needs_a_group_of_two_sites():
    class OneBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.block, self.head = nn.Linear(6, 8), ResidualMLP(8), nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.block(self.stem(x)))

    report = ra_probe.probe(OneBlock(), torch.randn(8, 6), samples=8, k=4)
    ra2 = ra_check(report, "RA2")
    assert ra2["value"] is None and ra2["passed"] is None and "two sites" in ra2["reason"]
    assert report["sites"][0]["timing"]["align_products"] == 0
    assert schema_errors(report.to_dict()) == []


def test_a_thousand_classes_scale_the_plots_and_advice_to_k(capsys):
    from ra_probe.metrics.results import SiteSpectrum
    from ra_probe.report.plots import spectra

    sites = {f"s{i}": SiteSpectrum([4.0, 2.0, 1.0, 0.5], [0.0] * 4, None, 0.0, "dense", None, {}) for i in range(3)}
    groups = dict.fromkeys(sites, 0)
    svg = spectra(sites, groups, classes=1000)
    assert "C = 1000 &gt; k: not shown" in svg and "C = 1000<" not in svg
    assert "C = 3<" in spectra(sites, groups, classes=3)  # within the k shown: marked
    S = torch.tensor([[4.0, 2.0, 1.0, 0.5]])
    from ra_probe.metrics.ra import rank_summary

    assert "(--k 1001)" in rank_summary(S, 1e-2, classes=1000)["undetermined"]


# ---- reproducible random init, provenance ----

def test_no_pretrained_twice_gives_the_same_numbers_and_hits_the_cache(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("RA_PROBE_CACHE", str(tmp_path / "own-cache"))
    args = ("timm/resnet18", "--no-pretrained", "--data", "synthetic", "--input-shape", "3,32,32", "--samples", "2",
            "--k", "4", "--null-samples", "1", "-q")
    assert cli(*args, "--json", "a.json")[0] == 0
    assert cli(*args, "--json", "b.json")[0] == 0
    a, b = (json.loads((tmp_path / name).read_text()) for name in ("a.json", "b.json"))
    assert a["metrics"] == b["metrics"] and a["model"]["pretrained"] is False
    assert any("served from the cache" in m for m in b["messages"])
    one, other = load_model("timm/resnet18", pretrained=False), load_model("timm/resnet18", pretrained=False, seed=5)
    assert torch.equal(one.module.conv1.weight, load_model("timm/resnet18", pretrained=False).module.conv1.weight)
    assert not torch.equal(one.module.conv1.weight, other.module.conv1.weight)


def test_no_pretrained_builds_a_trained_source_at_random_init(cli, tmp_path):
    """Before: --no-pretrained was ignored for every source but timm: the bundled model kept its trained
    weights and the verdict stayed "RA present"."""
    trained = load_model("bundled/fc-digits")
    fresh, again = (load_model("bundled/fc-digits", pretrained=False, seed=1) for _ in range(2))
    assert fresh.pretrained is False and fresh.weights_sha256 is None
    weight = "blocks.0.branch.0.weight"
    assert not torch.equal(trained.module.state_dict()[weight], fresh.module.state_dict()[weight])
    assert torch.equal(fresh.module.state_dict()[weight], again.module.state_dict()[weight])
    code, out, err = cli("bundled/fc-digits", "--no-pretrained", "--samples", "32", "-q", "--json", "r.json")
    assert code == 0 and "RA absent" in out, err
    assert json.loads((tmp_path / "r.json").read_text())["model"]["pretrained"] is False


def test_no_pretrained_builds_a_hugging_face_model_from_its_config_alone(tmp_path):
    """Before: the weights were loaded (downloaded, for the Hub) and then replaced; a folder or cache with
    the config but without the weights could not be probed at random init."""
    folder = tmp_path / "llama"
    saved(hf_config("llama"), folder)
    trained = load_model(str(folder)).module.state_dict()
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    fresh, again = (load_model(str(folder), pretrained=False, seed=3) for _ in range(2))
    assert fresh.pretrained is False
    name = next(k for k in trained if k.endswith("q_proj.weight"))
    assert torch.equal(fresh.module.state_dict()[name], again.module.state_dict()[name])
    assert not torch.equal(fresh.module.state_dict()[name], trained[name])


def test_a_checkpoint_is_named_and_recorded_as_trained(tmp_path):
    from safetensors.torch import save_file

    save_file(load_model("bundled/fc-digits").module.state_dict(), tmp_path / "ckpt.safetensors")
    (tmp_path / "nets.py").write_text("from ra_probe.load.bundled.fcresnet import FCResNet\n"
                                      "def net():\n    return FCResNet()\n")
    loaded = load_model(str(tmp_path / "ckpt.safetensors"), arch=f"{tmp_path / 'nets.py'}:net")
    assert loaded.name == str(tmp_path / "ckpt.safetensors") and loaded.pretrained is True
    assert loaded.weights_path == loaded.name and len(loaded.weights_sha256) == 64
    assert load_model(f"{tmp_path / 'nets.py'}:net").pretrained is None  # a factory's weights: unknown


def test_a_factory_returning_a_timm_model_keeps_its_own_preprocessing(tmp_path):
    (tmp_path / "vit.py").write_text("import timm\ndef vit():\n    return timm.create_model('test_vit', num_classes=3)\n")
    loaded = load_model(f"{tmp_path / 'vit.py'}:vit")
    assert loaded.data_config["mean"] == (0.5, 0.5, 0.5) and loaded.input_shape == (3, 160, 160)
    assert loaded.preprocessing == "timm data config of the model (mean 0.5/0.5/0.5, std 0.5/0.5/0.5)"
    plain = load_model(f"{TINY}:conv_net")
    assert plain.preprocessing == "ImageNet's mean/std (the model has no data config or image processor of its own)"


# ---- progress where no terminal shows a bar ----

def test_a_log_shows_a_line_per_site_measured(cli):
    code, _, err = cli("bundled/fc-digits", "--samples", "8", "--k", "4", "--null-samples", "2", "--no-cache")
    lines = err.splitlines()  # the first sample of each a chunk of its own, then the predicted cost
    assert code == 0 and len([line for line in lines if line.startswith("[")]) == 4 * (8 + 1)
    assert re.fullmatch(r"\[1/16\] random init: blocks\.0, chunk 1/2 \(\d+\.\d s, \d+ products\)", lines[0])
    assert re.fullmatch(r"\[8/16\] random init: group 0 RA2 alignment, chunk 1/2 \(\d+\.\d s, \d+ products\)",
                        lines[8])
    assert re.fullmatch(r"\[1/16\] blocks\.0, chunk 1/2 \(\d+\.\d s, \d+ products\)", lines[9])
    assert lines[18].startswith("predicted: ~") and "(8 samples + 2 null; measured 1 sample in " in lines[18]
    assert lines[19].startswith("[9/16] blocks.0, chunk 2/2 (")
    assert lines[28].startswith("[9/16] random init: blocks.0, chunk 2/2 (")
    assert cli("bundled/fc-digits", "--samples", "8", "--k", "4", "-q")[2] == ""


# ---- every report reads back ----

def test_reports_of_every_shape_read_back_render_and_compare(cli, tmp_path, bundled_reports):
    shapes = {
        "fc": ("bundled/fc-digits", "--samples", "16", "--k", "4"),
        "noskip": ("bundled/fc-digits-noskip", "--samples", "16", "--k", "4"),
        "conv": (f"{TINY}:conv_net", "--data", "synthetic", "--samples", "4", "--k", "4"),
        "timm-vit": ("timm/test_vit", "--no-pretrained", "--data", "synthetic", "--samples", "2", "--k", "2",
                     "--input-shape", "3,32,32"),
    }
    for name, args in shapes.items():
        code, _, err = cli(*args, "--json", f"{name}.json")
        assert code == 0, err
        assert ra_probe.load_report(tmp_path / f"{name}.json")["schema_version"] == SCHEMA_VERSION
        assert cli("render", f"{name}.json", "--html", f"{name}-again.html")[0] == 0
    code, out, err = cli("compare", *(f"{name}.json" for name in shapes), "--html", "all.html")
    assert code == 0, err
    assert all((tmp_path / f"{name}-again.html").stat().st_size > 0 for name in shapes)
