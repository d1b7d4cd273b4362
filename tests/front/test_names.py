"""One name, one meaning: verdict thresholds (`ra2_min`) and gate limits (`fail_below_ra2`) are distinct
options; their former names still work with one deprecation warning, and a former name given with its
current one is refused. The table's attributes, not lists kept elsewhere, decide what enters the cache
key and what must match a baseline; its bounds refuse values no metric can take. A report of schema 1.x
still reads, its keys renamed."""
from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch

import ra_probe
from ra_probe.api import settings_from
from ra_probe.errors import UserError
from ra_probe.gate import read_baseline
from ra_probe.pipeline import options as table
from ra_probe.pipeline.cache import ResultCache
from ra_probe.pipeline.options import OPTIONS, Integer, Integers, OneOf, Real, WordOrInteger, names
from ra_probe.pipeline.settings import Settings
from ra_probe.report.files import read_report_file
from ra_probe.report.schema import FORMER_LIMITS, FORMER_THRESHOLDS
from ra_probe.sweeps.spec import read_spec

REFERENCE = Path(__file__).resolve().parents[2] / "examples" / "reports" / "fc-digits.json"


# ---- thresholds and limits: distinct names, former names deprecated ----

def test_no_name_is_both_a_threshold_and_a_limit():
    thresholds, limits = set(names("threshold")), set(names("limit"))
    assert thresholds and limits and not thresholds & limits
    assert set(FORMER_THRESHOLDS.values()) == thresholds and set(FORMER_LIMITS.values()) == limits
    # a former name is a threshold to probe and a limit to check, never two options of one role
    for role in ("threshold", "limit", "setting"):
        former = [old for name in names(role) for old in OPTIONS[name].was]
        assert len(former) == len(set(former))


@pytest.mark.parametrize("old, new", sorted(FORMER_THRESHOLDS.items()))
def test_a_former_threshold_name_works_with_one_warning(old, new):
    with pytest.warns(FutureWarning, match=f"^deprecated: {old} is now {new}$") as caught:
        settings = settings_from({old: 0.25})
    assert len(caught) == 1 and getattr(settings.thresholds, new) == 0.25
    assert caught[0].filename == __file__  # the warning points at the caller's line


def test_a_former_setting_name_works_with_one_warning():
    with pytest.warns(FutureWarning, match="^deprecated: sites is now site_level$"):
        assert settings_from({"sites": "block"}).site_level == "block"
    with pytest.warns(FutureWarning, match="^deprecated: chunk is now vectors_per_call$"):
        assert settings_from({"chunk": 4}).vectors_per_call == 4


def test_a_former_name_with_its_current_name_is_refused():
    with pytest.raises(UserError, match="^min_alignment and ra2_min are one setting"):
        settings_from({"min_alignment": 0.6, "ra2_min": 0.6})
    report = ra_probe.load_report(REFERENCE)
    with pytest.raises(UserError, match="^max_nc1 and fail_above_nc1 are one setting"):
        ra_probe.check(report, max_nc1=0.1, fail_above_nc1=0.1)


def test_check_takes_former_limit_names_as_limits():
    report = ra_probe.load_report(REFERENCE)
    with pytest.warns(FutureWarning) as caught:
        result = ra_probe.check(report, min_alignment=0.99, max_rank=10)
    assert sorted(str(w.message) for w in caught) == ["deprecated: max_rank is now fail_above_rank",
                                                       "deprecated: min_alignment is now fail_below_ra2"]
    assert [c["name"] for c in result.checks] == ["fail_below_ra2", "fail_above_rank"]
    assert not result.passed  # RA2 is below 0.99: the limit, not the threshold, was set


def test_the_command_line_says_a_former_flag_once_and_refuses_both(cli, tmp_path):
    both = cli("check", "--min-alignment", "0.6", "--fail-below-ra2", "0.6")
    assert both[0] == 2 and both[2].count("\n") == 1 and "--min-alignment and --fail-below-ra2 are one option" in both[2]
    code, out, err = cli("check", "bundled/fc-digits", "--samples", "2", "--k", "2", "--null", "none",
                         "--min-alignment", "0", "--sites", "auto")
    assert code == 0, err
    assert err.splitlines().count("deprecated: --min-alignment is now --fail-below-ra2") == 1
    assert err.splitlines().count("deprecated: --sites is now --site-level") == 1
    report = json.loads(next(Path("reports").glob("*.check.json")).read_text())
    assert report["gate"]["rules"]["limits"] == {"fail_below_ra2": 0}


def test_a_config_file_with_a_former_key(cli, tmp_path):
    Path("ra-probe.toml").write_text("min-alignment = 2.0\n")  # a former key, and out of bounds
    code, _, err = cli("check", "bundled/fc-digits")
    assert code == 2
    assert err.splitlines() == ["deprecated: --min-alignment is now --fail-below-ra2",
                                "error: fail_below_ra2 must be a number from 0 to 1, got 2.0"]


def test_a_sweep_file_with_a_former_key(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text('min-alignment = 0.7\n[[run]]\nmodel = "bundled/fc-digits"\n')
    with pytest.warns(FutureWarning, match=r"^deprecated: min-alignment is now ra2-min \("):
        (run,) = read_spec(path).runs
    assert run.settings.thresholds.ra2_min == 0.7
    path.write_text('[[run]]\nmodel = "bundled/fc-digits"\nmin-alignment = 0.7\nra2-min = 0.6\n')
    with pytest.raises(UserError, match="min-alignment and ra2-min are one setting"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        read_spec(path)
    path.write_text('[[run]]\nmodel = "bundled/fc-digits"\nfail-below-ra2 = 0.6\n')
    with pytest.raises(UserError, match="unknown key 'fail-below-ra2'"):  # a gate limit is not a probe option
        read_spec(path)


# ---- bounds ----

@pytest.mark.parametrize("name, value, bound", [("ra2_min", 7, "from 0 to 1"), ("ra3_min_rank_share", 3, "from 0 to 1"),
                                                ("nc3_max", 5, "from 0 to 4"), ("nc4_max", 1.5, "from 0 to 1"),
                                                ("tau", 2, "from 0 to 1")])
def test_a_value_beyond_its_upper_bound_is_refused(name, value, bound):
    with pytest.raises(UserError) as caught:
        ra_probe.probe(torch.nn.Linear(3, 3), torch.randn(4, 3), **{name: value})
    assert str(caught.value) == f"{name} must be a number {bound}, got {value}" == OPTIONS[name].refusal(value)


def test_a_limit_beyond_its_upper_bound_is_refused(cli):
    with pytest.raises(UserError, match="^fail_below_ra2 must be a number from 0 to 1, got 7$"):
        ra_probe.check(ra_probe.load_report(REFERENCE), fail_below_ra2=7)
    assert cli("check", "--fail-above-nc4", "2") == (2, "", "error: fail_above_nc4 must be a number from 0 to 1, got 2.0\n")


# ---- the table's attributes decide the cache key and the baseline's settings ----

def other_value(option):
    """A valid value of a setting other than its default."""
    special = {"device": None, "coupling_k": (2,), "budget": 60, "align_k": 3, "samples": 8, "threads": 1,
               "batch_size": 2, "seed": 1}
    if option.name in special:
        return special[option.name]
    constraint = option.constraint
    if isinstance(constraint, OneOf):
        return next(v for v in constraint.values if v != option.default)
    if isinstance(constraint, WordOrInteger):
        return 5
    if isinstance(constraint, Integer):
        return option.default + 1
    if isinstance(constraint, (Real, table.Between)):
        return option.default / 2
    if isinstance(constraint, Integers):
        return (2,)
    raise AssertionError(f"no other value for {option.name}")


SETTINGS = [name for name in names("setting") if name != "device"]  # the key holds the device's type


MODULE = torch.nn.Linear(2, 2)
FIXED = {"device": "cpu", "align_k": 8}  # align_k fixed: as a report holds it, it follows k when not set


def cache_key(**changed) -> str:
    settings = Settings(**{**FIXED, **changed})
    settings.validate()
    return ResultCache("unused").for_run(MODULE, "m", settings).run_key


def refused_by_baseline(tmp_path, **changed) -> bool:
    made_with = Settings(**FIXED)
    made_with.validate()
    baseline = {**json.loads(REFERENCE.read_text()), "settings": json.loads(json.dumps(made_with.as_dict()))}
    (tmp_path / "base.json").write_text(json.dumps(baseline))
    now = Settings(**{**FIXED, **changed})
    now.validate()
    try:
        read_baseline(tmp_path / "base.json", json.loads(json.dumps(now.as_dict())))
    except UserError as exc:
        assert "other settings" in str(exc)
        return True
    return False


@pytest.mark.parametrize("name", SETTINGS)
def test_the_cache_key_holds_what_the_table_says(name, monkeypatch):
    option = OPTIONS[name]
    changed = {name: other_value(option)}
    assert (cache_key(**changed) != cache_key()) == option.in_cache_key
    monkeypatch.setitem(OPTIONS, name, dataclasses.replace(option, in_cache_key=not option.in_cache_key))
    assert (cache_key(**changed) != cache_key()) != option.in_cache_key  # the attribute decides it


@pytest.mark.parametrize("name", SETTINGS)
def test_a_baseline_must_match_what_the_table_says(name, monkeypatch, tmp_path):
    option = OPTIONS[name]
    changed = {name: other_value(option)}
    assert refused_by_baseline(tmp_path, **changed) == option.must_match_baseline
    monkeypatch.setitem(OPTIONS, name, dataclasses.replace(option, must_match_baseline=not option.must_match_baseline))
    assert refused_by_baseline(tmp_path, **changed) != option.must_match_baseline


def test_k_and_align_k_resolve_in_one_place():
    assert Settings(k=12).alignment_k() == 12 and Settings(k=12, align_k=4).alignment_k() == 4
    assert Settings(k=12).alignment_k(6) == 6 and Settings(k=12, align_k=4).alignment_k(6) == 4
    assert Settings(k=12, align_k=4, coupling_k=(8,)).widest_alignment_k() == 8
    assert Settings(k=12).as_dict()["align_k"] == 12


# ---- a 1.x report still reads ----

def one_point_x(report: dict) -> dict:
    """The report as schema 1.7 wrote it."""
    old = json.loads(json.dumps(report))
    old["schema_version"] = "1.7"
    settings = old["settings"]
    settings["chunk"], settings["sites"] = settings.pop("vectors_per_call"), settings.pop("site_level")
    back = {new: old_name for old_name, new in FORMER_THRESHOLDS.items()}
    settings["thresholds"] = {back[k]: v for k, v in settings["thresholds"].items()}
    old["verdict"]["thresholds"] = {back[k]: v for k, v in old["verdict"]["thresholds"].items()}
    return old


def test_a_1x_report_reads_with_its_keys_renamed(tmp_path, cli):
    current = json.loads(REFERENCE.read_text())
    old = one_point_x(current)
    old["gate"] = {"passed": True, "checks": [{"name": "min_alignment", "passed": True, "detail": ""}], "failures": [],
                   "rules": {"limits": {"min_alignment": 0.5, "max_nc1": 0.3}}}
    (tmp_path / "old.json").write_text(json.dumps(old))
    read = read_report_file(tmp_path / "old.json")
    assert read["settings"] == current["settings"] and read["verdict"]["thresholds"] == current["verdict"]["thresholds"]
    assert read["gate"]["rules"]["limits"] == {"fail_below_ra2": 0.5, "fail_above_nc1": 0.3}
    assert read["gate"]["checks"][0]["name"] == "fail_below_ra2"
    # the gate judges it and takes it as a baseline; compare reads it beside a 2.0 report
    assert ra_probe.check(old, fail_below_ra2=0.1, baseline=current).passed
    assert ra_probe.check(current, baseline=tmp_path / "old.json").passed
    (tmp_path / "new.json").write_text(json.dumps(current))
    assert cli("compare", tmp_path / "old.json", tmp_path / "new.json")[0] == 0


# ---- the command line only parses: the library's one loading path ----

@pytest.mark.parametrize("args", [("probe", "bundled/fc-digits", "--quiet"), ("check", "bundled/fc-digits", "--require", "ra"),
                                  ("sites", "bundled/fc-digits")], ids=lambda args: args[0])
def test_every_command_loads_through_the_library(args, cli, monkeypatch):
    import ra_probe.api as api

    calls = []
    original = api.load_inputs

    def recorded(model, data=None, settings=None, **options):
        calls.append((model, options))
        return original(model, data, settings, **options)
    monkeypatch.setattr(api, "load_inputs", recorded)
    cheap = ("--samples", "2", "--k", "2", "--null", "none") if args[0] != "sites" else ()
    code, _, err = cli(*args, *cheap, "--site-level", "auto")
    assert code in (0, 1), err
    assert calls[0][0] == "bundled/fc-digits" and calls[0][1]["site_level"] == "auto"
