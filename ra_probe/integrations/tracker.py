"""Probing during training: the scalars a probe logs, one probe of the live network that leaves training
exactly as it was, and `Tracker`, the plain training loop's way to use them. The Lightning and Hugging
Face callbacks are thin schedules around the same `LiveProbe` and `scalars`."""
from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ra_probe.api import Report, probe, settings_from
from ra_probe.load.inputs import as_loaded, as_samples
from ra_probe.report.headline import HEADLINE, headline, intervals
from ra_probe.report.view import view_of

# Cheap enough to run every epoch on small models (about 0.4 s per probe on the bundled FC ResNet, width
# 128 and 8 blocks, one CPU thread): k = 16 still determines RA3 ranks up to 15 classes, and RA2 aligns the
# top 8 singular vectors.
# No random-init control: the first probe, before training starts, is the network's own init.
DEFAULTS: dict[str, Any] = {"samples": "auto", "max_samples": 64, "k": 16, "align_k": 8, "null": "none"}
STATUS = {"absent": 0.0, "partial": 0.5, "present": 1.0}  # not_applicable: not logged

Metrics = dict[str, float]
ModelPicker = str | Callable[[Any], nn.Module] | None


def scalars(report: Report) -> Metrics:
    """The numbers logged for a report: its headline numbers (`ra_probe.report.headline`) named
    `ra/<name>` and `nc/<name>` — `ra/alignment` RA2 mean alignment score a_ij, `ra/linearity` RA1 mean
    trajectory linearity, `ra/median_rank` RA3 median over sites of each site's median rank,
    `ra/mean_sigma1` RA4 mean over sites of the top singular value and `ra/L_times_mean_sigma1` its
    sum, `nc/nc1` … `nc/nc4` — with `<name>_low` and `<name>_high`, the bounds of each one's confidence
    interval, and `ra/verdict` and `nc/verdict` as absent 0, partial 0.5, present 1 (undetermined: not logged).
    A number the probe could not determine (a rank that reaches k, no classifier head) is left out."""
    view = view_of(report)
    values = {f"{HEADLINE[name].family}/{name}": value for name, value in headline(view).items()}
    for name, bounds in intervals(view).items():  # the confidence interval, as two curves beside the value
        if bounds is not None:
            values.update({f"{HEADLINE[name].family}/{name}_low": bounds[0], f"{HEADLINE[name].family}/{name}_high": bounds[1]})
    values.update({"ra/verdict": STATUS.get(view.status("ra")), "nc/verdict": STATUS.get(view.status("nc"))})
    return {name: float(value) for name, value in values.items() if value is not None}


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Every random state training may draw from (torch CPU and CUDA, Python `random`, NumPy's global
    state) as it was on entry, whatever the block draws."""
    python, numpy = random.getstate(), np.random.get_state()
    cuda = torch.cuda.device_count() if torch.cuda.is_initialized() else 0
    with torch.random.fork_rng(devices=range(cuda)):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


class LiveProbe:
    """One probe of a network while it trains, on its live weights (never copied): modes, grad flags,
    BatchNorm running statistics and every random state are left as they were, so training goes on
    exactly as it would have without the probe. The samples are taken from `data` at the first probe and
    reused, so every probe of a run measures the same samples. `model` picks the network out of what
    is passed to the call: None for the object itself, an attribute path ("net", "model.backbone"), or a
    callable(owner). Settings are `ra_probe.probe`'s, over `DEFAULTS`; as there, the device defaults to
    the network's own."""

    def __init__(self, data: Any, model: ModelPicker = None, **settings: Any):
        self.data, self.model = data, model
        self.settings = settings_from({**DEFAULTS, **settings})
        self.samples = None

    def network(self, owner: Any) -> nn.Module:
        if self.model is None:
            return owner
        if callable(self.model):
            return self.model(owner)
        for name in self.model.split("."):
            owner = getattr(owner, name)
        return owner

    def __call__(self, owner: Any) -> tuple[Report, Metrics]:
        """Probe the network of `owner`: its Report and its `scalars`, with `ra/probe_seconds`."""
        started = time.perf_counter()
        module = self.network(owner)
        with preserved_rng():
            if self.samples is None:
                self.samples = as_samples(self.data, as_loaded(module), limit=self.settings.sample_limit,
                                          seed=self.settings.seed)
            report = probe(module, self.samples, self.settings)
        metrics = scalars(report)
        metrics["ra/probe_seconds"] = time.perf_counter() - started
        return report, metrics


def save_report(report: Report, folder: str | Path, step: int) -> Path:
    """Write `report` as `folder/step-<step>.json` (replacing one of an earlier run)."""
    path = Path(folder) / f"step-{step:08d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    report.to_json(path, force=True)
    return path


class Tracker:
    """RA and NC of a network during a plain training loop:

        tracker = ra_probe.Tracker(model, (x_val, y_val), log=lambda metrics, step: print(step, metrics))
        for step in ...:
            ...                        # train
            if step % 100 == 0:
                tracker.step(step)     # probe now

    `tracker.step(step)` probes `model` on `data` (the same samples every time), returns the metrics
    (the names of `scalars`, and `ra/probe_seconds`), appends `{"step": step, **metrics}` to
    `tracker.history`, keeps the Report as `tracker.report`, and calls `log(metrics, step)` when given.
    Training is left exactly as it was (see `LiveProbe`). Settings are `ra_probe.probe`'s, over
    `DEFAULTS` (samples="auto" up to max_samples=64, k=16, align_k=8)."""

    def __init__(self, model: nn.Module, data: Any, log: Callable[[Metrics, int], Any] | None = None,
                 **settings: Any):
        self.model, self.log = model, log
        self.live = LiveProbe(data, **settings)
        self.history: list[dict[str, float]] = []
        self.report: Report | None = None

    def step(self, step: int | None = None) -> Metrics:
        step = len(self.history) if step is None else step
        self.report, metrics = self.live(self.model)
        self.history.append({"step": step, **metrics})
        if self.log is not None:
            self.log(dict(metrics), step)
        return metrics
