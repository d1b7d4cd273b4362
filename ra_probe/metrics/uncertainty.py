"""Confidence intervals of per-sample means and of what is computed from them: a seeded bootstrap over the
samples already measured (no Jacobian is computed again), stratified by class so that every resample holds
each class as often as the data does. One set of resamples serves every quantity of a probe, so intervals
of quantities computed from the same samples (a score and its ratio to the init's) are drawn jointly."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

METHOD = ("percentile bootstrap over samples, resampled within each class (labels, or the model's predictions "
          "without labels); every quantity computed anew on each resample from its per-sample values")


@dataclass(frozen=True)
class Resamples:
    """`index` (R, N): R resamples of N samples, each row drawn with replacement within each stratum;
    `level`: the two-sided confidence level of the intervals."""

    index: torch.Tensor
    level: float
    stratified: bool

    @property
    def samples(self) -> int:
        return self.index.shape[1]

    def means(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over each resample of per-sample `values` (N, …) → (R, …), NaN (an undefined sample)
        left out; NaN where a resample has no defined value."""
        return values[self.index].nanmean(dim=1)

    def medians(self, values: torch.Tensor) -> torch.Tensor:
        """The lower median over each resample of `values` (N,) → (R,), as torch.median takes it."""
        return values[self.index].median(dim=1).values


def resamples(n: int, strata: torch.Tensor | None, count: int, level: float, seed: int) -> Resamples | None:
    """`count` bootstrap resamples of `n` samples under `seed`, within each stratum (`strata` (n,): a class
    per sample, or None); None for fewer than two samples (one sample says nothing of its spread). A
    stratum of one sample would stand for itself in every resample, as if it had no spread: when a
    class has a single sample, the resamples are drawn from all samples alike."""
    if n < 2:
        return None
    generator = torch.Generator().manual_seed(seed)
    if strata is not None and bool((torch.unique(strata, return_counts=True)[1] < 2).any()):
        strata = None
    if strata is None:
        return Resamples(torch.randint(0, n, (count, n), generator=generator), level, False)
    index = torch.empty(count, n, dtype=torch.long)
    for stratum in torch.unique(strata):
        members = torch.nonzero(strata == stratum).flatten()
        draws = torch.randint(0, len(members), (count, len(members)), generator=generator)
        index[:, members] = members[draws]
    return Resamples(index, level, True)


def interval(replicates: torch.Tensor, level: float) -> list | None:
    """The percentile interval [low, high] of `replicates` (R, …) at `level`, as plain floats (lists for
    more dimensions); None when a resample has no value (NaN), for then the spread is not known."""
    if replicates.isnan().any():
        return None
    tail = (1.0 - level) / 2.0
    bounds = torch.quantile(replicates.double(), torch.tensor([tail, 1.0 - tail], dtype=torch.float64), dim=0)
    return bounds.tolist()


def ratio_interval(top: torch.Tensor | None, bottom: torch.Tensor | None, level: float) -> list | None:
    """The interval of a ratio from the replicates of its numerator and denominator (each of its own
    resamples, paired in order); None without both, or when a denominator replicate is zero."""
    if top is None or bottom is None or bool((bottom == 0).any()):
        return None
    return interval(top / bottom, level)


def samples_to_decide(value: float, bounds: list[float], threshold: float, samples: int) -> int | None:
    """About how many samples would put an interval like `bounds` around `value` clear of `threshold`, its
    width shrinking as 1/√N; None when the value sits on the threshold."""
    distance = abs(value - threshold)
    half_width = max(value - bounds[0], bounds[1] - value)
    if distance == 0 or not math.isfinite(half_width):
        return None
    return max(samples + 1, math.ceil(samples * (half_width / distance) ** 2))
