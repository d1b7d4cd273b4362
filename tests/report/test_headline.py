"""One headline: the gate, `compare`, sweep.json and the training callbacks read the same numbers under
the same names from one report (ra_probe.report.headline). A reference report is edited by hand to
known numbers, and what every reader shows is checked against values worked out by hand below."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

import ra_probe
from ra_probe.integrations.tracker import scalars
from ra_probe.pipeline.settings import Settings
from ra_probe.report.compare import compare
from ra_probe.report.headline import headline, intervals
from ra_probe.sweeps.spec import Run
from ra_probe.sweeps.summary import run_entry, sweep_schema_errors, sweep_summary

REFERENCE = Path(__file__).resolve().parents[2] / "examples" / "reports" / "fc-digits.json"


def edited(ranks: list[float | None], rank_means: list[float | None]) -> dict:
    """fc-digits.json (k = 16, eight sites) with its headline inputs set to round numbers: per-site median
    ranks `ranks` (None: the rank reaches k), mean ranks `rank_means`, σ₁ means 1, 2, 3, 4, .5, .5, .25, .75."""
    report = json.loads(REFERENCE.read_text())
    assert report["settings"]["k"] == 16 and len(report["sites"]) == 8
    metrics = report["metrics"]
    metrics["ra1"].update(mean_linearity=0.75, mean_linearity_ci=[0.7, 0.8])
    metrics["ra2"].update(mean_score=0.625, mean_score_ci=[0.6, 0.65])
    for site, rank, mean in zip(metrics["ra3"]["sites"], ranks, rank_means):
        site.update(rank_median=rank, rank_at_least=16 if rank is None else None, rank_mean=mean)
    metrics["ra3"].update(share_rank_le_classes=0.375, share_rank_le_classes_ci=[0.25, 0.5], median_rank_ci=[7.0, 9.0])
    for site, sigma1 in zip(metrics["ra4"]["sites"], [1.0, 2.0, 3.0, 4.0, 0.5, 0.5, 0.25, 0.75]):
        site["sigma1_mean"] = sigma1
    metrics["ra4"].update(depth=8, L_times_mean_sigma1=12.0, L_times_mean_sigma1_ci=[11.0, 13.0])
    metrics["nc"].update(nc1=0.125, nc2_equinorm_means=0.25, nc2_equiangular=0.0625, nc3=0.5, nc4=0.03125,
                         nc1_ci=[0.1, 0.15], nc2_equinorm_means_ci=[0.2, 0.3], nc2_equiangular_ci=[0.05, 0.075],
                         nc3_ci=[0.4, 0.6], nc4_ci=[0.0, 0.0625])
    return report


# One site's rank reaches k = 16: it sorts last, as 16. Sorted: 2 3 5 7 | 9 11 12 16+; the upper middle,
# 9, is below k, so the median is known: (7 + 9) / 2 = 8. No mean rank and no largest rank (one is 16+).
# mean σ₁ = (1 + 2 + 3 + 4 + .5 + .5 + .25 + .75) / 8 = 12 / 8 = 1.5.
ONE_SATURATED = {
    "depth": 8, "linearity": 0.75, "alignment": 0.625, "median_rank": 8.0, "mean_rank": None, "largest_rank": None,
    "rank_share": 0.375, "mean_sigma1": 1.5, "L_times_mean_sigma1": 12.0, "nc1": 0.125, "nc2_equinorm_means": 0.25,
    "nc2_equiangular": 0.0625, "nc3": 0.5, "nc4": 0.03125,
}
INTERVALS = {"linearity": [0.7, 0.8], "alignment": [0.6, 0.65], "median_rank": [7.0, 9.0], "rank_share": [0.25, 0.5],
             "L_times_mean_sigma1": [11.0, 13.0], "nc1": [0.1, 0.15], "nc2_equinorm_means": [0.2, 0.3],
             "nc2_equiangular": [0.05, 0.075], "nc3": [0.4, 0.6], "nc4": [0.0, 0.0625]}


def one_saturated() -> dict:
    return edited([None, 3.0, 5.0, 7.0, 9.0, 11.0, 12.0, 2.0], [None, 3.5, 5.5, 7.5, 9.5, 11.5, 12.5, 2.5])


def test_headline_values_by_hand():
    assert headline(one_saturated()) == ONE_SATURATED
    assert intervals(one_saturated()) == INTERVALS


def test_ranks_by_hand_when_every_site_has_one():
    # sorted: 2 3 4 5 | 7 9 11 12: median (5 + 7) / 2 = 6; mean of the mean ranks
    # (4.5 + 3.5 + 5.5 + 7.5 + 9.5 + 11.5 + 12.5 + 2.5) / 8 = 57 / 8 = 7.125; largest 12
    values = headline(edited([4.0, 3.0, 5.0, 7.0, 9.0, 11.0, 12.0, 2.0], [4.5, 3.5, 5.5, 7.5, 9.5, 11.5, 12.5, 2.5]))
    assert (values["median_rank"], values["mean_rank"], values["largest_rank"]) == (6.0, 7.125, 12.0)


def test_the_median_rank_is_unknown_when_half_the_sites_reach_k():
    # sorted: 3 4 5 6 | 16+ 16+ 16+ 16+: the upper middle reaches k, so the median is not known
    values = headline(edited([None, None, None, None, 3.0, 4.0, 5.0, 6.0], [None] * 4 + [3.0, 4.0, 5.0, 6.0]))
    assert (values["median_rank"], values["mean_rank"], values["largest_rank"]) == (None, None, None)


def test_compare_sweeps_callbacks_and_the_gate_show_the_values_by_hand():
    report = one_saturated()
    row = compare([("a.json", report), ("b.json", json.loads(REFERENCE.read_text()))])["reports"][0]
    assert {key: row[key] for key in ONE_SATURATED} == ONE_SATURATED
    assert row["intervals"] == INTERVALS

    entry = run_entry(Run("a", "bundled/fc-digits", None, Settings()), "0" * 64, "done", report, None, 1.0)
    assert entry["metrics"] == ONE_SATURATED and entry["intervals"] == INTERVALS
    executor = {"name": "local", "version": None, "address": None, "resources": None, "per_run": None}
    assert sweep_schema_errors(sweep_summary("x", [entry], executor, 1, 1.0, [])) == []

    logged = scalars(ra_probe.Report(report))
    families = {"nc1": "nc", "nc2_equinorm_means": "nc", "nc2_equiangular": "nc", "nc3": "nc", "nc4": "nc"}
    expected = {f"{families.get(key, 'ra')}/{key}": value for key, value in ONE_SATURATED.items() if value is not None}
    for key, (low, high) in INTERVALS.items():
        expected |= {f"{families.get(key, 'ra')}/{key}_low": low, f"{families.get(key, 'ra')}/{key}_high": high}
    assert logged == {**expected, "ra/verdict": 1.0, "nc/verdict": 1.0}

    gate = ra_probe.check(report, fail_below_ra2=0.6, fail_below_ra1=0.8, fail_above_rank=8.0, fail_above_nc1=0.1,
                          fail_above_nc4=0.05)
    assert {c["name"]: (c["value"], c["passed"]) for c in gate.checks} == {
        "fail_below_ra2": (0.625, True), "fail_below_ra1": (0.75, False), "fail_above_rank": (8.0, True),
        "fail_above_nc1": (0.125, False), "fail_above_nc4": (0.03125, True)}


@pytest.mark.parametrize("metric, moved, fails", [("mean_score", 0.04, False), ("mean_score", 0.06, True),
                                                  ("L_times_mean_sigma1", 0.55, False), ("L_times_mean_sigma1", 0.65, True)])
def test_the_baseline_holds_each_number_within_its_tolerance(metric, moved, fails):
    """Tolerance 0.05 of max(|baseline|, 1): 0.05 for RA2's 0.625, 0.6 for RA4's 12 (intervals left out,
    so that the values alone decide)."""
    baseline = one_saturated()
    for section in baseline["metrics"].values():
        for key in [k for k in (section or {}) if isinstance(section, dict) and k.endswith("_ci")]:
            section[key] = None
    report = copy.deepcopy(baseline)
    section = "ra2" if metric == "mean_score" else "ra4"
    report["metrics"][section][metric] += moved
    failed = [c["name"] for c in ra_probe.check(report, baseline=baseline).checks if not c["passed"]]
    name = "baseline alignment" if metric == "mean_score" else "baseline L_times_mean_sigma1"
    assert failed == ([name] if fails else [])
