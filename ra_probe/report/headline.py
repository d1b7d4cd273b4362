"""A report's headline numbers under one set of names and labels: what the console, the HTML, the
gate, `compare`, sweeps and the training callbacks (as `ra/<name>` and `nc/<name>`) show, limit and
log, and the rows of the contrast with the random init. Names already in the report keep the report's
name (`median_rank`, `nc2_equiangular`…)."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ra_probe.metrics.ra import median_rank
from ra_probe.metrics.results import Interval
from ra_probe.report.view import ReportView, view_of


@dataclass(frozen=True)
class Metric:
    label: str  # how tables, figures and gate checks name it
    family: str  # "ra" or "nc": the prefix of its logged name
    read: Callable[[ReportView], float | None]
    # whether a gate's baseline holds it within the tolerance (not depth: the gate checks the sites
    # themselves; not the largest rank, which one site moves; not mean σ₁, as L·mean σ₁ is held)
    held: bool = True
    ci: Callable[[ReportView], Interval] | None = None  # its confidence interval; None: it has none
    at_init: str | None = None  # its section in the contrast with the random init ("ra1"…); None: not contrasted

    def value(self, report: Mapping[str, Any] | ReportView) -> float | None:
        """The metric in `report` (a dict or a view), or None where the report has none."""
        return self.read(view_of(report))

    def interval(self, report: Mapping[str, Any] | ReportView) -> Interval:
        """[low, high] of the metric in `report`, or None (no interval, or a report before schema 1.7)."""
        return None if self.ci is None else self.ci(view_of(report))


def _finite_mean(values: list[Any]) -> float | None:
    kept = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(kept) / len(kept) if kept else None


def _mean_rank(view: ReportView) -> float | None:
    """Mean over sites of the mean rank; undefined when any site's rank reaches k."""
    ranks = [s.rank_mean for s in view.ra.ra3.sites]
    return sum(ranks) / len(ranks) if ranks and None not in ranks else None


def _largest_rank(view: ReportView) -> float | None:
    """The largest site median rank; undefined when a site's rank reaches k (it has no known rank)."""
    ranks = [s.rank_median for s in view.ra.ra3.sites]
    return max(ranks) if ranks and None not in ranks else None


def _median_rank(view: ReportView) -> float | None:
    """Computed from the sites, so reports written before the field was added read the same."""
    return median_rank([dataclasses.asdict(s) for s in view.ra.ra3.sites], view.k)


# the labels of the NC values, the headline's and the one beside them (the weights' equinorm)
NC_LABELS = {"nc1": "NC1", "nc2_equinorm_means": "NC2 equinorm μ", "nc2_equinorm_weights": "NC2 equinorm w",
             "nc2_equiangular": "NC2 equiangular", "nc3": "NC3", "nc4": "NC4"}


def _nc(key: str) -> Metric:
    return Metric(NC_LABELS[key], "nc", lambda v: None if v.nc is None else getattr(v.nc, key),
                  ci=lambda v: None if v.nc is None else getattr(v.nc, f"{key}_ci"))


HEADLINE: dict[str, Metric] = {
    "depth": Metric("sites L", "ra", lambda v: v.ra.ra4.depth, held=False),
    "linearity": Metric("RA1 mean linearity", "ra", lambda v: v.ra.ra1.mean_linearity,
                        ci=lambda v: v.ra.ra1.mean_linearity_ci, at_init="ra1"),
    "alignment": Metric("RA2 mean alignment a_ij", "ra", lambda v: v.ra.ra2.mean_score,
                        ci=lambda v: v.ra.ra2.mean_score_ci, at_init="ra2"),
    "median_rank": Metric("RA3 median site rank", "ra", _median_rank, ci=lambda v: v.ra.ra3.median_rank_ci,
                          at_init="ra3"),
    "mean_rank": Metric("RA3 mean site rank", "ra", _mean_rank),
    "largest_rank": Metric("RA3 largest site rank", "ra", _largest_rank, held=False),
    "rank_share": Metric("RA3 share rank ≤ C", "ra", lambda v: v.ra.ra3.share_rank_le_classes,
                         ci=lambda v: v.ra.ra3.share_rank_le_classes_ci),
    "mean_sigma1": Metric("mean σ₁", "ra", lambda v: _finite_mean([s.sigma1_mean for s in v.ra.ra4.sites]),
                          held=False),
    "L_times_mean_sigma1": Metric("RA4 L·mean σ₁", "ra", lambda v: v.ra.ra4.L_times_mean_sigma1,
                                  ci=lambda v: v.ra.ra4.L_times_mean_sigma1_ci, at_init="ra4"),
    **{key: _nc(key) for key in ("nc1", "nc2_equinorm_means", "nc2_equiangular", "nc3", "nc4")},
}


def label(name: str) -> str:
    """How a headline number, or an NC value, is named wherever it is shown."""
    return HEADLINE[name].label if name in HEADLINE else NC_LABELS[name]


def headline(report: Mapping[str, Any] | ReportView) -> dict[str, float | None]:
    """The headline numbers of `report` by name; None where the report has no value (no sites, no
    classifier head, a rank that reaches k)."""
    view = view_of(report)
    return {name: metric.value(view) for name, metric in HEADLINE.items()}


def intervals(report: Mapping[str, Any] | ReportView) -> dict[str, Interval]:
    """The confidence interval [low, high] of each headline number that has one, by name (None: none)."""
    view = view_of(report)
    return {name: metric.interval(view) for name, metric in HEADLINE.items() if metric.ci is not None}


def contrasted(report: Mapping[str, Any] | ReportView) -> list[tuple[str, float | None, Interval, float | None,
                                                                    float | None, Interval]]:
    """The headline numbers contrasted with the random init: each one's label, value and interval, its
    value at random init, and their ratio with its interval (none unless the null was measured)."""
    view = view_of(report)
    null = view.null
    if not null.measured:
        return []
    at_init = dict(null.at_init.items())
    return [(metric.label, metric.value(view), metric.interval(view), at_init[metric.at_init],
             null.ratio.get(metric.at_init), (null.ratio_ci or {}).get(metric.at_init))
            for metric in HEADLINE.values() if metric.at_init]
