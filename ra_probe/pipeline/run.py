"""One probe from start to end: model prepared, labels checked, sites discovered, measured chunk by
chunk, summarized, compared with the same architecture at random init, and judged. Returns plain data;
the report stage turns it into the report."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch

from ra_probe.host import probe_threads, torch_threads
from ra_probe.load.data import check_labels
from ra_probe.load.models import LoadedModel, freeze
from ra_probe.load.reinit import random_init
from ra_probe.load.samples import Samples, take
from ra_probe.metrics.uncertainty import interval
from ra_probe.metrics.verdict import HEADLINE, SYNTHETIC_CAVEAT, headline, nc_verdict, null_ratios, ra_verdict
from ra_probe.pipeline.cache import ResultCache
from ra_probe.pipeline.measure import Measured, measure
from ra_probe.pipeline.prepare import dispatched, prepared
from ra_probe.pipeline.settings import Progress, Settings
from ra_probe.pipeline.summarize import NC_VALUES, Summary, collapse, summarize
from ra_probe.sites.discover import discover, output_classes
from ra_probe.sites.records import SiteReport

NULL_SEED_OFFSET = 1  # the null is drawn under seed + 1: another draw than a --no-pretrained model's own


@dataclass
class Outcome:
    """What a probe found: the sites, the measurements, the metrics and the verdicts."""

    site_report: SiteReport
    measured: Measured
    sites: dict[str, dict[str, Any]]  # by site name: its spectrum, residual, solver, timing (`Summary.sites`)
    metrics: dict[str, Any]
    verdict: dict[str, Any]
    seconds: float
    threads: int  # torch CPU threads it ran with
    null_cost: dict[str, float] = dataclasses.field(default_factory=lambda: {"seconds": 0.0, "products": 0})


def run(loaded: LoadedModel, samples: Samples, settings: Settings, progress: Progress | None = None,
        cache: ResultCache | None = None) -> Outcome:
    """Probe `loaded` on `samples`, and (unless `settings.null` is "none") its architecture at a seeded
    random init on the first of them. With a `cache`, group measurements already stored are reused and
    new ones are stored. torch runs `host.probe_threads(settings.threads)` CPU threads meanwhile. The
    caller's model and global torch state (RNG, TF32 flags, threads) are left as they were."""
    started = time.perf_counter()
    threads = probe_threads(settings.threads)
    with torch_threads(threads):
        site_report, measured, summary = _probe_module(loaded, samples, settings, progress, cache, check=True)
        metrics = summary.metrics
        cost, null_replicates = {"seconds": 0.0, "products": 0}, {}
        if not site_report.sites:
            metrics["null"] = {"status": "off", "reason": "no residual site to compare with a random init"}
        else:
            metrics["null"], cost, null_replicates = _null(loaded, samples, settings, progress, cache)
    if metrics["null"]["status"] == "measured":
        metrics["null"]["ratio"] = null_ratios(metrics, metrics["null"])
        metrics["null"]["ratio_ci"] = _ratio_intervals(summary.replicates, null_replicates, settings.confidence)
        _collapse_ratio(metrics, summary.replicates, null_replicates, settings.confidence)
    verdict = {"ra": ra_verdict(metrics, settings.thresholds, len(site_report.skipped)),
               "nc": nc_verdict(metrics["nc"], settings.thresholds, metrics["null"])}
    if samples.synthetic:
        for evidence in verdict.values():
            evidence["caveat"] = SYNTHETIC_CAVEAT
    return Outcome(site_report, measured, summary.sites, metrics, verdict, time.perf_counter() - started, threads,
                   cost)


def _probe_module(loaded: LoadedModel, samples: Samples, settings: Settings, progress: Progress | None,
                  cache: ResultCache | None, check: bool = False) -> tuple[SiteReport, Measured, Summary]:
    """Sites discovered on `loaded`'s module, measured and summarized (`check`: labels checked first)."""
    device, dtype = settings.resolved_device(), settings.resolved_dtype()
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []), \
            prepared(loaded.module, settings) as model:
        torch.manual_seed(settings.seed)  # a model that draws random numbers draws the same ones each run
        if check:
            check_labels(samples, loaded.num_classes or output_classes(model, samples, device, dtype))
        site_report = discover(model, samples, device, dtype, settings.sites)
        run_cache = cache.for_run(model, loaded.name, settings, site_report.adapter) if cache is not None else None
        measured = measure(model, site_report.sites, samples, settings, progress, run_cache)
        summary = summarize(site_report.sites, measured, loaded, settings, samples.labels)
    return site_report, measured, summary


def _null(loaded: LoadedModel, samples: Samples, settings: Settings, progress: Progress | None,
          cache: ResultCache | None) -> tuple[dict[str, Any], dict[str, float], dict]:
    """The RA headline metrics of the architecture at random init, on the first `null_samples` samples,
    or why there are none; what measuring them cost (seconds, products); and their bootstrap replicates."""
    none = {"seconds": 0.0, "products": 0}
    if settings.null == "none":
        return {"status": "off", "reason": "--null none: the verdict has no control"}, none, {}
    if dispatched(loaded.module):
        return {"status": "unavailable", "reason": "a model split across devices (device_map) is not rebuilt at "
                                                  "random init: it would need its memory twice"}, none, {}
    seed = settings.seed + NULL_SEED_OFFSET
    init = random_init(loaded.builder, loaded.module, seed)
    if init.module is None:
        return {"status": "unavailable", "reason": init.how, "seed": seed}, none, {}
    freeze(init.module)
    n = min(settings.null_samples, len(samples))
    subset = Samples(take(samples.inputs, slice(n)), None, samples.name)
    null_settings = dataclasses.replace(settings, samples=n, null="none")
    null_loaded = dataclasses.replace(loaded, module=init.module, name=f"{loaded.name} at random init")
    tick = time.perf_counter()
    say = (lambda what, done, total: progress(f"random init: {what}", done, total)) if progress else None
    site_report, measured, summary = _probe_module(null_loaded, subset, null_settings, say, cache)
    nc, nc_replicates = _collapse_at_init(init.module, samples, settings)
    timings = [measured.timing(s.name) for s in site_report.sites]
    cost = {"seconds": time.perf_counter() - tick, "products": sum(t["products"] + t["align_products"] for t in timings)}
    return {"status": "measured", "init": init.how, "seed": seed, "samples": n, "sites": len(site_report.sites),
            **headline(summary.metrics), "nc": nc}, cost, {**summary.replicates, **nc_replicates}


def _collapse_at_init(module: torch.nn.Module, samples: Samples, settings: Settings
                      ) -> tuple[dict[str, Any] | None, dict]:
    """NC of the random init on every sample of the probe (a forward each: no Jacobian), and its values
    on the bootstrap resamples; None when it has no classifier head or NC is undetermined."""
    device = settings.resolved_device()
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []), \
            prepared(module, settings) as model:
        torch.manual_seed(settings.seed)
        nc, replicates = collapse(module, measure(model, [], samples, settings), samples.labels, settings)
    if nc is None or nc["undetermined"]:
        return None, {}
    return {key: nc[key] for key in (*NC_VALUES, "nc1_ci", "classes", "samples")}, replicates


def _collapse_ratio(metrics: dict[str, Any], model: dict, at_init: dict, level: float) -> None:
    """NC1 over its value at random init on the same samples, with its interval (the two resampled
    independently), in the null's ratios."""
    nc, null = metrics["nc"], metrics["null"]
    if nc is None or nc["nc1"] is None or not null.get("nc") or not null["nc"]["nc1"]:
        return
    null["ratio"]["nc1"] = nc["nc1"] / null["nc"]["nc1"]
    top, bottom = model.get(("nc", "nc1")), at_init.get(("nc", "nc1"))
    null["ratio_ci"]["nc1"] = None if top is None or bottom is None or bool((bottom == 0).any()) \
        else interval(top / bottom, level)


def _ratio_intervals(model: dict, at_init: dict, level: float) -> dict[str, list[float] | None]:
    """The interval of each RA headline metric's ratio to its value at random init: the two measured on
    samples of their own, so a resample of each is drawn independently and the ratios taken pairwise."""
    out = {}
    for section, name in HEADLINE.items():
        top, bottom = model.get((section, name)), at_init.get((section, name))
        out[section] = None if top is None or bottom is None or bool((bottom == 0).any()) \
            else interval(top / bottom, level)
    return out
