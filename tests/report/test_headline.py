"""One headline: the gate, `compare`, sweep.json and the training callbacks read the same numbers under
the same names from one report (ra_probe.report.headline)."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

import ra_probe
from ra_probe.gate import LIMITS, GateRules, judge
from ra_probe.integrations.tracker import scalars
from ra_probe.pipeline.settings import Settings
from ra_probe.report.compare import compare
from ra_probe.report.headline import HEADLINE, headline, intervals
from ra_probe.sweeps.spec import Run
from ra_probe.sweeps.summary import run_entry, sweep_schema_errors, sweep_summary

REFERENCE = Path(__file__).resolve().parents[2] / "examples" / "reports"


def reference(name: str) -> dict:
    return json.loads((REFERENCE / f"{name}.json").read_text())


def test_headline_values_by_hand():
    report = reference("fc-digits")
    values = headline(report)
    metrics = report["metrics"]
    ranks = [s["rank_median"] for s in metrics["ra3"]["sites"]]
    assert ranks[0] is None and values["median_rank"] == statistics.median([16, *ranks[1:]]) == 9.0
    assert values["median_rank"] == metrics["ra3"]["median_rank"]  # the report's own field, same name
    assert values["largest_rank"] is None and values["mean_rank"] is None  # a site's rank reaches k
    sigma1 = [s["sigma1_mean"] for s in metrics["ra4"]["sites"]]
    assert values["mean_sigma1"] == pytest.approx(sum(sigma1) / 8)
    assert values["mean_sigma1"] * values["depth"] == pytest.approx(values["L_times_mean_sigma1"])
    assert values["alignment"] == metrics["ra2"]["mean_score"]
    assert values["linearity"] == metrics["ra1"]["mean_linearity"]


@pytest.mark.parametrize("name", ["fc-digits", "fc-digits-lowwd", "fc-digits-noskip"])
def test_gate_compare_sweeps_and_callbacks_read_the_same_names_and_values(name):
    report = reference(name)
    values = headline(report)
    assert list(values) == list(HEADLINE)

    row = compare([("a.json", report), ("b.json", reference("fc-digits"))])["reports"][0]
    assert {key: row[key] for key in HEADLINE} == values

    entry = run_entry(Run("a", "bundled/fc-digits", None, Settings()), "0" * 64, "done", report, None, 1.0)
    assert entry["metrics"] == values
    assert sweep_schema_errors(sweep_summary("x", [entry], {"name": "local", "version": None, "address": None,
                                                            "resources": None, "per_run": None}, 1, 1.0, [])) == []

    logged = scalars(ra_probe.Report(report))
    assert {key: value for key, value in logged.items() if not key.endswith(("/verdict", "_low", "_high"))} == {
        f"{HEADLINE[key].family}/{key}": value for key, value in values.items() if value is not None}
    bounds = {key: [logged[f"{HEADLINE[key].family}/{key}_low"], logged[f"{HEADLINE[key].family}/{key}_high"]]
              for key in HEADLINE if f"{HEADLINE[key].family}/{key}_low" in logged}
    assert bounds == {key: ci for key, ci in intervals(report).items() if ci is not None} != {}
    assert row["intervals"] == intervals(report) and entry["intervals"] == intervals(report)

    limits = judge(report, GateRules(limits={option: 0.5 for option in LIMITS})).checks
    assert {check["name"]: check["value"] for check in limits} == {
        option: values[limit.metric] for option, limit in LIMITS.items()}
    held = [check for check in judge(report, GateRules(baseline=report)).checks
            if check["name"].removeprefix("baseline ") in HEADLINE]
    assert [check["name"] for check in held] == [f"baseline {key}" for key, metric in HEADLINE.items()
                                                 if metric.held and values[key] is not None]
    assert all(check["value"] == check["baseline"] == values[check["name"][9:]] for check in held)
