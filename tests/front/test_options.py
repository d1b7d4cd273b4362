"""Every probe option is defined once (ra_probe.pipeline.options.OPTIONS): the command line, the
library, a sweep file and ra-probe.toml refuse the same bad value with the same line. The tests are
parametrized over the table, so an option added to it is covered without a new test."""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import ra_probe
from ra_probe.errors import UserError
from ra_probe.pipeline.options import (
    OPTIONS,
    SWEEP_KEYS,
    Between,
    Duration,
    Integer,
    Integers,
    Kind,
    OneOf,
    Real,
    Shape,
    WordOrInteger,
    names,
)
from ra_probe.pipeline.settings import Settings
from ra_probe.sweeps.spec import read_spec

REFERENCE = Path(__file__).resolve().parents[2] / "examples" / "reports" / "fc-digits.json"


def bad_value(constraint):
    """A value `constraint` refuses, as the library takes it."""
    if isinstance(constraint, Integer):
        return constraint.low - 1
    if isinstance(constraint, Real):
        return float("nan") if constraint.low is None else constraint.low - 1.0
    if isinstance(constraint, OneOf):
        return "bogus"
    if isinstance(constraint, WordOrInteger):
        return 0
    if isinstance(constraint, (Shape, Integers)):
        return (0, 224)
    if isinstance(constraint, Between):
        return constraint.high
    if isinstance(constraint, Duration):
        return 0
    if isinstance(constraint, Kind):  # a value of another type
        return "text" if str not in constraint.types else 3
    raise AssertionError(f"no bad value for {constraint!r}: add one here")


def toml_literal(value) -> str:
    if isinstance(value, tuple):
        return f"[{', '.join(map(str, value))}]"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return repr(value) if isinstance(value, str) else str(value)


def cli_text(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


# the options of a probe (the gate's limits and tolerance are `check`'s, tested below)
CHECKED = [OPTIONS[name] for name in SWEEP_KEYS if OPTIONS[name].constraint is not None]
# The command line parses types itself; only value constraints can be broken from it.
ON_CLI = [option for option in CHECKED if option.flag and not isinstance(option.constraint, Kind)]


def expected(option) -> str:
    return option.refusal(bad_value(option.constraint))


# The defaults as the README, docs/measurement.md and `ra-probe --help` document them, written out by hand
# (not read from the option table, which the settings take theirs from): a default changed in the table
# fails here until it is changed here too, on purpose.
DOCUMENTED = {
    "k": 16, "align_k": None, "align_pairs": "auto", "samples": "auto", "max_samples": 64, "budget": None,
    "batch_size": None, "tol": 1e-3, "solver": "auto", "vectors_per_call": 16, "dense_limit": 2048, "tau": 1e-2,
    "dtype": "float32", "device": None, "seed": 0, "null": "init", "null_samples": 8, "confidence": 0.95,
    "resamples": 1000, "tokens": "all", "site_level": "auto", "coupling_k": (), "threads": None,
    "thresholds": {"ra1_min": 0.9, "ra2_min": 0.5, "ra2_min_init_ratio": 4.0, "ra3_min_rank_share": 0.5,
                   "nc1_max": 0.5, "nc1_max_init_ratio": 0.25, "nc2_max": 0.3, "nc3_max": 0.5, "nc4_max": 0.05},
}


def test_the_library_defaults_are_the_documented_ones():
    assert asdict(Settings()) == DOCUMENTED
    assert {name for name, option in OPTIONS.items() if option.role == "setting"} == set(DOCUMENTED) - {"thresholds"}
    assert all(option.refusal(option.default) is None for option in OPTIONS.values())


def test_the_command_line_without_options_probes_with_the_documented_defaults(cli, tmp_path):
    assert cli("bundled/fc-digits", "--quiet", "--json", "out.json")[0] == 0
    settings = json.loads((tmp_path / "out.json").read_text())["settings"]
    assert settings.pop("device") in ("cpu", "cuda")
    # as the report writes them: K of RA2 resolved to k, the device to the one used, JSON lists
    assert settings == {**{k: v for k, v in DOCUMENTED.items() if k != "device"}, "align_k": 16, "coupling_k": []}


@pytest.mark.parametrize("option", CHECKED, ids=lambda o: o.name)
def test_the_library_refuses_a_bad_value(option):
    message = expected(option)
    assert message and message.startswith(f"{option.name} must be ")
    with pytest.raises(UserError) as caught:
        ra_probe.probe(torch.nn.Linear(3, 3), torch.randn(4, 3), **{option.name: bad_value(option.constraint)})
    assert str(caught.value) == message


@pytest.mark.parametrize("option", CHECKED, ids=lambda o: o.name)
def test_a_sweep_file_refuses_a_bad_value(option, tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text(f'[[run]]\nmodel = "bundled/fc-digits"\n{option.name.replace("_", "-")} = '
                    f"{toml_literal(bad_value(option.constraint))}\n")
    with pytest.raises(UserError) as caught:
        read_spec(path)
    assert str(caught.value) == f"{path}: run 1: {expected(option)}"


@pytest.mark.parametrize("option", ON_CLI, ids=lambda o: o.name)
def test_the_command_line_and_the_config_file_refuse_a_bad_value(option, cli, tmp_path):
    value = bad_value(option.constraint)
    assert cli("probe", "bundled/fc-digits", option.flag, cli_text(value)) == (2, "", f"error: {expected(option)}\n")
    literal = toml_literal(cli_text(value) if isinstance(value, tuple) else value)
    (tmp_path / "ra-probe.toml").write_text(f"{option.cli_name.replace('_', '-')} = {literal}\n")
    assert cli("check", "--require", "ra") == (2, "", f"error: {expected(option)}\n")


def test_align_k_zero_is_refused_by_the_library_as_by_the_command_line(cli):
    """It used to mean k: `Settings.validate` did not check align_k."""
    with pytest.raises(UserError, match=r"^align_k must be a positive integer, got 0$"):
        ra_probe.probe(torch.nn.Linear(3, 3), torch.randn(4, 3), align_k=0)
    assert cli("--align-k", "0")[2] == "error: align_k must be a positive integer, got 0\n"


@pytest.mark.parametrize("name", names("limit", "gate"))
def test_a_gate_limit_is_refused_alike_everywhere(name, cli, tmp_path):
    report = ra_probe.load_report(REFERENCE)
    message = OPTIONS[name].refusal(float("nan"))
    assert message.startswith(f"{name} must be ")
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        ra_probe.check(report, **{name: float("nan")})
    assert cli("check", f"--{name.replace('_', '-')}", "nan") == (2, "", f"error: {message}\n")
    (tmp_path / "ra-probe.toml").write_text(f"{name.replace('_', '-')} = nan\n")
    assert cli("check") == (2, "", f"error: {message}\n")


def test_a_budget_reads_as_seconds():
    def budget(value):
        settings = Settings(budget=value)
        settings.validate()
        return settings.budget
    assert [budget(value) for value in ("90s", "10m", "1.5h", 42)] == [90, 600, 5400, 42]
    assert ra_probe.probe("bundled/fc-digits", budget="10m", k=2, null="none")["settings"]["budget"] == 600
    with pytest.raises(UserError, match="budget must be a duration"):
        ra_probe.probe("bundled/fc-digits", budget="soon")
