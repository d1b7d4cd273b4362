"""Model sources as a registry: each built-in source recognizes its own specs, a source registered with
`register_source` or installed through the `ra_probe.sources` entry points loads models for the library
and the CLI, an unknown spec is one line naming the sources, and a bare probe never imports accelerate."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from importlib.metadata import EntryPoint

import huggingface_hub
import pytest
import torch
from safetensors.torch import save_file

import ra_probe
from ra_probe.errors import UserError
from ra_probe.load.bundled.fcresnet import FCResNet
from ra_probe.load.models import load_model
from ra_probe.load.sources import registry
from ra_probe.load.sources.registry import find_source

SMALL = dict(samples=4, k=2, null="none")


@pytest.fixture
def registered():
    """`register_source` for one test: what it registers is gone after it."""
    kept = list(registry._REGISTERED)
    yield ra_probe.register_source
    registry._REGISTERED[:] = kept


def test_each_built_in_source_recognizes_its_specs(tmp_path):
    expected = {
        "bundled/fc-digits": "bundled",
        "timm/resnet50": "timm",
        "hf/google/vit-base-patch16-224": "hf",
        str(tmp_path): "folder",
        "ckpt/model.safetensors": "checkpoint",
        "runs/epoch3.pt": "checkpoint",
        "nets.py:small": "factory",
        "my_pkg.models:build": "factory",
    }
    assert {spec: find_source(spec).name for spec in expected} == expected


@pytest.mark.parametrize("spec", ["not-a-model", "s3://bucket/model.pt", "a:b c"])
def test_an_unknown_spec_names_every_source(spec):
    with pytest.raises(UserError) as caught:
        find_source(spec)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"unknown model {spec!r}")
    assert "sources: bundled, timm, hf, folder, checkpoint, factory" in message


def test_an_unknown_spec_on_the_command_line_is_one_line_exit_2(cli):
    code, out, err = cli("zoo/none-such", "--samples", "4")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in out + err
    assert "unknown model 'zoo/none-such'" in lines[0] and "factory" in lines[0]


def _zoo(spec: str, options: ra_probe.LoadingOptions) -> torch.nn.Module:
    """A third-party source's load: a small FCResNet of `spec`'s depth (it takes vectors of its first
    Linear's width, as a module given to `probe` does)."""
    return FCResNet(depth=int(spec.removeprefix("zoo/depth-")))


ZOO = ra_probe.Source("zoo", "zoo/depth-<n>", lambda spec: spec.startswith("zoo/"), _zoo)


def test_a_registered_source_is_probed_by_the_library_and_the_cli(registered, cli):
    registered(ZOO)
    assert find_source("zoo/depth-3") is ZOO
    report = ra_probe.probe("zoo/depth-3", data="synthetic", **SMALL)
    assert report["model"]["name"] == "zoo/depth-3" and len(report.sites) == 3
    code, _, err = cli("zoo/depth-2", "--data", "synthetic", "--samples", "4", "--k", "2", "--null", "none",
                       "--no-cache", "--json", "z.json")
    assert code == 0, err


def test_a_registered_source_comes_before_the_built_in_ones(registered):
    registered(ra_probe.Source("mine", "bundled/* of mine", lambda spec: spec.startswith("bundled/"),
                               lambda spec, options: _zoo("zoo/depth-2", options)))
    assert load_model("bundled/fc-digits").source == "mine"


def test_the_registry_gives_random_init_weights_and_input_shape_to_every_source(registered, tmp_path):
    registered(ZOO)
    trained = load_model("zoo/depth-2")
    weights = tmp_path / "w.safetensors"
    save_file({k: torch.ones_like(v) for k, v in trained.module.state_dict().items()}, str(weights))
    given = load_model("zoo/depth-2", weights=str(weights), input_shape=(64,))
    assert given.weights_path == str(weights) and given.pretrained and not given.module.training
    assert all(bool((p == 1).all()) for p in given.module.parameters())
    fresh, again = load_model("zoo/depth-2", pretrained=False, seed=3), load_model("zoo/depth-2", pretrained=False, seed=3)
    assert fresh.pretrained is False and fresh.input_shape == (64,)
    assert all(torch.equal(a, b) for a, b in zip(fresh.module.parameters(), again.module.parameters()))


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """A package that declares a source in the `ra_probe.sources` entry-point group, as if installed."""
    (tmp_path / "zoo_source.py").write_text(textwrap.dedent("""
        import ra_probe
        from ra_probe.load.preprocessing import module_loaded
        from ra_probe.load.bundled.fcresnet import FCResNet

        def load(spec, options):
            return module_loaded(FCResNet(depth=2), spec, "installed-zoo", input_shape=(64,))

        SOURCE = ra_probe.Source("installed-zoo", "izoo/<name>", lambda spec: spec.startswith("izoo/"), load)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    point = EntryPoint(name="installed-zoo", value="zoo_source:SOURCE", group=registry.ENTRY_POINT_GROUP)
    read = []

    def entry_points(group=None):
        read.append(group)
        return [point] if group == registry.ENTRY_POINT_GROUP else []
    monkeypatch.setattr(registry, "entry_points", entry_points)
    yield read
    sys.modules.pop("zoo_source", None)


def test_an_installed_source_is_read_only_when_no_other_source_recognizes_a_spec(installed):
    load_model("bundled/fc-digits")
    assert installed == [] and "zoo_source" not in sys.modules
    report = ra_probe.probe("izoo/two", data="synthetic", **SMALL)
    assert report["model"]["name"] == "izoo/two" and len(report.sites) == 2
    with pytest.raises(UserError, match="sources: bundled, .*factory, installed-zoo"):
        find_source("nowhere/at-all")


def test_an_installed_source_that_cannot_be_imported_is_one_line(monkeypatch):
    broken = EntryPoint(name="broken", value="no_such_package_anywhere:SOURCE", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group=None: [broken])
    with pytest.raises(UserError, match=r"^the installed model source broken \(no_such_package_anywhere:SOURCE\) "
                                        r"cannot be imported: No module named"):
        load_model("somewhere/else")
    assert load_model("bundled/fc-digits").pretrained  # a built-in spec never reads the entry points


def test_a_checkpoint_at_no_pretrained_keeps_its_weights(tmp_path):
    ckpt = tmp_path / "net.safetensors"
    save_file({k: torch.full_like(v, 0.5) for k, v in FCResNet().state_dict().items()}, str(ckpt))
    loaded = load_model(str(ckpt), arch="bundled/fc-digits", pretrained=False)
    assert loaded.name == str(ckpt) and loaded.weights_path == str(ckpt) and loaded.pretrained
    assert all(bool((p == 0.5).all()) for p in loaded.module.parameters())
    with pytest.raises(UserError, match="needs --arch"):
        load_model(str(ckpt))


@pytest.mark.parametrize("spec, words", [("timm/resnet18", "cannot download pretrained weights for timm/resnet18"),
                                         ("hf/no-such-org/no-such-model", "cannot load the Hugging Face model")])
def test_offline_and_not_cached_is_one_line(spec, words, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as caught:
        load_model(spec)
    message = str(caught.value)
    assert words in message and "no network and not in the local cache" in message and "\n" not in message


def test_probing_the_bundled_model_never_imports_accelerate():
    """accelerate is an optional extra, imported only when a model is offloaded."""
    script = textwrap.dedent("""
        import sys
        import ra_probe
        ra_probe.probe("bundled/fc-digits", samples=4, k=2, null="none")
        print(sorted(name for name in sys.modules if name.split(".")[0] == "accelerate"))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
