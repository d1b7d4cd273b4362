"""Models larger than one device: a Hugging Face model dispatched across devices by accelerate is
probed where each block lives — the same spectra as the model on one device, and never moved; one
whose weights accelerate offloads to disk or CPU memory is probed one block of resident weights at a
time, and its weights are back where they were (offloaded, on meta) after."""
from __future__ import annotations

import gc
import json
import shutil
import tempfile

import pytest
import torch
from tiny_models import hf_config, saved

from ra_probe import probe
from ra_probe.errors import UserError
from ra_probe.load.models import load_model
from ra_probe.load.offload import dispatched, offloaded, streaming_hooks
from ra_probe.pipeline.prepare import prepared
from ra_probe.pipeline.settings import Settings

accelerate = pytest.importorskip("accelerate")
SECOND = 0 if torch.cuda.is_available() else "cpu"  # a real second device where there is one
SPLIT = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
         "model.layers.1": SECOND, "model.norm": SECOND, "lm_head": SECOND}
# the first layer's weights on disk, streamed in by accelerate's hooks for each forward
OFFLOADING = {**SPLIT, "model.layers.0": "disk"}
OPTIONS = dict(samples=3, k=4, batch_size=3, dtype="float64", data="synthetic")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return saved(hf_config("llama"), tmp_path_factory.mktemp("llama"))


def spectra(report) -> dict[str, list[float]]:
    return {site["name"]: site["singular_values"] for site in report["sites"]}


@pytest.mark.parametrize("level, count", [("block", 2), ("sublayer", 4)])
def test_a_model_split_across_devices_has_the_spectra_of_the_whole_model(folder, level, count):
    whole = probe(folder, **OPTIONS, site_level=level)
    loaded = load_model(folder)
    # the hooks accelerate puts on a model split across devices (force_hooks: even where both are the CPU)
    accelerate.dispatch_model(loaded.module, SPLIT, main_device="cpu", force_hooks=True)
    assert dispatched(loaded.module)
    places = {name: p.device for name, p in loaded.module.named_parameters()}
    split = probe(loaded, "synthetic", **{k: v for k, v in OPTIONS.items() if k != "data"}, site_level=level)
    assert len(split["sites"]) == count and split["skipped"] == []
    assert split["metrics"]["ra2"]["mean_score"] == pytest.approx(whole["metrics"]["ra2"]["mean_score"], rel=1e-9)
    for name, values in spectra(whole).items():
        assert spectra(split)[name] == pytest.approx(values, rel=1e-9, abs=1e-12)
    assert {name: p.device for name, p in loaded.module.named_parameters()} == places  # left where it was
    assert all(p.dtype == torch.float32 for p in loaded.module.parameters())


def test_a_dispatched_model_is_never_moved_to_the_probes_device(folder):
    meta = Settings(device="meta")  # a device nothing can compute on: a move would show at once
    with prepared(load_model(folder).module, meta) as model:  # an undispatched model goes to the probe's device
        assert {p.device.type for p in model.parameters()} == {"meta"}
    loaded = load_model(folder)
    accelerate.dispatch_model(loaded.module, SPLIT, main_device="cpu", force_hooks=True)
    with prepared(loaded.module, meta) as model:
        assert "meta" not in {p.device.type for p in model.parameters()}


def test_device_map_loads_through_from_pretrained(folder, cli):
    code, _, err = cli(folder, "--device-map", json.dumps({"": "cpu"}), "--samples", 3, "--k", 4, "--batch-size", 3,
                       "--dtype", "float64", "--data", "synthetic", "--json", "split.json", "-q")
    assert code == 0, err
    whole = probe(folder, **OPTIONS)
    with open("split.json") as f:
        split = json.load(f)
    for name, values in spectra(whole).items():
        assert spectra(split)[name] == pytest.approx(values, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("level", ["block", "sublayer"])
def test_a_model_offloaded_to_disk_has_the_spectra_of_the_whole_model(folder, level, monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the load's offload folder would be
    whole = probe(folder, **OPTIONS, site_level=level)
    loaded = load_model(folder, device_map=OFFLOADING)
    assert offloaded(loaded.module) and list(tmp_path.iterdir()) == []  # read from the model's own files
    before = {name: (p, p.device, p.dtype) for name, p in loaded.module.named_parameters()}
    hooks = streaming_hooks(loaded.module)
    assert {name for name, (_, device, _) in before.items() if device.type == "meta"} == \
        {name for name in before if name.startswith("model.layers.0.")}
    split = probe(loaded, "synthetic", **{k: v for k, v in OPTIONS.items() if k != "data"}, site_level=level)
    assert split["skipped"] == [] and len(split["sites"]) == len(whole["sites"])
    assert split["metrics"]["ra2"]["mean_score"] == pytest.approx(whole["metrics"]["ra2"]["mean_score"], rel=1e-9)
    for name, values in spectra(whole).items():
        assert spectra(split)[name] == pytest.approx(values, rel=1e-9, abs=1e-12)
    # the same parameters, on meta where they were offloaded, in their dtype; the hooks stream them again
    assert {name: (p, p.device, p.dtype) for name, p in loaded.module.named_parameters()} == before
    assert streaming_hooks(loaded.module) == hooks


def test_weights_offloaded_from_another_format_are_written_to_a_folder_removed_with_the_model(folder, monkeypatch,
                                                                                              tmp_path):
    from safetensors.torch import load_file

    torch_format = tmp_path / "bin"
    torch_format.mkdir()
    shutil.copy(f"{folder}/config.json", torch_format)
    torch.save(load_file(f"{folder}/model.safetensors"), torch_format / "pytorch_model.bin")
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    loaded = load_model(str(torch_format), device_map=OFFLOADING)
    [written] = temporary.iterdir()  # accelerate reads disk-offloaded weights from safetensors files only
    assert any(written.iterdir())
    split = probe(loaded, "synthetic", **{k: v for k, v in OPTIONS.items() if k != "data"}, null="none")
    for name, values in spectra(probe(folder, **OPTIONS, null="none")).items():
        assert spectra(split)[name] == pytest.approx(values, rel=1e-9, abs=1e-12)
    del loaded
    gc.collect()
    assert not written.exists()


def test_device_map_offloads_through_the_command_line(folder, cli):
    code, _, err = cli(folder, "--device-map", json.dumps(OFFLOADING), "--samples", 3, "--k", 4, "--batch-size", 3,
                       "--dtype", "float64", "--data", "synthetic", "--json", "offloaded.json", "-q")
    assert code == 0, err
    with open("offloaded.json") as f:
        split = json.load(f)
    for name, values in spectra(probe(folder, **OPTIONS)).items():
        assert spectra(split)[name] == pytest.approx(values, rel=1e-9, abs=1e-12)
    assert split["metrics"]["null"]["status"] == "unavailable"  # it would need the whole model in memory


def test_device_maps_that_cannot_work_are_one_line_errors(folder, cli):
    code, _, err = cli("bundled/fc-digits", "--device-map", "auto")
    assert code == 2 and "device_map splits Hugging Face models" in err
    code, _, err = cli(folder, "--device-map", "everywhere")
    assert code == 2 and "device_map must be auto, balanced" in err
    with pytest.raises(UserError, match="device_map must map module names"):
        load_model(folder, device_map={"model.layers.0": ["disk"]})


def test_offloading_answers_what_a_probe_asks_of_a_model(folder):
    """Offloading in one place: whether weights are offloaded, a site's block resident, the largest such
    block, the bytes on devices, the whole state dict, where a block computes; inert without offloading."""
    from types import SimpleNamespace

    from ra_probe.load.offload import block_device, offloading

    whole = load_model(folder).module
    loaded = load_model(folder, device_map=OFFLOADING).module
    layer = SimpleNamespace(name="model.layers.0", module_path="model.layers.0", ctx_module=None)
    other = SimpleNamespace(name="model.layers.1", module_path="model.layers.1", ctx_module=None)
    plain, offload = offloading(whole), offloading(loaded)
    assert not plain.offloaded and plain.largest_block([layer], 4) == 0
    assert plain.device_bytes() == sum(t.numel() * t.element_size() for t in (*whole.parameters(), *whole.buffers()))
    first = {n: p for n, p in loaded.named_parameters() if n.startswith("model.layers.0.")}
    assert offload.offloaded and all(p.device.type == "meta" for p in first.values())
    assert offload.largest_block([other, layer], 4) == 4 * sum(p.numel() for p in first.values())
    assert offload.device_bytes() < plain.device_bytes()
    assert block_device(loaded.get_submodule("model.layers.0")) == torch.device("cpu")
    with offload.resident(layer):
        assert all(p.device.type == "cpu" for n, p in loaded.named_parameters() if n.startswith("model.layers.0."))
    assert all(p.device.type == "meta" for n, p in loaded.named_parameters() if n.startswith("model.layers.0."))
    state = offload.state_dict()
    assert set(state) == set(whole.state_dict())
    for name in first:
        torch.testing.assert_close(state[name], whole.state_dict()[name])
