"""The library as a notebook uses it: the README's example run as written, a model's own adapter, the
console, the report files and the frame."""
from __future__ import annotations

import re
from pathlib import Path

import torch

import ra_probe

ROOT = Path(__file__).resolve().parents[2]


def readme_example(heading: str = "## From Python", page: str = "README.md") -> str:
    """The first Python block after `heading` in `page` (the README or a page of docs/)."""
    text = (ROOT / page).read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def torch_flags() -> tuple:
    """The global torch state a probe touches and must put back."""
    return (torch.is_grad_enabled(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.get_num_threads(), torch.backends.cuda.flash_sdp_enabled(),
            torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.math_sdp_enabled())


def test_the_readme_example_runs_as_written_and_leaves_torch_as_it_was(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    flags = torch_flags()
    scope: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), scope)
    assert torch_flags() == flags
    rng = torch.get_rng_state()  # the example draws its data; a probe draws nothing from the caller's RNG
    ra_probe.probe(scope["model"], scope["loader"], samples=8, k=2)
    assert torch.equal(torch.get_rng_state(), rng)

    report, again, gate = scope["report"], scope["again"], scope["gate"]
    assert isinstance(report, ra_probe.Report) and report.verdict.keys() == {"ra", "nc"}
    assert [s["name"] for s in report.sites] == ["1", "2", "3"] and report["data"]["samples"] == 32
    assert again.to_dict() == report.to_dict()  # the JSON round trip loses nothing
    assert "<svg" in (tmp_path / "report.html").read_text() and "&lt;svg" in report._repr_html_()
    assert gate.passed == (report.verdict["ra"] == "present" and report.metrics["ra2"]["mean_score"] >= 0.5)
    assert "{'ra': " in capsys.readouterr().out
    # the model is as the caller left it: training mode, gradients on
    model = scope["model"]
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_the_readme_adapter_example_finds_and_verifies_its_sites(monkeypatch, capsys):
    """The README's "write an adapter" example, run as written: its adapter claims the model's two
    blocks, and both are verified against the real forward."""
    from ra_probe.sites import registry

    monkeypatch.setattr(registry, "_RUNTIME", [])  # the adapter it registers leaves with the test
    scope: dict = {}
    exec(compile(readme_example("## Write an adapter"), "README.md", "exec"), scope)
    found = scope["found"]
    assert [(s.name, s.adapter) for s in found.sites] == [("1", "gated"), ("2", "gated")] and not found.skipped
    assert all(s.verify_error is not None and s.verify_error < 1e-5 for s in found.sites)
    assert "('1', 'gated'" in capsys.readouterr().out


def test_the_documented_source_example_loads_and_probes_its_models(monkeypatch):
    """docs/data-and-sources.md's "write a source" example, run as written: the library takes the
    references of the source it registers."""
    from ra_probe.load.sources import registry

    monkeypatch.setattr(registry, "_REGISTERED", [])  # the source it registers leaves with the test
    scope: dict = {}
    exec(compile(readme_example("### Write a source", "docs/data-and-sources.md"), "docs", "exec"), scope)
    report = scope["report"]
    assert report["model"]["name"] == "zoo/depth-3" and [s["name"] for s in report.sites] == ["1", "2", "3"]


def test_a_vit_with_fused_attention_is_probed_as_it_is():
    """timm builds ViTs with fused scaled-dot-product attention, whose kernels have no forward-mode
    derivative: the probe runs attention on the math kernel (the same outputs) and puts the kernel
    choice back. Before, every attention site failed with a traceback."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              num_classes=4)
    assert model.blocks[0].attn.fused_attn
    flags = torch_flags()
    report = ra_probe.probe(model, torch.randn(4, 3, 32, 32), k=4)
    assert [s["name"] for s in report.sites] == ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"]
    assert all(s["timing"]["converged"] == s["timing"]["samples"] == 4 and s["singular_values"][0] > 0
               for s in report.sites)
    assert torch_flags() == flags


def test_text_data_as_a_dict_of_tensors_or_dict_batches():
    """A tokenizer's output (a dict, "labels" among it) is data as it is, for an HF model on "sdpa"
    attention; dict batches padded to different lengths give the same spectra as one dict; a dict
    that is not inputs is one clear error."""
    import pytest
    import transformers as tf

    from ra_probe.errors import UserError

    config = tf.BertConfig(vocab_size=100, max_position_embeddings=16, hidden_size=32, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=64, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(config)
    ids = torch.randint(1, 100, (4, 8))
    mask = torch.ones_like(ids)
    mask[:2, 5:] = 0  # the first two sentences have 5 tokens, padded on the right
    labels = torch.tensor([0, 1, 0, 1])
    whole = ra_probe.probe(model, {"input_ids": ids, "attention_mask": mask, "labels": labels}, k=4)
    assert whole["data"]["labelled"] and whole["data"]["tokens"] == [5, 5, 8, 8]
    batches = [{"input_ids": ids[:2, :5], "attention_mask": mask[:2, :5], "labels": labels[:2]},
               {"input_ids": ids[2:], "attention_mask": mask[2:], "labels": labels[2:]}]
    joined = ra_probe.probe(model, batches, k=4)
    assert joined["data"]["tokens"] == [5, 5, 8, 8]
    for a, b in zip(whole.sites, joined.sites):
        assert a["name"] == b["name"]
        assert torch.allclose(torch.tensor(a["singular_values"]), torch.tensor(b["singular_values"]), rtol=1e-4)
    with pytest.raises(UserError, match="a dict of data must map input names to batched tensors; "
                                                 "not so: text"):
        ra_probe.probe(model, {"input_ids": ids, "text": "hello"}, k=4)


def test_runtime_adapter_claims_a_model_first():
    from ra_probe.sites.registry import _RUNTIME, registered_adapters

    class Nothing:
        name, description, fallback = "nothing", "claims every model, finds no site", False

        def find(self, model):
            return []

    ra_probe.register_adapter(Nothing())
    try:
        assert registered_adapters()[0].name == "nothing"
        report = ra_probe.probe("bundled/fc-digits", samples=4, k=2)
        assert report["model"]["adapter"] == "nothing" and report.sites == []
    finally:
        _RUNTIME.clear()


def test_render_writes_the_html_of_a_json_report(cli, tmp_path):
    reference = ROOT / "examples" / "reports" / "fc-digits.json"
    code, _, err = cli("render", reference, "--html", "page.html")
    assert code == 0, err
    page = (tmp_path / "page.html").read_text()
    assert "<svg" in page and "bundled/fc-digits" in page
    assert cli("render", reference, "--html", "page.html")[0] == 2  # never over an existing file


def test_an_80_column_console_shows_every_name_and_number_whole(bundled_reports):
    import copy

    from rich.console import Console

    from ra_probe.report.console import print_report
    from ra_probe.report.format import fmt

    report = copy.deepcopy(bundled_reports["fc-digits"])
    for i, site in enumerate(report["sites"]):  # names as long as a transformer's
        long = f"bert.encoder.layer.{i}.attention.output"
        for entry in report["metrics"]["ra3"]["sites"] + report["metrics"]["ra4"]["sites"]:
            if entry["site"] == site["name"]:
                entry["site"] = long
        site["name"] = long
    console = Console(width=80, record=True, force_terminal=False)
    print_report(report, console)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    for site in report["sites"]:
        assert site["name"] in text and fmt(site["singular_values"][0]) in text
    assert "…" not in text


def test_report_files_get_the_users_usual_permissions(tmp_path):
    import os

    from ra_probe.files import atomic_write

    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "r.json", lambda f: f.write(b"{}"))
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644


def test_to_frame_has_one_row_per_site(bundled_reports):
    report = ra_probe.Report(bundled_reports["fc-digits"])
    frame = report.to_frame()
    assert list(frame.index) == [s["name"] for s in report.sites]
    assert frame["sigma1"].tolist() == [s["singular_values"][0] for s in report.sites]
    ranks = {s["site"]: s["rank_median"] for s in report.metrics["ra3"]["sites"]}
    assert [None if v != v else v for v in frame["rank_median"].tolist()] == [ranks[n] for n in frame.index]
