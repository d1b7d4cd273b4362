"""Verdicts: RA and NC present / partial / absent / not_applicable, with the evidence and
the thresholds used. All thresholds are settings."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from ra_probe.metrics.results import (
    Check,
    Interval,
    NCResults,
    NullContrast,
    RAHeadline,
    RAResults,
    Verdict,
)
from ra_probe.metrics.uncertainty import samples_to_decide


@dataclass
class Thresholds:
    ra1_min: float = 0.9  # RA1: mean linearity of groups with ≥ 2 sites
    ra2_min: float = 0.5  # RA2: mean group score a_ij
    ra2_min_init_ratio: float = 4.0  # RA2 over its value for the same architecture at random init
    ra3_min_rank_share: float = 0.5  # RA3 (fully-connected nets): share of sites with rank ≤ C
    nc1_max: float = 0.5
    nc1_max_init_ratio: float = 0.25  # NC1 over its value for the same architecture at random init
    nc2_max: float = 0.3  # equinorm of class means and equiangularity
    nc3_max: float = 0.5
    nc4_max: float = 0.05

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


# said in every verdict made on synthetic samples (`--data synthetic`)
SYNTHETIC_CAVEAT = ("synthetic inputs (random, not data): a smoke test of the model, not a diagnosis; "
                    "pass --data for one")


def _check(name: str, value: float | None, limit: float, at_least: bool, what: str,
           ci: Interval = None, samples: int | None = None) -> Check:
    """A verdict check of `value` against `limit`. With its confidence interval `ci` from `samples`
    samples, it passes or fails only when the interval is clear of the limit; otherwise it is
    undetermined (passed None), with about how many samples would decide it. Without an interval
    (`samples` < 2) a value decides nothing."""
    if value is not None and not math.isfinite(value):
        value = None  # undefined (e.g. every branch exactly zero): no evidence either way
    sign = "≥" if at_least else "≤"
    check = Check(name, value, ci, limit, None, f"{what} {sign} {limit:g}")
    if value is None:
        return check
    if samples is not None and samples < 2:
        return replace(check, undetermined="one sample: no interval, so nothing is decided (measure more samples)")
    low, high = ci if ci is not None else (value, value)
    passes, fails = (low >= limit, high < limit) if at_least else (high <= limit, low > limit)
    if passes or fails:
        return replace(check, passed=bool(passes))
    return replace(check, undetermined=f"its interval [{low:.3g}, {high:.3g}] holds the threshold {limit:g}",
                   samples_to_decide=None if samples is None else samples_to_decide(value, ci, limit, samples))


def _overall(checks: Sequence[Check]) -> str:
    """present: every check decided and passed; absent: every one failed; partial: some of each; while a
    check is undetermined and could still turn the verdict, undetermined; no check with a value:
    not_applicable."""
    judged = [c.passed for c in checks if c.passed is not None]
    open_checks = any(c.undetermined for c in checks)
    if judged and any(judged) and not all(judged):
        return "partial"
    if open_checks:
        return "undetermined"
    if not judged:
        return "not_applicable"
    return "present" if all(judged) else "absent"


def null_ratios(model: RAHeadline, at_init: RAHeadline) -> dict[str, float | None]:
    """Each RA headline number over its value at random init, by section (None where either is
    undefined or the init's is zero)."""
    out = {}
    for (section, value), (_, init_value) in zip(model.items(), at_init.items()):
        value = _finite(value)
        out[section] = value / init_value if value is not None and init_value else None
    return out


def _finite(value: Any) -> float | None:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def no_sites_message(skipped: int) -> str:
    """What a model without a usable site is told: none found, or found but every one skipped."""
    if not skipped:
        return "no residual connections found"
    return f"no usable residual site: {skipped} residual add(s) found but skipped (see the skipped sites and why)"


NO_NULL = NullContrast("off", "no null model")


def ra_verdict(ra: RAResults, samples: int | None, t: Thresholds, null: NullContrast = NO_NULL,
               skipped: int = 0) -> Verdict:
    """RA from RA1–RA3 over `samples` samples and, when the architecture was measured at random init
    (`null`), RA2's contrast with it: a model whose alignment does not stand out from its own init is
    judged absent, whatever the fixed thresholds say. `skipped`: residual adds found but not usable,
    for the reason given when no site was measured."""
    control = _control(null)
    if not ra.ra2.groups and not ra.ra3.sites:
        return Verdict("not_applicable", [], control, no_sites_message(skipped))
    n = samples
    ra2 = _check("RA2", ra.ra2.mean_score, t.ra2_min, True, "mean alignment score a_ij", ra.ra2.mean_score_ci, n)
    if not ra.ra2.groups:
        ra2 = replace(ra2, reason="no group has two sites: alignment needs a pair of sites")
    checks = [_check("RA1", ra.ra1.mean_linearity, t.ra1_min, True, "mean trajectory linearity",
                     ra.ra1.mean_linearity_ci, n), ra2]
    ra3 = ra.ra3
    if ra3.judged or (ra3.fully_connected and ra3.undetermined):
        # sites whose rank is undetermined (it reaches k ≤ C) do not count; none judged: no evidence
        rule = "share of sites with rank ≤ C" + (f" ({'; '.join(ra3.undetermined)})" if ra3.undetermined else "")
        checks.append(_check("RA3", ra3.share_rank_le_classes, t.ra3_min_rank_share, True, rule,
                             ra3.share_rank_le_classes_ci, n))
    if null.measured:
        at_init = null.at_init.ra2
        contrast = _check("RA2 vs init", null.ratio["ra2"], t.ra2_min_init_ratio, True,
                          f"a_ij ÷ its value at random init ({at_init:.3g})" if at_init else "a_ij ÷ its value at random init",
                          null.ratio_ci.get("ra2"), min(n, null.samples) if n else None)
        if contrast.value is None:
            contrast = replace(contrast, reason="RA2 is undefined for the model or its random init")
        checks.append(contrast)
    if all(s.sigma1_mean == 0 for s in ra.ra4.sites):
        return Verdict("not_applicable", checks, control,
                       "every residual branch is exactly zero (σ₁ = 0): nothing to align")
    if checks[-1].name == "RA2 vs init" and checks[-1].passed is False:
        return Verdict("absent", checks, control,
                       f"RA2 is {checks[-1].value:.3g}× its value at random init: the alignment does not stand "
                       f"out from the untrained architecture (needs ≥ {t.ra2_min_init_ratio:g}×)")
    return Verdict(_overall(checks), checks, control)


def _control(null: NullContrast) -> str:
    """What the verdict was compared with, in words."""
    if not null.measured:
        return f"none: {null.reason}"
    return f"the same architecture at random init ({null.init}, seed {null.seed}, {null.samples} samples)"


def nc_verdict(nc: NCResults | None, t: Thresholds, null: NullContrast = NO_NULL) -> Verdict:
    """NC from NC1–NC4 and, when the architecture's collapse at random init was measured on the same
    samples (`null.nc`), NC1's contrast with it: a network whose features are no more collapsed than
    its own init's is judged absent, whatever the fixed thresholds say (a random init can pass NC2)."""
    if nc is None:
        return Verdict("not_applicable", [], reason="no linear classifier head found")
    if nc.undetermined:  # too few samples (per class): the values would carry no information, or mislead
        return Verdict("undetermined", [], reason=nc.undetermined)
    n = None if nc.interval_note else nc.samples  # next tokens: no interval, decided on the values
    checks = [
        _check("NC1", nc.nc1, t.nc1_max, False, "Tr(Σ_W Σ_B†)/C", nc.nc1_ci, n),
        _check("NC2", nc.nc2, t.nc2_max, False, "max(equinorm CV, equiangularity)", nc.nc2_ci, n),
        _check("NC3", nc.nc3, t.nc3_max, False, "self-duality distance", nc.nc3_ci, n),
        _check("NC4", nc.nc4, t.nc4_max, False, "mismatch with nearest class mean", nc.nc4_ci, n),
    ]
    at_init = null.nc if null.measured else None
    if at_init:
        contrast = _check("NC1 vs init", null.ratio.get("nc1"), t.nc1_max_init_ratio, False,
                          f"NC1 ÷ its value at random init ({at_init.nc1:.3g})", null.ratio_ci.get("nc1"), n)
        checks.append(contrast)
        if contrast.passed is False:
            return Verdict("absent", checks,
                           reason=f"NC1 is {contrast.value:.3g}× its value at random init: the collapse does not stand "
                                  f"out from the untrained architecture (needs ≤ {t.nc1_max_init_ratio:g}×)")
    total = nc.classifier_classes
    scope = None
    if nc.classes_dropped or (total and nc.classes < total):
        scope = (f"measured on {nc.classes}" + (f" of the classifier's {total}" if total else "")
                 + f" classes ({nc.samples} samples)"
                 + (f"; {nc.classes_dropped} class(es) with one sample left out" if nc.classes_dropped else ""))
    return Verdict(_overall(checks), checks, scope=scope)
