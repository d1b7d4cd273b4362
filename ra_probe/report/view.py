"""A report read back: the typed results (`metrics.results`) of a report dict, as `report/build.py`
wrote them, so that the console, the HTML, `compare`, the gate and the callbacks read fields by name
rather than string paths into the dict. Fields a report of an earlier 1.x schema lacks read as None."""
from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from ra_probe.metrics.results import (
    NCResults,
    NullContrast,
    RAHeadline,
    RAResults,
    Results,
    Sampling,
    SiteSpectrum,
    Uncertainty,
    Verdict,
    Verdicts,
)
from ra_probe.report.layout import HEADLINE_FIELDS


def record(cls: type, data: Mapping[str, Any] | None) -> Any:
    """The record `cls` from its report data: each field from the key of its name (nested records and
    lists of them too); None for a key the data lacks (an earlier schema), the field's default for an
    optional one."""
    if data is None:
        return None
    hints = _hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        if field.name in data:
            values[field.name] = _value(hints[field.name], data[field.name])
        elif field.default is dataclasses.MISSING:
            values[field.name] = None
    return cls(**values)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _value(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next((arg for arg in typing.get_args(hint) if arg is not type(None)), hint)
    if dataclasses.is_dataclass(hint):
        return record(hint, value)
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (Sequence, list) and args and dataclasses.is_dataclass(args[0]):
        return [record(args[0], item) for item in value]
    return value


def null_of(data: Mapping[str, Any] | None) -> NullContrast:
    """The null contrast of a report's `metrics.null` (a report before schema 1.4 has none: off)."""
    if not data:
        return NullContrast("off", "not in this report")
    if data["status"] != "measured":
        return NullContrast(data["status"], data.get("reason"), seed=data.get("seed"))
    return NullContrast(data["status"], None, data["init"], data["seed"], data["samples"], data["sites"],
                        RAHeadline(**{section: data[section][name] for section, name in HEADLINE_FIELDS.items()}),
                        record(NCResults, data.get("nc")), data["ratio"], data.get("ratio_ci") or {})


def verdicts_of(data: Mapping[str, Any]) -> Verdicts:
    """The verdicts of a report's `verdict`: each one's status and its evidence."""
    return Verdicts(*(record(Verdict, {**data["evidence"][kind], "status": data[kind]}) for kind in ("ra", "nc")))


def results_of(report: Mapping[str, Any]) -> Results:
    """The typed results of a report dict."""
    metrics = report["metrics"]
    spectra = {site["name"]: record(SiteSpectrum, {f.name: site.get(f.name) for f in dataclasses.fields(SiteSpectrum)})
               for site in report["sites"]}
    coupling = metrics.get("coupling") or {"K": [], "tokens": "all", "groups": []}  # none before schema 1.5
    ra = RAResults(*(record(_hints(RAResults)[section], metrics[section]) for section in ("ra1", "ra2", "ra3", "ra4")),
                   record(_hints(RAResults)["coupling"], coupling))
    return Results(spectra, ra, record(NCResults, metrics["nc"]), record(Uncertainty, metrics.get("uncertainty")),
                   record(Sampling, metrics.get("sampling")), null_of(metrics.get("null")),
                   verdicts_of(report["verdict"]))


class ReportView:
    """A report dict (built here or read from a file) read by name: its typed results (`ra`, `nc`,
    `null`, `verdict`, `uncertainty`, `sampling`, `spectra`) and its other parts as they are."""

    def __init__(self, report: Mapping[str, Any]):
        self.report = report

    @functools.cached_property
    def results(self) -> Results:
        return results_of(self.report)

    @property
    def ra(self) -> RAResults:
        return self.results.ra

    @property
    def nc(self) -> NCResults | None:
        return self.results.nc

    @property
    def nc_measured(self) -> NCResults | None:
        """NC where it has values (not undetermined), else None."""
        return None if self.nc is None or self.nc.undetermined else self.nc

    @property
    def null(self) -> NullContrast:
        return self.results.null

    @property
    def verdict(self) -> Verdicts:
        return self.results.verdict

    def status(self, kind: str) -> str:
        """The verdict of "ra" or "nc": present, partial, absent, undetermined or not_applicable."""
        return getattr(self.verdict, kind).status

    @property
    def uncertainty(self) -> Uncertainty | None:
        return self.results.uncertainty

    @property
    def sampling(self) -> Sampling | None:
        return self.results.sampling

    @property
    def auto_sampling(self) -> Sampling | None:
        """How `--samples auto` went, or None for a fixed number of samples."""
        return self.sampling if self.sampling is not None and self.sampling.mode == "auto" else None

    @property
    def spectra(self) -> Mapping[str, SiteSpectrum]:
        return self.results.spectra

    @property
    def model_name(self) -> str:
        return self.report["model"]["name"]

    @property
    def k(self) -> int:
        return self.report["settings"]["k"]

    @property
    def thresholds(self) -> Mapping[str, float]:
        return self.report["verdict"]["thresholds"]

    @property
    def synthetic(self) -> bool:
        return bool(self.report.get("data", {}).get("synthetic"))

    def __getattr__(self, part: str) -> Any:
        """The report's other parts by their keys: `model`, `data`, `settings`, `environment`, `sites`,
        `skipped`, `messages`, `timings`, `tool`."""
        if part in PARTS:
            return self.report[part]
        raise AttributeError(part)


PARTS = ("model", "data", "settings", "environment", "sites", "skipped", "messages", "timings", "tool", "schema_version")


def view_of(report: Mapping[str, Any] | ReportView) -> ReportView:
    """`report` read by name (a view is returned as it is)."""
    return report if isinstance(report, ReportView) else ReportView(report)
