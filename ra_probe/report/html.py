"""The HTML reports: one self-contained file per report or comparison — jinja2 templates,
the figures of `plots` inline as SVG, the style inline; nothing is fetched when the page opens."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from ra_probe.metrics.results import NC_VALUES
from ra_probe.report import plots
from ra_probe.report.files import write_text
from ra_probe.report.format import cost_caption, cost_rows, fmt, fmt_ci, null_rows, sampling_line
from ra_probe.report.headline import label
from ra_probe.report.view import ReportView, view_of


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


def report_figures(view: ReportView) -> dict[str, Any]:
    """Every figure of one report as inline SVG, keyed by where the template puts it."""
    ra = view.ra
    sigma1 = {s.site: s.sigma1_mean for s in ra.ra4.sites}
    figures: dict[str, Any] = {"spectra": None, "sigma1": None, "nc": None, "alignment": {}, "heatmaps": {},
                               "trajectories": {}, "coupling": {}}
    if view.sites:
        groups = {s["name"]: s["group"] for s in view.sites}
        figures["spectra"] = Markup(plots.spectra(view.spectra, groups, ra.ra3.classes))
        sigma1_ci = {name: [s.singular_values_ci[0][0], s.singular_values_ci[1][0]]
                     for name, s in view.spectra.items() if s.singular_values_ci}  # from schema 1.7
        figures["sigma1"] = Markup(plots.sigma1_depth(ra.ra4.sites, groups, sigma1_ci))
    for group in ra.ra2.groups:
        figures["alignment"][group.group] = Markup(plots.alignment_matrix(group))
        figures["heatmaps"][group.group] = Markup(plots.heatmaps(group, sigma1))
    for group in ra.coupling.groups:
        figures["coupling"][group.group] = {K: Markup(plots.coupling_matrix(group, K))
                                            for K, matrix in group.matrices.items() if matrix is not None}
    for group in ra.ra1.groups:
        if group.projection:
            figures["trajectories"][group.group] = Markup(plots.trajectories(group))
    if view.nc_measured:
        figures["nc"] = Markup(plots.nc_bars(view.nc_measured, view.thresholds))
    return figures


def render_report(report: dict[str, Any] | ReportView) -> str:
    """The HTML page of one report: verdict and evidence first, then the evidence's figures and tables."""
    view = view_of(report)
    measured = view.null.measured and view.sites
    return _environment().get_template("report.html.j2").render(
        report=view.report, view=view, m=view.ra, verdict=view.verdict, null=view.null, nc=view.nc_measured,
        ra1={g.group: g for g in view.ra.ra1.groups}, ra3={s.site: s for s in view.ra.ra3.sites},
        figures=report_figures(view), null_rows=null_rows(view) if measured else [],
        nc_rows=[(label(key), getattr(view.nc, key)) for key in NC_VALUES] if view.nc_measured else [],
        cost_rows=cost_rows(view.timings), cost_caption=cost_caption(view.timings) if cost_rows(view.timings) else "",
        sampling=sampling_line(view.auto_sampling) if view.auto_sampling else "")


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
