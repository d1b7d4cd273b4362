"""The gate's rules judged on constructed reports."""
import json

import pytest

from ra_probe.errors import UserError
from ra_probe.gate import GateRules, check_baseline_data, judge, read_baseline, summary_line

SETTINGS = {"k": 16, "align_k": 16, "tau": 0.01, "samples": 64, "dtype": "float32", "tol": 1e-3, "solver": "auto"}


def report(alignment=0.8, linearity=0.99, ranks=(12, 9, 9), nc1=0.05, ra="present", nc="present",
           sites=("a", "b", "c"), skipped=()):
    return {
        "model": {"name": "m"},
        "settings": SETTINGS,
        "data": {"name": "d", "digest": "abc"},
        "sites": [{"name": name} for name in sites], "skipped": [{"name": name, "reason": "why"} for name in skipped],
        "verdict": {"ra": ra, "nc": nc, "evidence": {
            "ra": {"checks": [{"name": "RA2", "value": alignment, "passed": alignment >= 0.5,
                               "rule": "mean alignment score a_ij ≥ 0.5", "threshold": 0.5}]},
            "nc": {"checks": [], "reason": "no linear classifier head found"}}},
        "metrics": {"ra1": {"mean_linearity": linearity}, "ra2": {"mean_score": alignment},
                    "ra3": {"share_rank_le_classes": 0.5,
                            "sites": [{"rank_median": r, "rank_mean": r} for r in ranks]},
                    "ra4": {"L_times_mean_sigma1": 20.0, "depth": 3,
                            "sites": [{"sigma1_mean": 20.0 / 3} for _ in range(3)]},
                    "nc": None if nc1 is None else {"nc1": nc1, "nc2_equinorm_means": 0.1, "nc2_equiangular": 0.1,
                                                    "nc3": 0.2, "nc4": 0.0}},
    }


def test_required_verdicts():
    assert judge(report(), GateRules(require=("ra", "nc"))).passed
    result = judge(report(alignment=0.2, ra="absent"), GateRules(require=("ra",)))
    assert not result.passed
    assert result.failures == ["RA absent, required present (RA2 0.2, needs mean alignment score a_ij ≥ 0.5)"]
    result = judge(report(nc1=None, nc="not_applicable"), GateRules(require=("nc",)))
    assert result.failures == ["NC not_applicable, required present (no linear classifier head found)"]


def test_metric_limits_and_missing_metrics():
    rules = GateRules(limits={"fail_below_ra2": 0.7, "fail_above_rank": 9, "fail_above_nc1": 0.1})
    assert judge(report(), rules).passed  # median rank of (12, 9, 9) is 9
    failed = judge(report(alignment=0.6, ranks=(12, 12, 9)), rules).failures
    assert failed == ["RA2 mean alignment a_ij 0.6 < 0.7", "RA3 median site rank 12 > 9"]
    assert judge(report(nc1=None), GateRules(limits={"fail_above_nc1": 0.1})).failures == [
        "NC1 not measured (fail_above_nc1 0.1)"]


def test_baseline_tolerance_is_relative_above_one_and_absolute_below():
    base = report()
    assert judge(report(alignment=0.84), GateRules(baseline=base, tolerance=0.05)).passed
    failed = judge(report(alignment=0.86), GateRules(baseline=base, tolerance=0.05)).failures
    assert failed == ["RA2 mean alignment a_ij 0.8 → 0.86 (moved +0.06, allowed ±0.05)"]
    # the mean rank moves from 10 to 11 (the median stays 9): allowed with tolerance 0.1, not 0.05
    assert judge(report(ranks=(15, 9, 9)), GateRules(baseline=base, tolerance=0.1)).passed
    assert not judge(report(ranks=(15, 9, 9)), GateRules(baseline=base, tolerance=0.05)).passed


def test_a_move_beyond_the_tolerance_fails_only_where_the_intervals_show_it():
    base, now = report(alignment=0.8), report(alignment=0.9)
    rules = GateRules(baseline=base, tolerance=0.05)
    assert not judge(now, rules).passed  # no intervals: the values decide
    base["metrics"]["ra2"]["mean_score_ci"], now["metrics"]["ra2"]["mean_score_ci"] = [0.7, 0.88], [0.82, 0.98]
    result = judge(now, rules)
    assert result.passed and "within noise" in next(c["detail"] for c in result.checks if c["name"] == "baseline alignment")
    now["metrics"]["ra2"]["mean_score_ci"] = [0.89, 0.91]  # 0.89 − 0.88 < 0.05: not shown
    assert judge(now, rules).passed
    base["metrics"]["ra2"]["mean_score_ci"] = [0.79, 0.81]  # 0.89 − 0.81 > 0.05: the move is resolved
    assert not judge(now, rules).passed


def test_baseline_verdicts_may_improve_but_not_worsen():
    worse = judge(report(ra="partial"), GateRules(baseline=report())).failures
    assert worse == ["RA present → partial (worse than baseline)"]
    assert judge(report(), GateRules(baseline=report(ra="absent"))).passed
    lost = judge(report(nc1=None, nc="not_applicable"), GateRules(baseline=report())).failures
    assert lost[0] == "NC present → not_applicable (worse than baseline)" and "only one of the runs" in lost[1]


def test_summary_line():
    passed = judge(report(), GateRules(require=("ra",)))
    assert summary_line(report(), passed) == "PASS m: RA present, NC present (1 check passed)"
    failed = judge(report(), GateRules(limits={"fail_below_ra1": 0.999}))
    assert summary_line(report(), failed) == "FAIL m: RA present, NC present; failed: RA1 mean linearity 0.99 < 0.999"


def test_read_baseline_checks_settings(tmp_path):
    path = tmp_path / "base.json"
    path.write_text(json.dumps(report()))
    assert read_baseline(path, SETTINGS)["model"]["name"] == "m"
    with pytest.raises(UserError, match=r"other settings \(tau 0.01 vs 0.05\)"):
        read_baseline(path, {**SETTINGS, "tau": 0.05})
    for key, value in (("samples", 32), ("dtype", "float64"), ("tol", 1e-4), ("solver", "block")):
        with pytest.raises(UserError, match=f"other settings \\({key} "):
            read_baseline(path, {**SETTINGS, key: value})


def test_a_baseline_of_other_token_positions_is_refused(tmp_path):
    """A report made before --tokens existed measured every token: it compares with `all`, not `last`."""
    path = tmp_path / "base.json"
    path.write_text(json.dumps(report()))  # its settings name no token positions
    assert read_baseline(path, {**SETTINGS, "tokens": "all"})["model"]["name"] == "m"
    with pytest.raises(UserError, match=r"other settings \(tokens all vs last\)"):
        read_baseline(path, {**SETTINGS, "tokens": "last"})


def test_baseline_made_on_other_data_is_refused():
    check_baseline_data(report(), "abc", "base.json")
    with pytest.raises(UserError, match="measured on other data"):
        check_baseline_data(report(), "abd", "base.json")
    with pytest.raises(UserError, match="no fingerprint"):
        check_baseline_data({"data": {"name": "d"}}, "abc", "base.json")


def test_missing_or_newly_skipped_sites_fail_against_the_baseline():
    base = report()
    assert judge(report(), GateRules(baseline=base)).passed
    failures = judge(report(sites=("a", "b"), skipped=("c",)), GateRules(baseline=base)).failures
    assert failures == ["sites: 3 → 2 (1 baseline site(s) missing (c); c newly skipped (why))"]
