"""The library: `probe` a model on data and get a `Report`; `check` a report or a model against rules;
`load_report` reads one back. Everything the command line does, from a notebook or a training script,
with no global side effect: the caller's model, RNG, TF32 flags and grad mode are as they were."""
from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ra_probe.errors import UserError
from ra_probe.gate import GateResult, GateRules, check_baseline_data, check_rules, judge, read_baseline
from ra_probe.load.inputs import Model, as_loaded, as_samples
from ra_probe.load.loaded import LoadedModel
from ra_probe.load.samples import Samples
from ra_probe.pipeline.cache import ResultCache, tensor_digest
from ra_probe.pipeline.options import current_names, default, library_warning, names, normalized, refuse_bad
from ra_probe.pipeline.prepare import prepared
from ra_probe.pipeline.run import run
from ra_probe.pipeline.settings import Note, Progress, Settings
from ra_probe.report.build import build_report
from ra_probe.report.files import read_report_file, write_text
from ra_probe.report.schema import upgraded
from ra_probe.report.view import ReportView
from ra_probe.sites.discover import discover
from ra_probe.sites.records import SiteReport

LOADING_OPTIONS = names("loading")


class Report(Mapping):
    """A probe's report: read it as the JSON dict it is (`report["metrics"]["ra2"]`), by name through
    `.view` (typed results: `report.view.ra.ra2.mean_score`), or through `.verdict`, `.sites`, `.metrics`;
    write it with `.to_json`/`.to_html`; in Jupyter it shows itself."""

    def __init__(self, data: dict[str, Any]):
        self._data = data

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"<Report {self.view.model_name}: RA {self.verdict['ra']}, NC {self.verdict['nc']}>"

    @functools.cached_property
    def view(self) -> ReportView:
        """The report read by name: its typed results (`.ra`, `.nc`, `.null`, `.verdict`…) and parts."""
        return ReportView(self._data)

    @property
    def verdict(self) -> dict[str, str]:
        """{"ra": status, "nc": status}, each present / partial / absent / undetermined / not_applicable."""
        return {"ra": self.view.status("ra"), "nc": self.view.status("nc")}

    @property
    def sites(self) -> list[dict[str, Any]]:
        return self._data["sites"]

    @property
    def metrics(self) -> dict[str, Any]:
        return self._data["metrics"]

    def to_dict(self) -> dict[str, Any]:
        """A deep copy of the report as plain JSON-ready data."""
        return copy.deepcopy(self._data)

    def to_json(self, path: str | Path | None = None, *, force: bool = False) -> str:
        """The report as JSON text, also written to `path` when given (an existing file only with `force`)."""
        import json

        text = json.dumps(self._data, indent=1, allow_nan=False)
        if path is not None:
            _refuse_overwrite(Path(path), force)
            write_text(text, Path(path))  # the text just made, not a second serialization
        return text

    def to_html(self, path: str | Path | None = None, *, force: bool = False) -> str:
        """The self-contained HTML page, also written to `path` when given (an existing file only with `force`)."""
        from ra_probe.report.html import render_report, write_html

        page = render_report(self._data)
        if path is not None:
            _refuse_overwrite(Path(path), force)
            write_html(page, Path(path))
        return page

    def _repr_html_(self) -> str:
        """The HTML page inline in Jupyter, in a frame so its style stays its own."""
        from html import escape

        return (f'<iframe srcdoc="{escape(self.to_html())}" style="width: 100%; height: 720px; border: 0" '
                f'title="ra-probe report: {escape(self.view.model_name)}"></iframe>')

    def to_frame(self):
        """One row per site: group, kind, σ₁…σ₃, median rank, max residual, method, seconds (pandas)."""
        import pandas as pd

        ranks = {s.site: s for s in self.view.ra.ra3.sites}
        rows = []
        for site in self.sites:
            spectrum = self.view.spectra[site["name"]]
            values = list(spectrum.singular_values) + [None] * 3
            rows.append({"site": site["name"], "group": site["group"], "kind": site["kind"],
                         "sigma1": values[0], "sigma2": values[1], "sigma3": values[2],
                         "rank_median": ranks[site["name"]].rank_median,
                         "max_residual": spectrum.max_residual, "method": spectrum.method,
                         "seconds": spectrum.timing["seconds"]})
        return pd.DataFrame(rows).set_index("site")


def _refuse_overwrite(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise UserError(f"{path} exists; pass force=True to overwrite it")


def settings_from(options: dict[str, Any], base: Settings | None = None) -> Settings:
    """Settings from keyword options named like the CLI's (`k`, `samples`, `tol`, `device`...), and
    verdict thresholds by their names (`ra2_min`, `nc1_max`...), each refused as the command line
    refuses it. Unknown names are a UserError; former names (`min_alignment`) are taken with a
    FutureWarning."""
    options = current_names(options, ("setting", "threshold"), library_warning)
    thresholds = names("threshold")
    known = names("setting", "threshold")
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise UserError(f"unknown setting(s) {', '.join(unknown)}; known: "
                        f"{', '.join(sorted(known + LOADING_OPTIONS))}")
    settings = copy.deepcopy(base) if base is not None else Settings()
    for name, value in options.items():
        setattr(settings.thresholds if name in thresholds else settings, name, value)
    settings.validate()
    return settings


class Inputs(NamedTuple):
    """What a probe runs on: the loaded model, its samples and the settings."""

    loaded: LoadedModel
    samples: Samples
    settings: Settings


def load_inputs(model: Model, data: Any = None, settings: Settings | None = None, **options: Any) -> Inputs:
    """The loaded model, its samples and the settings, from what `probe`, `check`, `find_sites` and the
    command line take: loading options (`pretrained`, `weights`, `arch`, `input_shape`, `device_map`)
    are split from settings and every value is checked by the option table before anything is loaded;
    a module the caller holds is probed where it lives unless `device` says otherwise; a DataLoader's
    base-seed draw is kept off torch's global RNG."""
    loading = {key: normalized(key, options.pop(key)) for key in LOADING_OPTIONS if key in options}
    settings = settings_from(options, settings)
    refuse_bad(loading)
    loaded = as_loaded(model, settings.seed, **loading)
    weight = next(model.parameters(), None) if isinstance(model, nn.Module) else None
    if settings.device is None and weight is not None:
        settings = dataclasses.replace(settings, device=str(weight.device))
    with torch.random.fork_rng(devices=[]):
        samples = as_samples(data, loaded, limit=settings.sample_limit, seed=settings.seed)
    return Inputs(loaded, samples, settings)


def probe(model: Model, data: Any = None, settings: Settings | None = None, *,
          progress: Progress | bool | None = None, cache: bool | str | Path = False, **options: Any) -> Report:
    """Probe `model` on `data` and return its Report.

    `model`: an `nn.Module` (probed as it is, never copied, and left as it was), or a reference as the
    CLI takes it ("timm/resnet50", "hf/org/name", a folder, "file.py:fn", "bundled/fc-digits", or a spec of a
    source added with `register_source` or installed through the `ra_probe.sources` entry points), with
    `pretrained`, `weights`, `arch`, `input_shape` and `device_map` (a Hugging Face model split across
    devices: "auto", "balanced" or a {module: device} map) as loading options; a module is probed on its
    own device unless `device` says otherwise. `data`: a tensor (N, …), an
    (x, y) pair, a DataLoader or iterable of batches, a data reference string, or None. Settings are the
    CLI's options as keywords (`k=16, samples=64, tol=1e-3, device="cuda"`...) or a `Settings`.
    `progress`: True for a progress bar, or a callable (what, done, total). `cache`: True for the
    user's cache folder, or a folder."""
    refuse_bad({"cache": cache})
    loaded, samples, settings = load_inputs(model, data, settings, **options)
    store = None if cache is False else ResultCache(None if cache is True else cache)
    if progress is True:
        with _progress_bar() as bar:
            outcome = run(loaded, samples, settings, bar, store)
    else:
        outcome = run(loaded, samples, settings, progress or None, store)
    # timings of entries served from the cache are those of the run that measured them
    served = [f"{store.hits} of {store.hits + store.misses} group measurements served from the cache in "
              f"{store.folder} (--no-cache measures anew)"] if store is not None and store.hits else []
    return Report(build_report(loaded, samples, settings, outcome, served))


class _progress_bar:
    """Progress on stderr, as a Progress callable: a rich bar with the time left on a terminal or in a
    notebook; elsewhere (CI logs, nohup) a plain line per site measured, with its seconds and products.
    A `Note` (the predicted cost) is a line of its own in both."""

    def __enter__(self) -> Callable[[str, int, int], None]:
        import sys

        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        console = Console(stderr=True)
        if not (console.is_terminal or console.is_jupyter):
            self.bar = None
            return lambda what, done, total: print(what if isinstance(what, Note) else f"[{done}/{total}] {what}",
                                                   file=sys.stderr, flush=True)
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TimeRemainingColumn(), console=console, transient=True)
        self.bar.__enter__()
        task = self.bar.add_task("probing", total=None)

        def show(what: str, done: int, total: int) -> None:
            if isinstance(what, Note):  # a line that stays, above the bar
                self.bar.console.print(what, markup=False, highlight=False)
            else:
                self.bar.update(task, description=f"probing {what}", completed=done, total=total)
        return show

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


def load_report(path: str | Path) -> Report:
    """A report written by `Report.to_json` or `ra-probe --json`, validated, as a Report."""
    return Report(read_report_file(Path(path)))


def find_sites(model: Model, data: Any = None, **options: Any) -> SiteReport:
    """The residual sites of `model` found and verified on a forward of the first samples of `data`
    (as for `probe`; without, synthetic inputs: a forward needs only their shapes), and those skipped with
    the reason, without measuring anything."""
    loaded, samples, settings = load_inputs(model, "synthetic" if data is None else data, **{"samples": 4, **options})
    with prepared(loaded.module, settings) as prepared_model:
        return discover(prepared_model, samples, settings.resolved_device(), settings.resolved_dtype(), settings.site_level)


def check(report_or_model: Report | Mapping | Model, *, require: str | Iterable[str] = (),
          baseline: str | Path | Mapping | None = None, tolerance: float = default("tolerance"), data: Any = None,
          settings: Settings | None = None, progress: Progress | bool | None = None, cache: bool | str | Path = False,
          **options: Any) -> GateResult:
    """The CI gate's rules on a report, or on a model probed first (`data` and settings as for `probe`).
    `require`: "ra", "nc" or both; `baseline`: a report (or its path) whose verdicts must not get worse
    and metrics not move beyond `tolerance`; limits by name: `fail_below_ra1`, `fail_below_ra2`,
    `fail_above_rank`, `fail_above_nc1`, `fail_above_nc4` (their former names `min_linearity`,
    `min_alignment`, `max_rank`, `max_nc1`, `max_nc4` are taken with a FutureWarning). Returns a
    GateResult: `.passed`, `.checks`, `.failures`, and `.report`, the report judged."""
    from ra_probe.gate import LIMITS, given_limits

    options = current_names(options, ("limit",), library_warning)
    limits = given_limits({name: options.pop(name) for name in list(options) if name in LIMITS})
    refuse_bad({"tolerance": tolerance})
    wanted = (require,) if isinstance(require, str) else tuple(require)
    if not set(wanted) <= {"ra", "nc"}:
        raise UserError(f"require takes ra or nc, got {', '.join(wanted)}")
    if isinstance(report_or_model, Mapping):
        if options or data is not None or settings is not None:
            raise UserError("data and settings apply to a model to probe, not to a finished report")
        report = upgraded(dict(report_or_model))
        made_with = ReportView(report).settings
    else:
        report = None
        loaded, samples, settings = load_inputs(report_or_model, data, settings, **options)
        made_with = settings.as_dict()
    base = read_baseline(Path(baseline), made_with) if isinstance(baseline, (str, Path)) else upgraded(baseline)
    rules = GateRules(require=wanted, limits=limits, tolerance=tolerance, baseline=base)
    check_rules(rules, made_with["k"])
    if report is None:
        if base is not None:
            check_baseline_data(base, tensor_digest(samples.inputs, samples.labels), baseline or "baseline")
        report = probe(loaded, samples, settings, progress=progress, cache=cache)
    report = report.to_dict() if isinstance(report, Report) else dict(report)
    result = judge(report, rules)
    result.report = report
    return result


def register_adapter(adapter: Any) -> None:
    """Add an adapter at runtime (an object with `name`, `description`, `fallback` and `find(model)`),
    tried before the registered ones of the same role: a notebook can teach ra-probe a new family."""
    from ra_probe.sites.registry import register_adapter as register

    register(adapter)


__all__ = ["Inputs", "Report", "check", "find_sites", "load_inputs", "load_report", "probe", "register_adapter"]
