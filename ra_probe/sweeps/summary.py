"""`sweep.json`: every run's status, report and headline numbers, the executor, and the results
across runs — RA4 (the log–log slope of mean σ₁ against the number of sites L, where depths differ) —
valid against `sweep.schema.json`, shipped in the package; and the `sweep.html` page."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ra_probe.metrics.ra import depth_fit
from ra_probe.report.headline import headline, intervals
from ra_probe.report.schema import schema_errors
from ra_probe.report.view import view_of
from ra_probe.sweeps.spec import Run
from ra_probe.version import __version__

SCHEMA_VERSION = "2.1"  # also in sweep.schema.json; MINOR for added fields, MAJOR for changed ones
SCHEMA_PATH = Path(__file__).with_name("sweep.schema.json")


def run_entry(run: Run, key: str, status: str, report: dict[str, Any] | None, error: str | None,
              seconds: float | None) -> dict[str, Any]:
    """A run's line in sweep.json: what it is, how it went, and its verdicts and headline metrics."""
    view = None if report is None else view_of(report)
    return {"name": run.name, "model": run.model, "weights": run.loading.get("weights"), "data": run.data,
            "step": run.step, "key": key, "status": status,
            "report": f"{run.name}.json" if report is not None else None, "error": error, "seconds": seconds,
            "verdict": None if view is None else {"ra": view.status("ra"), "nc": view.status("nc")},
            "metrics": None if view is None else headline(view),
            "intervals": None if view is None else intervals(view)}


def ra4_across(entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """RA4 across the runs: least-squares fit of log mean σ₁ against log L over the runs with a report
    (≈ −1 under RA4); None unless at least two depths differ."""
    measured = [e for e in entries if e["metrics"] and e["metrics"]["depth"] and e["metrics"]["mean_sigma1"]]
    depths = [e["metrics"]["depth"] for e in measured]
    sigma1 = [e["metrics"]["mean_sigma1"] for e in measured]
    fit = depth_fit(depths, sigma1)
    if fit is None:
        return None
    return {"runs": [e["name"] for e in measured], "depths": depths, "mean_sigma1": sigma1, **fit}


def sweep_summary(source: str, entries: list[dict[str, Any]], executor: dict[str, Any], measured: int,
                  seconds: float, messages: list[str]) -> dict[str, Any]:
    """The sweep.json document."""
    counts = {status: sum(e["status"] == status for e in entries)
              for status in ("done", "skipped", "failed", "interrupted")}
    return {"schema_version": SCHEMA_VERSION, "tool": {"name": "ra-probe", "version": __version__},
            "source": source, "executor": executor, "measured": measured, "seconds": seconds, "counts": counts,
            "runs": entries, "ra4": ra4_across(entries), "messages": messages}


def schema() -> dict[str, Any]:
    """The JSON Schema of sweep.json (draft 2020-12), shipped in the package."""
    return json.loads(SCHEMA_PATH.read_text())


def sweep_schema_errors(document: dict[str, Any]) -> list[str]:
    """Where a sweep.json document departs from its schema, one line per error; empty when valid."""
    return schema_errors(document, schema())


def previous_entries(path: Path) -> dict[str, dict[str, Any]]:
    """The runs of an earlier sweep.json in the same folder, by name (none when it is missing or unreadable)."""
    try:
        document = json.loads(path.read_text())
        return {entry["name"]: entry for entry in document["runs"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def render_sweep(document: dict[str, Any], reports: dict[str, dict[str, Any]]) -> str:
    """The sweep's HTML page from sweep.json and the runs' reports by run name."""
    from ra_probe.report.html import render_sweep as render

    return render(document, [entry["name"] for entry in document["runs"] if entry["name"] in reports],
                  [reports[entry["name"]] for entry in document["runs"] if entry["name"] in reports])
