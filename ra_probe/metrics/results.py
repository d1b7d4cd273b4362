"""What a probe found, as frozen records: each site's spectrum, RA1–RA4 and the block coupling, NC,
how the intervals were made, the contrast with the same architecture at random init, and the
verdicts with their checks. The pipeline produces them; the report (`report/build.py`) is written from
them, and only there. Field names are the report's keys; an interval is [low, high], or None where the
number has none."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Interval = Sequence[float] | None
# a field with this metadata is left out of the report where it is None (it is said only when it applies)
OPTIONAL: Mapping[str, bool] = {"optional": True}


def optional() -> Any:
    return dataclasses.field(default=None, metadata=OPTIONAL)


@dataclass(frozen=True)
class SiteSpectrum:
    """A site's singular values over the samples: their mean, spread and interval (each k-long), the
    largest residual bound, the solver, the mean |⟨u_k, v_k⟩| (a square Jacobian) and the timing."""

    singular_values: Sequence[float]
    singular_values_std: Sequence[float]
    singular_values_ci: Sequence[Sequence[float]] | None
    max_residual: float
    method: str
    uv_overlap: Sequence[float] | None
    timing: Mapping[str, float]


@dataclass(frozen=True)
class Trajectories:
    """RA1 of a group: each trajectory statistic's mean and std over the samples (`ra.trajectory_stats`)."""

    group: int
    sites: Sequence[str]
    undefined_samples: int
    linearity: float
    linearity_std: float
    lss: float
    lss_std: float
    step_cv: float
    step_cv_std: float
    step_cos: float
    step_cos_std: float
    linearity_ci: Interval
    projection: Mapping[str, Any] | None  # the first samples' trajectories on two principal components


@dataclass(frozen=True)
class Alignment:
    """RA2 of a group: a_ij over the pairs measured (None: not measured), the group score, the K×K maps."""

    group: int
    sites: Sequence[str]
    score: float | None
    matrix: Sequence[Sequence[float | None]]
    pairs_measured: int
    pairs: int
    heatmaps: Mapping[str, Any]
    undefined_samples: int
    score_ci: Interval
    matrix_ci: Sequence[Sequence[Interval]] | None


@dataclass(frozen=True)
class SiteRank:
    """RA3 of a site (`ra.rank_summary`), with the mean gap σ_C/σ_C+1."""

    site: str
    rank_mean: float | None
    rank_std: float | None
    rank_median: float | None
    rank_at_least: int | None
    rank_saturated: bool
    rank_le_classes: bool | None
    undetermined: str | None
    gap_mean: float | None


@dataclass(frozen=True)
class SiteSigma:
    """RA4 of a site: σ₁'s mean and std over the samples, at its depth (1 = the first site)."""

    site: str
    depth: int
    sigma1_mean: float
    sigma1_std: float


@dataclass(frozen=True)
class Coupling:
    """Block coupling of a group for each K (by str(K)): c_ij and its mean over the pairs (None: K above
    the sites' triplets)."""

    group: int
    sites: Sequence[str]
    matrices: Mapping[str, Any]
    mean: Mapping[str, float | None]


@dataclass(frozen=True)
class RA1:
    """RA1 over the network: the mean of its groups' linearity."""

    groups: Sequence[Trajectories]
    mean_linearity: float | None
    mean_linearity_ci: Interval = None


@dataclass(frozen=True)
class RA2:
    """RA2 over the network: the mean of its groups' alignment scores, from the top K pairs."""

    groups: Sequence[Alignment]
    mean_score: float | None
    K: int
    mean_score_ci: Interval = None


@dataclass(frozen=True)
class RA3:
    """RA3 over the network: the ranks at τ; whether rank ≤ C is judged (fully-connected sites
    with a known rank), the share of such sites, and the median rank."""

    sites: Sequence[SiteRank]
    tau: float
    classes: int | None
    fully_connected: bool
    judged: bool
    undetermined: Sequence[str]
    share_rank_le_classes: float | None
    median_rank: float | None
    share_rank_le_classes_ci: Interval = None
    median_rank_ci: Interval = None


@dataclass(frozen=True)
class RA4:
    """RA4 over the network: σ₁ by depth, L·mean σ₁, and the sites whose branch is exactly zero."""

    sites: Sequence[SiteSigma]
    depth: int
    L_times_mean_sigma1: float | None
    zero_sites: Sequence[str]
    L_times_mean_sigma1_ci: Interval = None


@dataclass(frozen=True)
class CouplingResults:
    """Block coupling of every group, at each K."""

    K: Sequence[int]
    tokens: str
    groups: Sequence[Coupling]


@dataclass(frozen=True)
class RAHeadline:
    """The RA numbers a model is contrasted with its random init on, by section: RA1 mean linearity,
    RA2 mean alignment score, RA3 median rank, RA4 L·mean σ₁."""

    ra1: float | None
    ra2: float | None
    ra3: float | None
    ra4: float | None

    def items(self) -> list[tuple[str, float | None]]:
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)]


@dataclass(frozen=True)
class RAResults:
    """RA1–RA4 and the block coupling of one probe."""

    ra1: RA1
    ra2: RA2
    ra3: RA3
    ra4: RA4
    coupling: CouplingResults

    def headline(self) -> RAHeadline:
        """The RA headline numbers, None where undefined (NaN: every branch exactly zero)."""
        return RAHeadline(*(_finite(v) for v in (self.ra1.mean_linearity, self.ra2.mean_score,
                                                 self.ra3.median_rank, self.ra4.L_times_mean_sigma1)))

    def intervals(self) -> RAHeadline:
        """The headline numbers' intervals, by section (an interval in place of each number)."""
        return RAHeadline(self.ra1.mean_linearity_ci, self.ra2.mean_score_ci, self.ra3.median_rank_ci,
                          self.ra4.L_times_mean_sigma1_ci)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


NC_VALUES = ("nc1", "nc2_equinorm_means", "nc2_equinorm_weights", "nc2_equiangular", "nc3", "nc4")


@dataclass(frozen=True)
class NCResults:
    """NC1–NC4 on the classifier's features (`nc.neural_collapse`), where the labels came from, and
    each value's interval (`nc2_ci`: of NC2 as the verdict takes it, the larger of its two parts)."""

    classes: int
    samples: int
    classes_dropped: int
    samples_dropped: int
    classifier_classes: int | None
    subset: bool
    undetermined: str | None
    nc1: float | None
    nc2_equinorm_means: float | None
    nc2_equinorm_weights: float | None
    nc2_equiangular: float | None
    nc3: float | None
    nc4: float | None
    conventions: Any
    labels_from: str
    interval_note: str | None = optional()  # why there are no intervals
    nc1_ci: Interval = None
    nc2_equinorm_means_ci: Interval = None
    nc2_equinorm_weights_ci: Interval = None
    nc2_equiangular_ci: Interval = None
    nc3_ci: Interval = None
    nc4_ci: Interval = None
    nc2_ci: Interval = optional()

    @property
    def nc2(self) -> float | None:
        """NC2 as the verdict takes it: the larger of the means' equinorm and the equiangularity."""
        return None if self.nc2_equiangular is None else max(self.nc2_equinorm_means, self.nc2_equiangular)


@dataclass(frozen=True)
class Uncertainty:
    """How the intervals were made (`note`: why there are none)."""

    level: float
    resamples: int
    samples: int
    stratified: bool
    method: str
    note: str | None


@dataclass(frozen=True)
class Sampling:
    """How many samples the Jacobians were measured on, the model's and the null's, and why no more."""

    mode: str  # "fixed" or "auto"
    available: int
    measured: int
    rounds: Sequence[int] | None = optional()  # the sample counts after each round (auto)
    stopped: str = "fixed"  # why no more were measured
    null_measured: int | None = optional()
    null_stopped: str | None = optional()
    null_rounds: Sequence[int] | None = optional()


@dataclass(frozen=True)
class NullContrast:
    """The same architecture at random init: whether it was measured (`status` "measured", "off",
    "unavailable") and why not; how it was made; its RA headline and NC; and the model's ratio to it
    (by section, and "nc1"), each with its interval."""

    status: str
    reason: str | None = None
    init: str | None = None
    seed: int | None = None
    samples: int | None = None
    sites: int | None = None
    at_init: RAHeadline | None = None
    nc: NCResults | None = None  # on every sample of the probe
    ratio: Mapping[str, float | None] | None = None
    ratio_ci: Mapping[str, Interval] | None = None

    @property
    def measured(self) -> bool:
        return self.status == "measured"


@dataclass(frozen=True)
class Check:
    """One check of a verdict: a value against its threshold; `passed` None while undetermined."""

    name: str
    value: float | None
    ci: Interval
    threshold: float
    passed: bool | None
    rule: str
    undetermined: str | None = optional()
    samples_to_decide: int | None = optional()
    reason: str | None = optional()


@dataclass(frozen=True)
class Verdict:
    """A verdict (present / partial / absent / undetermined / not_applicable) with its evidence."""

    status: str
    checks: Sequence[Check]
    control: str | None = optional()  # what the model was compared with
    reason: str | None = optional()
    scope: str | None = optional()  # which classes NC was measured on, where not all
    caveat: str | None = optional()


@dataclass(frozen=True)
class Verdicts:
    ra: Verdict
    nc: Verdict


@dataclass(frozen=True)
class Results:
    """Everything a probe measured and judged: the report is written from this."""

    spectra: Mapping[str, SiteSpectrum]  # by site name
    ra: RAResults
    nc: NCResults | None
    uncertainty: Uncertainty
    sampling: Sampling
    null: NullContrast
    verdict: Verdicts
