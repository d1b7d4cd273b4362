"""Verdicts: RA and NC present / partial / absent / not_applicable, with the evidence and
the thresholds used. All thresholds are settings."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ra_probe.metrics.uncertainty import samples_to_decide


@dataclass
class Thresholds:
    min_alignment: float = 0.5  # RA2: mean group score a_ij
    min_linearity: float = 0.9  # RA1: mean linearity of groups with ≥ 2 sites
    rank_share: float = 0.5  # RA3 (fully-connected nets): share of sites with rank ≤ C
    min_init_ratio: float = 4.0  # RA2 over its value for the same architecture at random init
    max_nc_init_ratio: float = 0.25  # NC1 over its value for the same architecture at random init
    max_nc1: float = 0.5
    max_nc2: float = 0.3  # equinorm of class means and equiangularity
    max_nc3: float = 0.5
    max_nc4: float = 0.05

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


# said in every verdict made on synthetic samples (`--data synthetic`)
SYNTHETIC_CAVEAT = ("synthetic inputs (random, not data): a smoke test of the model, not a diagnosis; "
                    "pass --data for one")


def _check(name: str, value: float | None, limit: float, at_least: bool, what: str,
           ci: list[float] | None = None, samples: int | None = None) -> dict[str, Any]:
    """A verdict check of `value` against `limit`. With its confidence interval `ci` from `samples`
    samples, it passes or fails only when the interval is clear of the limit; otherwise it is
    undetermined (passed None), with about how many samples would decide it. Without an interval
    (`samples` < 2) a value decides nothing."""
    if value is not None and not math.isfinite(value):
        value = None  # undefined (e.g. every branch exactly zero): no evidence either way
    sign = "≥" if at_least else "≤"
    check = {"name": name, "value": value, "ci": ci, "threshold": limit, "passed": None,
             "rule": f"{what} {sign} {limit:g}"}
    if value is None:
        return check
    if samples is not None and samples < 2:
        check["undetermined"] = "one sample: no interval, so nothing is decided (measure more samples)"
        return check
    low, high = ci if ci is not None else (value, value)
    passes, fails = (low >= limit, high < limit) if at_least else (high <= limit, low > limit)
    if passes or fails:
        check["passed"] = bool(passes)
        return check
    check["undetermined"] = f"its interval [{low:.3g}, {high:.3g}] holds the threshold {limit:g}"
    if samples is not None:
        check["samples_to_decide"] = samples_to_decide(value, ci, limit, samples)
    return check


def _overall(checks: list[dict[str, Any]]) -> str:
    """present: every check decided and passed; absent: every one failed; partial: some of each; while a
    check is undetermined and could still turn the verdict, undetermined; no check with a value:
    not_applicable."""
    judged = [c["passed"] for c in checks if c["passed"] is not None]
    open_checks = any(c.get("undetermined") for c in checks)
    if judged and any(judged) and not all(judged):
        return "partial"
    if open_checks:
        return "undetermined"
    if not judged:
        return "not_applicable"
    return "present" if all(judged) else "absent"


# The RA headline metrics: (section, field) of the metrics dict, the same names in the null's values.
HEADLINE = {"ra1": "mean_linearity", "ra2": "mean_score", "ra3": "median_rank", "ra4": "L_times_mean_sigma1"}


def headline(metrics: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """The RA headline metrics of a probe's metrics, by their own names: {"ra2": {"mean_score": …}, …}."""
    return {section: {name: _finite(metrics[section].get(name))} for section, name in HEADLINE.items()}


def null_ratios(metrics: dict[str, Any], null: dict[str, Any]) -> dict[str, float | None]:
    """Each RA headline metric over its value at random init (None where either is undefined or the
    init's is zero)."""
    out = {}
    for section, name in HEADLINE.items():
        value, at_init = _finite(metrics[section].get(name)), null.get(section, {}).get(name)
        out[section] = value / at_init if value is not None and at_init else None
    return out


def _finite(value: Any) -> float | None:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def no_sites_message(skipped: int) -> str:
    """What a model without a usable site is told: none found, or found but every one skipped."""
    if not skipped:
        return "no residual connections found"
    return f"no usable residual site: {skipped} residual add(s) found but skipped (see the skipped sites and why)"


def ra_verdict(metrics: dict[str, Any], t: Thresholds, skipped: int = 0) -> dict[str, Any]:
    """RA from RA1–RA3 and, when the architecture was measured at random init (`metrics["null"]`), RA2's
    contrast with it: a model whose alignment does not stand out from its own init is judged absent,
    whatever the fixed thresholds say. `skipped`: residual adds found but not usable, for the reason
    given when no site was measured."""
    null = metrics.get("null") or {"status": "off", "reason": "no null model"}
    control = _control(null)
    if not metrics["ra2"]["groups"] and not metrics["ra3"]["sites"]:
        return {"status": "not_applicable", "checks": [], "reason": no_sites_message(skipped), "control": control}
    n = (metrics.get("uncertainty") or {}).get("samples")
    ra2 = _check("RA2", metrics["ra2"]["mean_score"], t.min_alignment, True, "mean alignment score a_ij",
                 metrics["ra2"].get("mean_score_ci"), n)
    if not metrics["ra2"]["groups"]:
        ra2["reason"] = "no group has two sites: alignment needs a pair of sites"
    checks = [_check("RA1", metrics["ra1"]["mean_linearity"], t.min_linearity, True, "mean trajectory linearity",
                     metrics["ra1"].get("mean_linearity_ci"), n), ra2]
    ra3 = metrics["ra3"]
    if ra3["judged"] or (ra3["fully_connected"] and ra3["undetermined"]):
        # sites whose rank is undetermined (it reaches k ≤ C) do not count; none judged: no evidence
        rule = "share of sites with rank ≤ C" + (f" ({'; '.join(ra3['undetermined'])})" if ra3["undetermined"] else "")
        checks.append(_check("RA3", ra3["share_rank_le_classes"], t.rank_share, True, rule,
                             ra3.get("share_rank_le_classes_ci"), n))
    if null["status"] == "measured":
        at_init = null["ra2"]["mean_score"]
        contrast = _check("RA2 vs init", null_ratios(metrics, null)["ra2"], t.min_init_ratio, True,
                          f"a_ij ÷ its value at random init ({at_init:.3g})" if at_init else "a_ij ÷ its value at random init",
                          (null.get("ratio_ci") or {}).get("ra2"), min(n, null["samples"]) if n else None)
        if contrast["value"] is None:
            contrast["reason"] = "RA2 is undefined for the model or its random init"
        checks.append(contrast)
    if all(s["sigma1_mean"] == 0 for s in metrics["ra4"]["sites"]):
        return {"status": "not_applicable", "checks": checks, "control": control,
                "reason": "every residual branch is exactly zero (σ₁ = 0): nothing to align"}
    if checks[-1]["name"] == "RA2 vs init" and checks[-1]["passed"] is False:
        return {"status": "absent", "checks": checks, "control": control,
                "reason": f"RA2 is {checks[-1]['value']:.3g}× its value at random init: the alignment does not stand "
                          f"out from the untrained architecture (needs ≥ {t.min_init_ratio:g}×)"}
    return {"status": _overall(checks), "checks": checks, "control": control}


def _control(null: dict[str, Any]) -> str:
    """What the verdict was compared with, in words."""
    if null["status"] != "measured":
        return f"none: {null['reason']}"
    return f"the same architecture at random init ({null['init']}, seed {null['seed']}, {null['samples']} samples)"


def nc_verdict(nc: dict[str, Any] | None, t: Thresholds, null: dict[str, Any] | None = None) -> dict[str, Any]:
    """NC from NC1–NC4 and, when the architecture's collapse at random init was measured on the same
    samples (`null["nc"]`), NC1's contrast with it: a network whose features are no more collapsed than
    its own init's is judged absent, whatever the fixed thresholds say (a random init can pass NC2)."""
    if nc is None:
        return {"status": "not_applicable", "checks": [], "reason": "no linear classifier head found"}
    if nc["undetermined"]:  # too few samples (per class): the values would carry no information, or mislead
        return {"status": "undetermined", "checks": [], "reason": nc["undetermined"]}
    equinorm = nc["nc2_equinorm_means"]
    angle = nc["nc2_equiangular"]
    nc2 = None if angle is None else max(equinorm, angle)
    n = None if nc.get("interval_note") else nc["samples"]  # next tokens: no interval, decided on the values
    checks = [
        _check("NC1", nc["nc1"], t.max_nc1, False, "Tr(Σ_W Σ_B†)/C", nc.get("nc1_ci"), n),
        _check("NC2", nc2, t.max_nc2, False, "max(equinorm CV, equiangularity)", nc.get("nc2_ci"), n),
        _check("NC3", nc["nc3"], t.max_nc3, False, "self-duality distance", nc.get("nc3_ci"), n),
        _check("NC4", nc["nc4"], t.max_nc4, False, "mismatch with nearest class mean", nc.get("nc4_ci"), n),
    ]
    at_init = (null or {}).get("nc")
    if at_init:
        contrast = _check("NC1 vs init", null["ratio"].get("nc1"), t.max_nc_init_ratio, False,
                          f"NC1 ÷ its value at random init ({at_init['nc1']:.3g})", null["ratio_ci"].get("nc1"), n)
        checks.append(contrast)
        if contrast["passed"] is False:
            return {"status": "absent", "checks": checks,
                    "reason": f"NC1 is {contrast['value']:.3g}× its value at random init: the collapse does not stand "
                              f"out from the untrained architecture (needs ≤ {t.max_nc_init_ratio:g}×)"}
    out = {"status": _overall(checks), "checks": checks}
    total = nc["classifier_classes"]
    if nc["classes_dropped"] or (total and nc["classes"] < total):
        out["scope"] = (f"measured on {nc['classes']}" + (f" of the classifier's {total}" if total else "")
                        + f" classes ({nc['samples']} samples)"
                        + (f"; {nc['classes_dropped']} class(es) with one sample left out" if nc["classes_dropped"] else ""))
    return out
