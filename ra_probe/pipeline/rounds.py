"""`--samples auto`: the samples in a seeded, class-balanced order, their Jacobians measured in rounds,
and when the rounds stop: once every RA check of the verdict is decided (its confidence interval clear
of its threshold), at the cap, or once the budget is spent; the null's once its contrast is decided."""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ra_probe.load.loaded import LoadedModel
from ra_probe.load.samples import Samples, take
from ra_probe.metrics.results import Sampling
from ra_probe.metrics.uncertainty import ratio_interval
from ra_probe.metrics.verdict import ra_verdict
from ra_probe.pipeline.measure import Measured
from ra_probe.pipeline.settings import Settings
from ra_probe.pipeline.summarize import Summary, summarize
from ra_probe.sites.records import SiteReport

Enough = Callable[[SiteReport, Measured, int], "str | None"]  # after a round: why to stop, or None


def rounds_of(settings: Settings, n: int, first: int = 8) -> list[int] | None:
    """The sample counts after each round of `--samples auto` (8, 16, 32… up to `n`), None for a fixed
    number of samples."""
    if settings.samples != "auto":
        return None
    out = [first]
    while out[-1] < n:
        out.append(out[-1] * 2)
    return [min(count, n) for count in out]


def balanced(samples: Samples, seed: int) -> Samples:
    """`samples` in a seeded order whose every prefix holds the classes as evenly as it can: each class
    shuffled, then one of each class in turn (no labels: one shuffle)."""
    generator = torch.Generator().manual_seed(seed)
    n = len(samples)
    if samples.labels is None:
        order = torch.randperm(n, generator=generator)
    else:
        queues = [members[torch.randperm(len(members), generator=generator)]
                  for members in (torch.nonzero(samples.labels == c).flatten() for c in samples.labels.unique())]
        order = torch.tensor([int(q[i]) for i in range(max(len(q) for q in queues)) for q in queues if i < len(q)])
    return dataclasses.replace(samples, inputs=take(samples.inputs, order),
                               labels=None if samples.labels is None else samples.labels[order])


@dataclass
class Stopping:
    """The stopping rules of the rounds of one probe: `model` for the model's (every RA check decided),
    `null` for its random init's (RA2's ratio to it decided, against the model's `measured` summary)."""

    loaded: LoadedModel
    labels: torch.Tensor | None
    settings: Settings
    started: float
    at_init: LoadedModel | None = None
    measured: Summary | None = None

    def spent(self) -> bool:
        return self.settings.budget is not None and time.perf_counter() - self.started > self.settings.budget

    def model(self, found: SiteReport, so_far: Measured, count: int) -> str | None:
        if self.spent():
            return "budget"
        summary = summarize(found.groups, so_far, self.loaded, self.settings, self.labels, collapse_too=False)
        checks = ra_verdict(summary.ra, summary.uncertainty.samples, self.settings.thresholds).checks
        return None if any(c.undetermined for c in checks) else "decided"

    def null(self, found: SiteReport, so_far: Measured, count: int) -> str | None:
        if self.spent():
            return "budget"
        at_init = summarize(found.groups, so_far, self.at_init, self.settings, None, collapse_too=False).replicates
        low, high = ratio_interval(self.measured.replicates.get("ra2"), at_init.get("ra2"),
                                   self.settings.confidence) or (None, None)
        limit = self.settings.thresholds.ra2_min_init_ratio
        return None if low is None or low < limit <= high else "decided"


def sampling_record(settings: Settings, available: int, rounds: list[int] | None, stopped: dict, null_stopped: dict,
                    null: bool) -> Sampling:
    """How many samples the Jacobians were measured on (the model's and the null's), and why no more."""
    if rounds is None:
        return Sampling("fixed", available, available)
    measured = stopped.get("measured", available)
    why = stopped.get("why") or ("max_samples" if available >= settings.max_samples else "data")
    out = Sampling("auto", available, measured, [r for r in rounds if r <= measured], why)
    if null:
        null_measured = null_stopped.get("measured")
        out = dataclasses.replace(out, null_measured=null_measured, null_stopped=null_stopped.get("why") or "null_samples",
                                  null_rounds=[r for r in rounds_of(settings, settings.null_samples, first=2) or ()
                                               if null_measured is not None and r <= null_measured])
    return out
