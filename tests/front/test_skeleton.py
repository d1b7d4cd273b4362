"""The walking skeleton end to end: the bundled trained ResNet shows RA, its controls do not; exact and
matrix-free spectra agree; every site is verified; bad input is one line and exit code 2."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ra_probe.engine import JacobianOperator, dense_svd, krylov_svd
from ra_probe.load.models import load_model
from ra_probe.sites.capture import capture
from ra_probe.sites.records import Found
from ra_probe.sites.registry import find_sites
from ra_probe.sites.verify import verify_sites


def test_cli_writes_report_with_ra_present(tmp_path, cli):
    out = tmp_path / "out.json"
    code, stdout, _ = cli("bundled/fc-digits", "--json", str(out))
    assert code == 0
    report = json.loads(out.read_text())
    for key in ("schema_version", "tool", "model", "data", "settings", "environment", "sites", "metrics", "verdict"):
        assert key in report
    assert set(report["metrics"]) >= {"ra1", "ra2", "ra3", "ra4", "nc"}
    assert report["verdict"]["ra"] == "present"
    assert report["verdict"]["nc"] in ("present", "partial")
    assert [s["name"] for s in report["sites"]] == [f"blocks.{i}" for i in range(8)]
    for site in report["sites"]:
        values = site["singular_values"]
        assert values == sorted(values, reverse=True) and values[0] > 0
        assert site["kind"] == "identity" and site["group"] == 0
    assert "present" in stdout


def test_trained_model_is_low_rank_and_aligned_controls_are_not(bundled_reports):
    trained, lowwd = bundled_reports["fc-digits"], bundled_reports["fc-digits-lowwd"]
    classes = trained["metrics"]["ra3"]["classes"]
    assert classes == 10
    last_four = trained["metrics"]["ra3"]["sites"][-4:]
    assert all(site["rank_median"] <= classes for site in last_four)
    # the control's rank reaches k = 16 > C: undetermined as a number, but known to exceed C
    for site in lowwd["metrics"]["ra3"]["sites"][-4:]:
        assert site["rank_median"] is None and site["rank_at_least"] == 16 and site["rank_le_classes"] is False
    score, control = trained["metrics"]["ra2"]["mean_score"], lowwd["metrics"]["ra2"]["mean_score"]
    assert score > 0.6 and control < 0.2 and score > 4 * control
    assert trained["metrics"]["ra1"]["mean_linearity"] > 0.99
    assert lowwd["verdict"]["ra"] != "present"


def test_model_without_skips_reports_no_residual_connections(tmp_path, cli, bundled_reports):
    report = bundled_reports["fc-digits-noskip"]
    assert report["sites"] == [] and report["verdict"]["ra"] == "not_applicable"
    assert "no residual connections found" in report["messages"]
    code, stdout, _ = cli("bundled/fc-digits-noskip", "--json", str(tmp_path / "r.json"))
    assert code == 0 and "no residual connections found" in stdout


def test_every_site_reproduces_its_block_output():
    loaded = load_model("bundled/fc-digits")
    x = torch.randn(5, 64)
    report = verify_sites(find_sites(loaded.module), capture(loaded.module, x, find_sites(loaded.module)))
    assert len(report.sites) == 8 and not report.skipped
    records = capture(loaded.module, x, report.sites).sites
    for site in report.sites:
        block = loaded.module.get_submodule(site.module_path)
        record = records[site.name]
        torch.testing.assert_close(site.output_from(record.x, record.ctx), block(record.x))
        assert site.verify_error < 1e-6


def test_timm_resnet18_sites_verified():
    import timm

    model = timm.create_model("resnet18", pretrained=False, zero_init_last=False).eval()
    report = find_sites(model)
    assert report.adapter == "timm-resnet"
    verified = verify_sites(report, capture(model, torch.randn(2, 3, 64, 64), report))
    assert len(verified.sites) == 8 and not verified.skipped
    assert [s.kind for s in verified.sites].count("projection") == 3
    assert max(s.verify_error for s in verified.sites) < 1e-5


def test_exact_and_matrix_free_spectra_agree_in_float64():
    loaded = load_model("bundled/fc-digits")
    model = loaded.module.double()
    found = find_sites(model)
    site = found.sites[5]
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((3, 64)))
    record = capture(model, x, Found(found.adapter, (site,))).sites[site.name]
    op = JacobianOperator(lambda h: site.branch(h, record.ctx), record.x)
    exact = dense_svd(op, 8)
    iterative = krylov_svd(op, 8, tol=1e-10)
    torch.testing.assert_close(iterative.S, exact.S, rtol=1e-4, atol=0)
    # adjoint test on random vectors: <u, J v> = <Jᵀ u, v>
    u, v = torch.randn(3, 128, dtype=torch.float64), torch.randn(3, 128, dtype=torch.float64)
    torch.testing.assert_close((u * op.matvec(v)).sum(1), (op.rmatvec(u) * v).sum(1), rtol=1e-10, atol=1e-12)
    # and the dense path against torch.func.jacrev on each sample
    jac = torch.func.vmap(torch.func.jacrev(lambda h: site.branch(h[None], record.ctx)[0]))(record.x)
    torch.testing.assert_close(op.dense(), jac, rtol=1e-10, atol=1e-12)


def _one_line_error(code: int, stdout: str, stderr: str) -> str:
    assert code == 2
    assert "Traceback" not in stderr + stdout
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:")
    return lines[0]


def test_unknown_model_is_one_line_exit_2(cli):
    assert "unknown" in _one_line_error(*cli("bundled/no-such-model"))
    assert "unknown" in _one_line_error(*cli("timm/no_such_net_v9"))
    assert "unknown model" in _one_line_error(*cli("not-a-model"))


def test_checkpoint_that_does_not_fit_is_one_line_exit_2(tmp_path, cli):
    weights = tmp_path / "wrong.safetensors"
    save_file({"head.weight": torch.zeros(3, 3)}, str(weights))
    line = _one_line_error(*cli("bundled/fc-digits", "--weights", str(weights)))
    assert "do not fit" in line and "missing" in line


def test_data_of_the_wrong_shape_is_one_line_exit_2(tmp_path, cli):
    data = tmp_path / "x.npz"
    np.savez(data, x=np.zeros((4, 32), dtype=np.float32))
    line = _one_line_error(*cli("bundled/fc-digits", "--data", str(data)))
    assert "(32,)" in line and "(64,)" in line


def test_existing_report_is_not_overwritten(tmp_path, cli):
    out = tmp_path / "keep.json"
    out.write_text("mine")
    _one_line_error(*cli("bundled/fc-digits", "--json", str(out)))
    assert out.read_text() == "mine"


def test_factory_with_weights(tmp_path, cli):
    factory = tmp_path / "nets.py"
    factory.write_text(
        "from ra_probe.load.bundled.fcresnet import FCResNet\n"
        "def small():\n    return FCResNet(depth=3)\n")
    model = load_model(f"{factory}:small")
    save_file({k: v.contiguous() for k, v in model.module.state_dict().items()}, str(tmp_path / "w.safetensors"))
    out = tmp_path / "f.json"
    code, _, _ = cli(f"{factory}:small", "--weights", str(tmp_path / "w.safetensors"),
                          "--data", "synthetic", "--samples", "8", "--json", str(out))
    report = json.loads(out.read_text())
    assert code == 0 and len(report["sites"]) == 3 and report["model"]["weights_sha256"]


def test_branches_that_are_exactly_zero_give_no_verdict(cli):
    """timm's random init zeroes each ResNet block's last BatchNorm: σ₁ = 0 everywhere, which is no
    evidence of RA either way."""
    code, _, err = cli("timm/resnet18", "--no-pretrained", "--data", "synthetic", "--input-shape", "3,32,32",
                       "--samples", "2", "--k", "4", "--json", "r.json")
    assert code == 0, err
    report = json.loads(Path("r.json").read_text())
    assert report["verdict"]["ra"] == "not_applicable"
    assert "exactly zero" in report["verdict"]["evidence"]["ra"]["reason"]
    assert report["metrics"]["ra1"]["mean_linearity"] is None and report["metrics"]["ra2"]["mean_score"] is None
    assert any("σ₁ = 0" in message for message in report["messages"])
