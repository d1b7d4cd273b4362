"""The result cache: keys, round trips, damaged entries, and a NaN-weights model flagged, not crashed."""
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ra_probe import Settings
from ra_probe.load.bundled import MODELS
from ra_probe.pipeline.cache import ResultCache, tensor_digest
from ra_probe.pipeline.measure import GroupMeasurement


def measurement() -> GroupMeasurement:
    return GroupMeasurement(group=1, S={"a": torch.tensor([[3.0, 1.0]], dtype=torch.float64)},
                            method={"a": "dense"}, timing={"a": {"seconds": 0.5, "products": 4, "iterations": 1}},
                            alignment={("a", "b"): torch.tensor([0.9], dtype=torch.float64)},
                            trajectory={"linearity": torch.tensor([0.99], dtype=torch.float64)})


def test_entries_round_trip_and_damaged_ones_are_recomputed(tmp_path):
    cache = ResultCache(tmp_path)
    run = cache.for_run(torch.nn.Linear(2, 2), "m", Settings())
    inputs = torch.arange(6.0).reshape(3, 2)
    stored = run.get_or_compute(["a", "b"], [inputs], measurement, GroupMeasurement)
    loaded = run.get_or_compute(["a", "b"], [inputs], lambda: 1 / 0, GroupMeasurement)
    assert (cache.hits, cache.misses) == (1, 1)
    assert torch.equal(loaded.S["a"], stored.S["a"]) and torch.equal(loaded.alignment[("a", "b")], torch.tensor([0.9], dtype=torch.float64))
    assert loaded.method == {"a": "dense"} and loaded.trajectory["linearity"].item() == 0.99

    entry, = tmp_path.rglob("*.pt")
    entry.write_bytes(entry.read_bytes()[:40])  # a damaged entry is a miss, then replaced
    again = run.get_or_compute(["a", "b"], [inputs], measurement, GroupMeasurement)
    assert cache.misses == 2 and again.group == 1
    assert run.get_or_compute(["a", "b"], [inputs], lambda: 1 / 0, GroupMeasurement).group == 1


def test_keys_follow_weights_inputs_sites_and_measuring_settings(tmp_path):
    cache, module = ResultCache(tmp_path), torch.nn.Linear(2, 2)
    base = cache.for_run(module, "m", Settings()).run_key
    assert cache.for_run(module, "m", Settings(tau=0.1, samples=8, batch_size=4)).run_key == base
    assert cache.for_run(module, "m", Settings(k=8)).run_key != base
    assert cache.for_run(module, "other", Settings()).run_key != base
    changed = torch.nn.Linear(2, 2)
    assert cache.for_run(changed, "m", Settings()).run_key != base
    x = torch.zeros(2, 3)
    assert tensor_digest(x) != tensor_digest(x.double()) != tensor_digest(x.reshape(3, 2))
    assert tensor_digest({"ids": torch.ones(2, dtype=torch.long)}) != tensor_digest({"mask": torch.ones(2, dtype=torch.long)})


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RA_PROBE_CACHE", str(tmp_path / "x"))
    assert ResultCache().folder == tmp_path / "x"


def test_nan_weights_flag_the_sites_instead_of_crashing(cli, tmp_path):
    state = load_file(MODELS["fc-digits"].weights)
    state["blocks.5.branch.0.weight"][0, 0] = float("nan")
    save_file(state, tmp_path / "nan.safetensors")
    code, out, err = cli("probe", "nan.safetensors", "--arch", "bundled/fc-digits", "--samples", "16",
                         "--json", "report.json", "--quiet")
    assert code == 0, err
    report = json.loads(Path("report.json").read_text())
    assert [s["name"] for s in report["sites"]] == [f"blocks.{i}" for i in range(5)]
    assert {s["name"] for s in report["skipped"]} == {"blocks.5", "blocks.6", "blocks.7"}
    assert all("NaN or Inf" in s["reason"] for s in report["skipped"])
    assert any("NaN or Inf" in m for m in report["messages"])


def test_keys_follow_the_source_code(tmp_path, monkeypatch):
    import ra_probe.pipeline.cache

    cache, module = ResultCache(tmp_path), torch.nn.Linear(2, 2)
    before = cache.for_run(module, "m", Settings()).run_key
    monkeypatch.setattr(ra_probe.pipeline.cache, "code_digest", lambda: "edited")
    assert cache.for_run(module, "m", Settings()).run_key != before
