"""One probe from start to end: model prepared, labels checked, sites discovered, measured chunk by
chunk, summarized and judged. Returns plain data; the report stage turns it into the report."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from ra_probe.host import probe_threads, torch_threads
from ra_probe.load.data import Samples, check_labels
from ra_probe.load.models import LoadedModel
from ra_probe.metrics.verdict import nc_verdict, ra_verdict
from ra_probe.pipeline.cache import ResultCache
from ra_probe.pipeline.discover import discover, output_classes
from ra_probe.pipeline.measure import Measured, measure
from ra_probe.pipeline.prepare import prepared
from ra_probe.pipeline.settings import Progress, Settings
from ra_probe.pipeline.summarize import summarize
from ra_probe.sites import SiteReport


@dataclass
class Outcome:
    """What a probe found: the sites, the measurements, the metrics and the verdicts."""

    site_report: SiteReport
    measured: Measured
    metrics: dict[str, Any]
    verdict: dict[str, Any]
    seconds: float
    threads: int  # torch CPU threads it ran with


def run(loaded: LoadedModel, samples: Samples, settings: Settings, progress: Progress | None = None,
        cache: ResultCache | None = None) -> Outcome:
    """Probe `loaded` on `samples`. With a `cache`, group measurements already stored are reused and new
    ones are stored. torch runs `host.probe_threads(settings.threads)` CPU threads meanwhile. The caller's
    model and global torch state (RNG, TF32 flags, threads) are left as they were."""
    started = time.perf_counter()
    device, threads = settings.resolved_device(), probe_threads(settings.threads)
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []), \
            torch_threads(threads), prepared(loaded.module, settings) as model:
        torch.manual_seed(settings.seed)  # a model that draws random numbers draws the same ones each run
        check_labels(samples, loaded.num_classes or output_classes(model, samples, settings))
        site_report = discover(model, samples, settings)
        run_cache = cache.for_run(model, loaded.name, settings, site_report.adapter) if cache is not None else None
        measured = measure(model, site_report.sites, samples, settings, progress, run_cache)
        metrics = summarize(site_report.sites, measured, loaded, settings, samples.labels)
    verdict = {"ra": ra_verdict(metrics, settings.thresholds, len(site_report.skipped)),
               "nc": nc_verdict(metrics["nc"], settings.thresholds)}
    return Outcome(site_report, measured, metrics, verdict, time.perf_counter() - started, threads)
