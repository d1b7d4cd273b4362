"""The HTML reports: one self-contained file per report or comparison — jinja2 templates,
the figures of `plots` inline as SVG, the style inline; nothing is fetched when the page opens."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from ra_probe.report import plots
from ra_probe.report.files import write_text
from ra_probe.report.format import cost_caption, cost_rows, fmt, fmt_ci, null_rows, sampling_line


def number(value: Any, digits: int = 4) -> str:
    """How the HTML prints a value: as the console does, with 4 significant digits."""
    return fmt(value, digits)


def _environment() -> Environment:
    env = Environment(loader=PackageLoader("ra_probe.report", "templates"), autoescape=select_autoescape(["j2"]),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = number
    env.filters["num_ci"] = lambda value, ci: fmt_ci(value, ci, 4)
    env.filters["json"] = lambda value: json.dumps(value, ensure_ascii=False)
    return env


def report_figures(report: dict[str, Any]) -> dict[str, Any]:
    """Every figure of one report as inline SVG, keyed by where the template puts it."""
    metrics = report["metrics"]
    sites = report["sites"]
    sigma1 = {s["site"]: s["sigma1_mean"] for s in metrics["ra4"]["sites"]}
    figures: dict[str, Any] = {"spectra": None, "sigma1": None, "nc": None, "alignment": {}, "heatmaps": {},
                               "trajectories": {}, "coupling": {}}
    if sites:
        figures["spectra"] = Markup(plots.spectra(sites, metrics["ra3"]["classes"]))
        sigma1_ci = {s["name"]: [s["singular_values_ci"][0][0], s["singular_values_ci"][1][0]]
                     for s in sites if s.get("singular_values_ci")}  # from schema 1.7
        figures["sigma1"] = Markup(plots.sigma1_depth(metrics["ra4"]["sites"], {s["name"]: s["group"] for s in sites},
                                                      sigma1_ci))
    for group in metrics["ra2"]["groups"]:
        figures["alignment"][group["group"]] = Markup(plots.alignment_matrix(group))
        figures["heatmaps"][group["group"]] = Markup(plots.heatmaps(group, sigma1))
    for group in metrics.get("coupling", {}).get("groups", []):  # none before schema 1.5
        figures["coupling"][group["group"]] = {K: Markup(plots.coupling_matrix(group, K))
                                               for K, matrix in group["matrices"].items() if matrix is not None}
    for group in metrics["ra1"]["groups"]:
        if group.get("projection"):
            figures["trajectories"][group["group"]] = Markup(plots.trajectories(group))
    if metrics["nc"] is not None and not metrics["nc"].get("undetermined"):
        figures["nc"] = Markup(plots.nc_bars(metrics["nc"], report["verdict"]["thresholds"]))
    return figures


def render_report(report: dict[str, Any]) -> str:
    """The HTML page of one report: verdict and evidence first, then the evidence's figures and tables."""
    ra1 = {g["group"]: g for g in report["metrics"]["ra1"]["groups"]}
    ra3 = {s["site"]: s for s in report["metrics"]["ra3"]["sites"]}
    measured = report["metrics"].get("null", {}).get("status") == "measured" and report["sites"]  # none before 1.4
    sampling = report["metrics"].get("sampling")  # from schema 1.7
    return _environment().get_template("report.html.j2").render(
        report=report, ra1=ra1, ra3=ra3, figures=report_figures(report),
        null_rows=null_rows(report["metrics"]) if measured else [], cost_rows=cost_rows(report["timings"]),
        cost_caption=cost_caption(report["timings"]) if cost_rows(report["timings"]) else "",
        sampling=sampling_line(sampling) if sampling and sampling["mode"] == "auto" else "")


def render_comparison(comparison: dict[str, Any]) -> str:
    """The HTML page of `compare`: the side-by-side table, σ₁ against depth, RA4 slopes by family."""
    figures = {"sigma1": Markup(plots.compare_sigma1(comparison["reports"])),
               "slopes": Markup(plots.depth_slopes(comparison["families"])) if comparison["families"] else None}
    return _environment().get_template("compare.html.j2").render(comparison=comparison, figures=figures)


def render_sweep(sweep: dict[str, Any], names: list[str], reports: list[dict[str, Any]]) -> str:
    """The page of a sweep (sweep.json and its runs' reports, labelled by run name): the compare page
    with the runs' statuses, the RA4 fit across runs (slope and r²) on σ₁ against depth, and the
    metrics against the checkpoints' steps when the runs are checkpoints."""
    from ra_probe.report.compare import compare

    comparison = compare([(f"{name}.json", report) for name, report in zip(names, reports)], names)
    fit = sweep["ra4"]
    comparison["families"] = [{"family": "sweep", "labels": fit["runs"], "depths": fit["depths"],
                               "mean_sigma1": fit["mean_sigma1"], "slope": fit["slope"]}] if fit else []
    steps = {entry["name"]: entry["step"] for entry in sweep["runs"]}
    stepped = [(steps[row["label"]], row) for row in comparison["reports"] if steps[row["label"]] is not None]
    figures = {"sigma1": Markup(plots.compare_sigma1(comparison["reports"])) if reports else None,
               "slopes": Markup(plots.depth_slopes(comparison["families"])) if fit else None,
               "steps": Markup(plots.metrics_by_step(stepped)) if len({s for s, _ in stepped}) >= 2 else None}
    return _environment().get_template("sweep.html.j2").render(sweep=sweep, comparison=comparison, figures=figures)


def write_html(page: str, path: Path) -> None:
    """Write a page the way every report file is written: whole or not at all."""
    write_text(page, path)
