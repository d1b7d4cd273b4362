"""A report's headline numbers under one set of names: what the gate limits and compares with a
baseline, what `compare` and sweeps show, and what the training callbacks log (as `ra/<name>` and
`nc/<name>`). Names already in the report keep the report's name (`median_rank`, `nc2_equiangular`…)."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ra_probe.metrics.ra import median_rank


@dataclass(frozen=True)
class Metric:
    label: str  # how tables and gate checks name it
    family: str  # "ra" or "nc": the prefix of its logged name
    value: Callable[[dict[str, Any]], float | None]
    # whether a gate's baseline holds it within the tolerance (not depth: the gate checks the sites
    # themselves; not the largest rank, which one site moves; not mean σ₁, as L·mean σ₁ is held)
    held: bool = True
    # where the report keeps its confidence interval: (section of metrics, field); None: it has none
    ci: tuple[str, str] | None = None

    def interval(self, report: dict[str, Any]) -> list[float] | None:
        """[low, high] of the metric in `report`, or None (no interval, or a report before schema 1.7)."""
        if self.ci is None:
            return None
        section = report["metrics"].get(self.ci[0]) or {}
        return section.get(self.ci[1])


def _finite_mean(values: list[Any]) -> float | None:
    kept = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(kept) / len(kept) if kept else None


def _mean_rank(report: dict) -> float | None:
    """Mean over sites of the mean rank; undefined when any site's rank reaches k."""
    ranks = [s["rank_mean"] for s in report["metrics"]["ra3"]["sites"]]
    return sum(ranks) / len(ranks) if ranks and None not in ranks else None


def _largest_rank(report: dict) -> float | None:
    """The largest site median rank; undefined when a site's rank reaches k (it has no known rank)."""
    ranks = [s["rank_median"] for s in report["metrics"]["ra3"]["sites"]]
    return max(ranks) if ranks and None not in ranks else None


def _nc(key: str) -> Metric:
    labels = {"nc2_equinorm_means": "NC2 equinorm μ", "nc2_equiangular": "NC2 equiangular"}
    return Metric(labels.get(key, key.upper()), "nc", lambda r: (r["metrics"]["nc"] or {}).get(key), ci=("nc", f"{key}_ci"))


HEADLINE: dict[str, Metric] = {
    "depth": Metric("sites L", "ra", lambda r: r["metrics"]["ra4"]["depth"], held=False),
    "linearity": Metric("RA1 mean linearity", "ra", lambda r: r["metrics"]["ra1"]["mean_linearity"],
                        ci=("ra1", "mean_linearity_ci")),
    "alignment": Metric("RA2 mean alignment a_ij", "ra", lambda r: r["metrics"]["ra2"]["mean_score"],
                        ci=("ra2", "mean_score_ci")),
    # computed from the sites, so reports written before the field was added read the same
    "median_rank": Metric("RA3 median site rank", "ra",
                          lambda r: median_rank(r["metrics"]["ra3"]["sites"], r["settings"]["k"]),
                          ci=("ra3", "median_rank_ci")),
    "mean_rank": Metric("RA3 mean site rank", "ra", _mean_rank),
    "largest_rank": Metric("RA3 largest site rank", "ra", _largest_rank, held=False),
    "rank_share": Metric("RA3 share rank ≤ C", "ra", lambda r: r["metrics"]["ra3"]["share_rank_le_classes"],
                         ci=("ra3", "share_rank_le_classes_ci")),
    "mean_sigma1": Metric("mean σ₁", "ra",
                          lambda r: _finite_mean([s["sigma1_mean"] for s in r["metrics"]["ra4"]["sites"]]),
                          held=False),
    "L_times_mean_sigma1": Metric("RA4 L·mean σ₁", "ra", lambda r: r["metrics"]["ra4"]["L_times_mean_sigma1"],
                                  ci=("ra4", "L_times_mean_sigma1_ci")),
    **{key: _nc(key) for key in ("nc1", "nc2_equinorm_means", "nc2_equiangular", "nc3", "nc4")},
}


def headline(report: dict[str, Any]) -> dict[str, float | None]:
    """The headline numbers of `report` by name; None where the report has no value (no sites, no
    classifier head, a rank that reaches k)."""
    return {name: metric.value(report) for name, metric in HEADLINE.items()}


def intervals(report: dict[str, Any]) -> dict[str, list[float] | None]:
    """The confidence interval [low, high] of each headline number that has one, by name (None: none)."""
    return {name: metric.interval(report) for name, metric in HEADLINE.items() if metric.ci is not None}
