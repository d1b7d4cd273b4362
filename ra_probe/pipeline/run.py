"""One probe from start to end: model prepared, labels checked, sites discovered, measured chunk by
chunk, summarized, compared with the same architecture at random init, and judged, with its cost
predicted once the first samples are measured. Returns plain data; the report stage turns it into the
report."""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Generator
from contextlib import ExitStack, closing
from dataclasses import dataclass
from typing import Any

import torch

from ra_probe.host import memory_in_use, peak_memory, probe_threads, torch_threads
from ra_probe.load.data import check_labels
from ra_probe.load.loaded import LoadedModel, freeze
from ra_probe.load.reinit import random_init
from ra_probe.load.samples import Samples, first_tensor, real_tokens, take
from ra_probe.metrics.results import NCResults, NullContrast, Results, Verdicts
from ra_probe.metrics.uncertainty import ratio_interval
from ra_probe.metrics.verdict import SYNTHETIC_CAVEAT, nc_verdict, null_ratios, ra_verdict
from ra_probe.pipeline.cache import ResultCache
from ra_probe.pipeline.cost import Calibration, Prediction, bytes_as, peak_bytes, predict, products, shares
from ra_probe.pipeline.measure import ChunkCost, Measured, measure, measuring
from ra_probe.pipeline.prepare import dispatched, prepared
from ra_probe.pipeline.rounds import Enough, Stopping, balanced, rounds_of, sampling_record
from ra_probe.pipeline.settings import Note, Progress, Settings
from ra_probe.pipeline.summarize import Summary, collapse, summarize
from ra_probe.sites.discover import discover, output_classes
from ra_probe.sites.records import SiteReport

NULL_SEED_OFFSET = 1  # the null is drawn under seed + 1: another draw than a --no-pretrained model's own


@dataclass
class Outcome:
    """What a probe found: the sites, the measurements, and what they came to (the results and verdicts)."""

    site_report: SiteReport
    measured: Measured
    results: Results
    seconds: float
    threads: int  # torch CPU threads it ran with
    null_cost: dict[str, float] = dataclasses.field(default_factory=lambda: {"seconds": 0.0, "products": 0})
    prediction: Prediction | None = None  # the whole probe's cost, predicted after its first samples
    peak_bytes: int | None = None  # the peak memory measured on the probe's device
    peak_measured_as: str = ""  # how, or why it is unknown


def run(loaded: LoadedModel, samples: Samples, settings: Settings, progress: Progress | None = None,
        cache: ResultCache | None = None) -> Outcome:
    """Probe `loaded` on `samples`, and (unless `settings.null` is "none") its architecture at a seeded
    random init on the first of them. With a `cache`, group measurements already stored are reused and
    new ones are stored. torch runs `host.probe_threads(settings.threads)` CPU threads meanwhile. The
    caller's model and global torch state (RNG, TF32 flags, threads) are left as they were.

    The null's first sample is measured first, then the model's first sample: from them the whole
    probe's cost is predicted (`pipeline.cost`), shown through `progress` as a `Note`; then the rest of
    the model's samples, then the rest of the null's (each measurement's changes of the global torch
    state are undone in the reverse order they were made).

    `settings.samples` "auto": the Jacobians measured in rounds until the verdict's checks are decided
    (`pipeline.rounds`); NC on every sample. `metrics.sampling` says how many were measured and why."""
    started = time.perf_counter()
    threads = probe_threads(settings.threads)
    device, dtype = settings.resolved_device(), settings.resolved_dtype()
    in_use, peak_before, there = memory_in_use(device), peak_memory(device), bytes_as(loaded.module, device, dtype)
    null_cost, null_replicates = {"seconds": 0.0, "products": 0}, {}
    if settings.samples == "auto":
        samples = balanced(samples, settings.seed)
    rounds, stopped, null_stopped = rounds_of(settings, len(samples)), {}, {}
    stop = Stopping(loaded, samples.labels, settings, started)
    device_rng = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=device_rng), torch_threads(threads), ExitStack() as stages:
        if loaded.num_classes is not None:  # bad labels cost nothing: refused before anything is measured
            check_labels(samples, loaded.num_classes)
        tick = time.perf_counter()
        null_loaded, null_contrast = _null_module(loaded, settings)  # from the model as the caller holds it
        stop.at_init = null_loaded
        null, null_first, null_measured = None, None, None
        if null_loaded is not None:
            # the null's stage is entered first so that it is left last: each stage's changes of the global
            # torch state (TF32, attention kernels, RNG) are undone in the reverse order they were made
            n = min(settings.null_samples, len(samples))
            subset = Samples(take(samples.inputs, slice(n)), None, samples.name)
            null_settings = dataclasses.replace(settings, samples=n, null="none")
            say = (lambda what, done, total: progress(f"random init: {what}", done, total)) if progress else None
            null = stages.enter_context(closing(_stage(null_loaded, subset, null_settings, say, cache,
                                                       rounds=rounds_of(settings, n, first=2),
                                                       enough=stop.null, stopped=null_stopped)))
            _, null_measured, null_first = next(null)
            null_setup = time.perf_counter() - tick - null_first.seconds
            null_cost["seconds"] = time.perf_counter() - tick
        model_started = time.perf_counter()
        main = stages.enter_context(closing(_stage(loaded, samples, settings, progress, cache, check=True,
                                                   rounds=rounds, enough=stop.model, stopped=stopped)))
        site_report, measured, first = next(main)
        overhead = (model_started - started - null_cost["seconds"]) + time.perf_counter() - model_started \
            - first.seconds
        if not site_report.sites:
            null_contrast = NullContrast("off", "no residual site to compare with a random init")
        calibration = Calibration(
            time.perf_counter() - started, overhead, first.seconds + first.cached_seconds,
            _sizes(samples.inputs, first), shares(first), cached=bool(first.served), products=products(first),
            peak_bytes=peak_bytes(in_use, max(0, measured.peak.weights - there), measured.peak,
                                  null_measured.peak if null_measured is not None else None))
        if null_first is not None:
            calibration = dataclasses.replace(
                calibration, null_sample=null_first.seconds + null_first.cached_seconds,
                null_sizes=_sizes(subset.inputs, null_first), null_shares=shares(null_first),
                null_setup=null_setup, cached=calibration.cached or bool(null_first.served),
                null_products=products(null_first))
        prediction = predict(calibration, settings)
        _announce(prediction, calibration, progress)
        site_report, measured, summary = _finish(main)
        stop.measured = summary
        if null is not None and not site_report.sites:
            null = None
        if null is not None:
            null_contrast, null_replicates = _finish_null(null, null_loaded, null_contrast, samples, settings,
                                                          null_cost)
    null_contrast = _contrast(null_contrast, summary, null_replicates, settings.confidence)
    results = Results(summary.sites, summary.ra, summary.nc, summary.uncertainty,
                      sampling_record(settings, len(samples), rounds, stopped, null_stopped, null is not None),
                      null_contrast, _verdict(summary, null_contrast, settings, len(site_report.skipped),
                                              samples.synthetic))
    return Outcome(site_report, measured, results, time.perf_counter() - started, threads, null_cost, prediction,
                   *_measured_peak(device, peak_before))


def _announce(prediction: Prediction, calibration: Calibration, progress: Progress | None) -> None:
    """The prediction, and how to cut a long probe, through `progress` (when some work is left)."""
    total = len(calibration.sizes) + len(calibration.null_sizes)
    if progress and total > 1 + bool(calibration.null_sizes):
        done = 1 + bool(calibration.null_sizes)
        progress(Note(prediction.line()), done, total)
        hint = prediction.hint()
        if hint:
            progress(Note(hint), done, total)


def _finish_null(null: Stage, at_init: LoadedModel, made: NullContrast, samples: Samples,
                 settings: Settings, cost: dict[str, float]) -> tuple[NullContrast, dict]:
    """The rest of the null, measured, and its NC on every sample: what it came to (`made`: how the
    random init was made) and the replicates of its headline numbers (`cost` gains the seconds and
    products it took)."""
    tick = time.perf_counter()
    null_report, null_measured, null_summary = _finish(null)
    nc_at_init, nc_replicates = _collapse_at_init(at_init.module, samples, settings)
    timings = [null_measured.timing(s.name) for s in null_report.sites]
    cost.update(seconds=cost["seconds"] + time.perf_counter() - tick,
                products=sum(t["products"] + t["align_products"] for t in timings))
    measured = dataclasses.replace(made, status="measured", samples=null_measured.samples,  # the rounds may stop short
                                   sites=len(null_report.sites), at_init=null_summary.ra.headline(), nc=nc_at_init)
    return measured, {**null_summary.replicates, **nc_replicates}


def _contrast(null: NullContrast, summary: Summary, at_init: dict, level: float) -> NullContrast:
    """The null with the model's ratio to it: each RA headline number's and NC1's (on the same samples),
    with their intervals (the two resampled independently, the ratios taken pairwise)."""
    if not null.measured:
        return null
    model = summary.replicates
    ratio = null_ratios(summary.ra.headline(), null.at_init)
    ratio_ci = {section: ratio_interval(model.get(section), at_init.get(section), level) for section in ratio}
    nc, nc_at_init = summary.nc, null.nc
    if nc is not None and nc.nc1 is not None and nc_at_init is not None and nc_at_init.nc1:
        ratio["nc1"] = nc.nc1 / nc_at_init.nc1
        ratio_ci["nc1"] = ratio_interval(model.get("nc1"), at_init.get("nc1"), level)
    return dataclasses.replace(null, ratio=ratio, ratio_ci=ratio_ci)


def _verdict(summary: Summary, null: NullContrast, settings: Settings, skipped: int, synthetic: bool) -> Verdicts:
    """The RA and NC verdicts, with the contrasts with the null; a verdict on synthetic samples says it
    is a smoke test."""
    ra = ra_verdict(summary.ra, summary.uncertainty.samples, settings.thresholds, null, skipped)
    nc = nc_verdict(summary.nc, settings.thresholds, null)
    if synthetic:
        ra, nc = (dataclasses.replace(v, caveat=SYNTHETIC_CAVEAT) for v in (ra, nc))
    return Verdicts(ra, nc)


Stage = Generator[tuple[SiteReport, Measured, ChunkCost], None, tuple[SiteReport, Measured, Summary]]


def _stage(loaded: LoadedModel, samples: Samples, settings: Settings, progress: Progress | None,
           cache: ResultCache | None, check: bool = False, rounds: list[int] | None = None,
           enough: Enough | None = None, stopped: dict[str, Any] | None = None) -> Stage:
    """Sites discovered on `loaded`'s module, measured (the first sample a chunk of its own) and
    summarized (`check`: labels checked first). A generator: it yields the sites, what is measured so far
    and the cost of each chunk once measured, and returns the sites, the measurements and their summary.
    With `rounds` (sample counts), `enough` is asked after each round whether to stop; the samples not
    measured then go through one forward each, for NC, and `stopped` records how many were measured and
    why the rounds ended."""
    device, dtype = settings.resolved_device(), settings.resolved_dtype()
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []), \
            prepared(loaded.module, settings) as model:
        torch.manual_seed(settings.seed)  # a model that draws random numbers draws the same ones each run
        if check:
            check_labels(samples, loaded.num_classes or output_classes(model, samples, device, dtype))
        site_report = discover(model, samples, device, dtype, settings.site_level)
        run_cache = cache.for_run(model, loaded.name, settings, site_report.adapter) if cache is not None else None
        measured, why = Measured(), None
        chunks = measuring(measured, model, site_report.groups, samples, settings, progress, run_cache,
                           first_alone=True, rounds=rounds)
        for chunk in chunks:
            yield site_report, measured, chunk
            count = measured.samples
            if enough is not None and count in (rounds or ()) and count < len(samples):
                why = enough(site_report, measured, count)
                if why:
                    chunks.close()
                    break
        count = measured.samples
        features = None
        if count < len(samples):  # NC takes every sample: a forward each, no Jacobian
            rest = Samples(take(samples.inputs, slice(count, None)), None, samples.name)
            features = _joined(measured, measure(model, (), rest, settings), count)
        if stopped is not None:
            stopped.update(measured=count, why=why)
        summary = summarize(site_report.groups, measured, loaded, settings, samples.labels, features)
    return site_report, measured, summary


def _joined(measured: Measured, rest: Measured, offset: int) -> Measured:
    """The classifier features and logits of `measured` followed by those of `rest`, a forward over the
    samples after the first `offset`."""
    return Measured(features=measured.features + rest.features, logits=measured.logits + rest.logits,
                    next_tokens=measured.next_tokens + rest.next_tokens,
                    order=measured.order + [order + offset for order in rest.order])


def _finish(stage: Stage) -> tuple[SiteReport, Measured, Summary]:
    """The rest of a stage, measured; its result."""
    while True:
        try:
            next(stage)
        except StopIteration as done:
            return done.value


def _null_module(loaded: LoadedModel, settings: Settings) -> tuple[LoadedModel | None, NullContrast]:
    """The architecture at random init, seeded (seed + 1), to measure on the first `null_samples`
    samples, and how it was made; or None and why there is none."""
    if settings.null == "none":
        return None, NullContrast("off", "--null none: the verdict has no control")
    if dispatched(loaded.module):
        return None, NullContrast("unavailable", "a model split across devices (device_map) is not rebuilt at "
                                                 "random init: it would need its memory twice")
    seed = settings.seed + NULL_SEED_OFFSET
    init = random_init(loaded.builder, loaded.module, seed)
    if init.module is None:
        return None, NullContrast("unavailable", init.how, seed=seed)
    freeze(init.module)
    return (dataclasses.replace(loaded, module=init.module, name=f"{loaded.name} at random init"),
            NullContrast("made", init=init.how, seed=seed))


def _sizes(inputs, first: ChunkCost) -> list[float]:
    """Each sample's size against the chunk's first sample: its real tokens for text (a product's cost
    follows them), else 1."""
    tokens = real_tokens(inputs)
    if tokens is None:
        return [1.0] * len(first_tensor(inputs))
    return (tokens.double() / tokens[first.samples[0]]).tolist()


def _measured_peak(device: torch.device, before: int | None) -> tuple[int | None, str]:
    """The probe's peak memory on its device, measured, and how; or None and why."""
    after = peak_memory(device)
    how = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "the process's peak resident set"
    if after is None:
        return None, "the process's peak memory cannot be read on this platform"
    if before is not None and after <= before:
        return None, (f"{how} was {after / 1e9:.2f} GB before the probe and the probe did not exceed it: its own "
                      "peak was at most that")
    return after, how


def _collapse_at_init(module: torch.nn.Module, samples: Samples, settings: Settings
                      ) -> tuple[NCResults | None, dict]:
    """NC of the random init on every sample of the probe (a forward each: no Jacobian), and its values
    on the bootstrap resamples; None when it has no classifier head or NC is undetermined."""
    device = settings.resolved_device()
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []), \
            prepared(module, settings) as model:
        torch.manual_seed(settings.seed)
        nc, replicates = collapse(module, measure(model, (), samples, settings), samples.labels, settings)
    if nc is None or nc.undetermined:
        return None, {}
    return nc, replicates
