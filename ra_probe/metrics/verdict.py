"""Verdicts: RA and NC present / partial / absent / not_applicable, with the evidence and
the thresholds used. All thresholds are settings."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Thresholds:
    min_alignment: float = 0.5  # RA2: mean group score a_ij
    min_linearity: float = 0.9  # RA1: mean linearity of groups with ≥ 2 sites
    rank_share: float = 0.5  # RA3 (fully-connected nets): share of sites with rank ≤ C
    max_nc1: float = 0.5
    max_nc2: float = 0.3  # equinorm of class means and equiangularity
    max_nc3: float = 0.5
    max_nc4: float = 0.05

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _check(name: str, value: float | None, limit: float, at_least: bool, what: str) -> dict[str, Any]:
    if value is not None and not math.isfinite(value):
        value = None  # undefined (e.g. every branch exactly zero): no evidence either way
    passed = None if value is None else (value >= limit if at_least else value <= limit)
    sign = "≥" if at_least else "≤"
    return {"name": name, "value": value, "threshold": limit, "passed": passed,
            "rule": f"{what} {sign} {limit:g}"}


def _overall(checks: list[dict[str, Any]]) -> str:
    judged = [c["passed"] for c in checks if c["passed"] is not None]
    if not judged:
        return "not_applicable"
    if all(judged):
        return "present"
    return "partial" if any(judged) else "absent"


def no_sites_message(skipped: int) -> str:
    """What a model without a usable site is told: none found, or found but every one skipped."""
    if not skipped:
        return "no residual connections found"
    return f"no usable residual site: {skipped} residual add(s) found but skipped (see the skipped sites and why)"


def ra_verdict(metrics: dict[str, Any], t: Thresholds, skipped: int = 0) -> dict[str, Any]:
    """RA from RA1–RA3 (`skipped`: residual adds found but not usable, for the reason given when no
    site was measured)."""
    if not metrics["ra2"]["groups"] and not metrics["ra3"]["sites"]:
        return {"status": "not_applicable", "checks": [], "reason": no_sites_message(skipped)}
    checks = [
        _check("RA1", metrics["ra1"]["mean_linearity"], t.min_linearity, True, "mean trajectory linearity"),
        _check("RA2", metrics["ra2"]["mean_score"], t.min_alignment, True, "mean alignment score a_ij"),
    ]
    ra3 = metrics["ra3"]
    if ra3["judged"] or (ra3["fully_connected"] and ra3["undetermined"]):
        # sites whose rank is undetermined (it reaches k ≤ C) do not count; none judged: no evidence
        rule = "share of sites with rank ≤ C" + (f" ({'; '.join(ra3['undetermined'])})" if ra3["undetermined"] else "")
        checks.append(_check("RA3", ra3["share_rank_le_classes"], t.rank_share, True, rule))
    if all(s["sigma1_mean"] == 0 for s in metrics["ra4"]["sites"]):
        return {"status": "not_applicable", "checks": checks,
                "reason": "every residual branch is exactly zero (σ₁ = 0): nothing to align"}
    return {"status": _overall(checks), "checks": checks}


def nc_verdict(nc: dict[str, Any] | None, t: Thresholds) -> dict[str, Any]:
    if nc is None:
        return {"status": "not_applicable", "checks": [], "reason": "no linear classifier head found"}
    if nc["classes"] < 2:  # one class has no between-class structure: NC1–NC4 say nothing
        return {"status": "not_applicable", "checks": [],
                "reason": f"the samples fall in {nc['classes']} class: NC needs at least 2"}
    equinorm = nc["nc2_equinorm_means"]
    angle = nc["nc2_equiangular"]
    nc2 = None if angle is None else max(equinorm, angle)
    checks = [
        _check("NC1", nc["nc1"], t.max_nc1, False, "Tr(Σ_W Σ_B†)/C"),
        _check("NC2", nc2, t.max_nc2, False, "max(equinorm CV, equiangularity)"),
        _check("NC3", nc["nc3"], t.max_nc3, False, "self-duality distance"),
        _check("NC4", nc["nc4"], t.max_nc4, False, "mismatch with nearest class mean"),
    ]
    return {"status": _overall(checks), "checks": checks}
