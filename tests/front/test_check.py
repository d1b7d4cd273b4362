"""`ra-probe check`: the CI gate on the bundled models and their controls, baselines, config files,
the result cache and Ctrl-C."""
import json
from pathlib import Path

import pytest
from conftest import TINY

import ra_probe.pipeline.measure
from ra_probe.report.schema import schema_errors


@pytest.fixture
def count_measurements(monkeypatch):
    """Count calls of the group measurement (the expensive part a cache must save)."""
    calls = []
    real = ra_probe.pipeline.measure.measure_group

    def counted(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(ra_probe.pipeline.measure, "measure_group", counted)
    return calls


def test_require_ra_passes_on_the_trained_model_and_fails_on_its_control(cli):
    code, out, err = cli("check", "bundled/fc-digits", "--require", "ra")
    assert code == 0, err
    assert out.count("\n") == 1 and out.startswith("PASS bundled/fc-digits: RA present")
    report = json.loads(Path("reports/bundled-fc-digits.check.json").read_text())
    assert report["gate"]["passed"] and report["verdict"]["ra"] == "present"
    assert schema_errors(report) == []

    code, out, err = cli("check", "bundled/fc-digits-lowwd", "--require", "ra")
    assert code == 1
    assert out.count("\n") == 1 and out.startswith("FAIL bundled/fc-digits-lowwd: RA absent")
    assert "RA2" in out and "required present" in out  # the reason, with its evidence


def test_baseline_from_the_same_model_passes_and_a_tighter_one_fails(cli, tmp_path):
    assert cli("check", "bundled/fc-digits", "--require", "ra", "--json", "base.json")[0] == 0
    code, out, _ = cli("check", "bundled/fc-digits", "--baseline", "base.json")
    assert code == 0 and out.startswith("PASS")

    tighter = json.loads(Path("base.json").read_text())
    measured = tighter["metrics"]["ra2"]["mean_score"]
    tighter["metrics"]["ra2"]["mean_score"] = measured + 0.2
    tighter["metrics"]["ra2"]["mean_score_ci"] = [v + 0.2 for v in tighter["metrics"]["ra2"]["mean_score_ci"]]
    Path("tighter.json").write_text(json.dumps(tighter))
    code, out, _ = cli("check", "bundled/fc-digits", "--baseline", "tighter.json", "--tolerance", "0.05")
    assert code == 1
    assert "RA2 mean alignment" in out and "moved -0.2" in out
    # the control against the trained model's baseline: verdict worse and metrics moved
    code, out, _ = cli("check", "bundled/fc-digits-lowwd", "--baseline", "base.json")
    assert code == 1 and "RA present → absent (worse than baseline)" in out


def test_metric_limits(cli):
    code, out, _ = cli("check", "bundled/fc-digits", "--fail-below-ra2", "0.6", "--fail-above-rank", "10",
                       "--fail-below-ra1", "0.99")
    assert code == 0, out
    code, out, _ = cli("check", "bundled/fc-digits", "--fail-below-ra2", "0.9", "--fail-above-rank", "5")
    assert code == 1
    assert "RA2 mean alignment a_ij" in out and "< 0.9" in out and "RA3 median site rank" in out and "> 5" in out


def test_config_file_and_pyproject_table_set_the_gate(cli, tmp_path):
    Path("ra-probe.toml").write_text('model = "bundled/fc-digits-lowwd"\nrequire = "ra"\n')
    code, out, _ = cli("check")
    assert code == 1 and out.startswith("FAIL bundled/fc-digits-lowwd")
    code, out, _ = cli("check", "bundled/fc-digits")  # the command line wins over the file
    assert code == 0 and out.startswith("PASS bundled/fc-digits:")

    Path("ra-probe.toml").unlink()
    Path("pyproject.toml").write_text('[project]\nname = "x"\n\n[tool.ra-probe]\nfail-below-ra2 = 0.95\n')
    code, out, _ = cli("check", "bundled/fc-digits")
    assert code == 1 and "< 0.95" in out

    Path("gate.toml").write_text("fail-above-nc4 = 0.5\nfail-below-ra2 = 0.5\n")
    code, out, _ = cli("check", "bundled/fc-digits", "--config", "gate.toml", "--require", "ra,nc")
    assert code == 0 and "4 checks passed" in out


def test_second_identical_run_is_served_from_the_cache(cli, count_measurements, tmp_path, monkeypatch):
    monkeypatch.setenv("RA_PROBE_CACHE", str(tmp_path / "own-cache"))
    args = ("check", "bundled/fc-digits", "--require", "ra", "--samples", "32", "--batch-size", "16")
    assert cli(*args, "--json", "first.json")[0] == 0
    # one group: the model's first sample alone, then chunks of 15 and 16; the random init's first sample, then 7
    assert len(count_measurements) == 5
    assert cli(*args, "--json", "second.json")[0] == 0
    assert len(count_measurements) == 5  # nothing measured again
    first, second = (json.loads(Path(p).read_text()) for p in ("first.json", "second.json"))
    assert first["metrics"] == second["metrics"]
    assert not any("from the cache" in m for m in first["messages"])
    assert any(m.startswith("5 of 5 group measurements served from the cache") for m in second["messages"])
    # settings applied after measuring (τ, thresholds) reuse the entries; --no-cache measures anew
    assert cli(*args, "--tau", "0.05", "--json", "third.json")[0] == 0
    assert len(count_measurements) == 5
    assert cli(*args, "--no-cache", "--json", "fourth.json")[0] == 0
    assert len(count_measurements) == 10
    # a setting that changes measurements misses
    assert cli(*args, "--k", "12", "--json", "fifth.json")[0] == 0
    assert len(count_measurements) == 15


def test_ctrl_c_keeps_finished_work_and_writes_no_report(cli, monkeypatch, tmp_path):
    monkeypatch.setenv("RA_PROBE_CACHE", str(tmp_path / "own-cache"))
    real, calls, interrupt = ra_probe.pipeline.measure.measure_group, [], [True]

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2 and interrupt[0]:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ra_probe.pipeline.measure, "measure_group", interrupted)
    args = ("check", "bundled/fc-digits", "--require", "ra", "--samples", "32", "--batch-size", "16")
    code, out, err = cli(*args, "--json", "report.json")
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    assert not Path("report.json").exists() and not list(Path().glob("*.partial"))
    assert len(list((tmp_path / "own-cache").rglob("*.pt"))) == 1
    assert not list((tmp_path / "own-cache").rglob("*.partial"))

    calls.clear()
    interrupt[0] = False
    code, out, _ = cli(*args, "--json", "report.json")
    # the random init's first sample came from the cache; the model's three chunks and the init's second did not
    assert code == 0 and len(calls) == 4


def test_model_without_classifier_head_has_no_nc(cli):
    code, out, _ = cli("check", f"{TINY}:headless", "--data", "synthetic", "--require", "nc", "--samples", "8")
    assert code == 1 and "NC not_applicable, required present (no linear classifier head found)" in out


def test_default_report_is_not_written_over_a_foreign_file(cli):
    Path("reports").mkdir()
    Path("reports/bundled-fc-digits.check.json").write_text("my notes")
    code, _, err = cli("check", "bundled/fc-digits", "--require", "ra")
    assert code == 2 and "exists; pass --force" in err
    assert Path("reports/bundled-fc-digits.check.json").read_text() == "my notes"
