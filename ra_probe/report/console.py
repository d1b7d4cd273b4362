"""Console output: rich tables rendered from the report dict, so everything printed is also in the
JSON."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ra_probe.metrics.results import NCResults, Verdict, Verdicts
from ra_probe.report.format import cost_caption, cost_rows, fmt, fmt_ci, null_rows, sampling_line
from ra_probe.report.headline import label
from ra_probe.report.view import ReportView, view_of

STATUS_STYLE = {"present": "bold green", "partial": "bold yellow", "absent": "bold red", "undetermined": "bold blue",
                "not_applicable": "dim"}


@dataclass
class Column:
    header: str
    justify: str = "left"
    optional: bool = False  # dropped, last first, when the table would not fit the console


def fitted(title: str, columns: list[Column], rows: list[list[str]], width: int, caption: str | None = None) -> Table:
    """A table whose names and numbers are never cut: cells do not wrap, and optional columns are
    left out, from the last, until the rest fits `width` (a narrow terminal, a CI log). Cells with
    spaces (reasons, skipped sites' notes) may wrap, in the last column only."""
    keep = list(range(len(columns)))

    def needed(indices: list[int]) -> int:
        widths = [max([cell_len(columns[i].header)] + [cell_len(Text.from_markup(r[i]).plain) for r in rows])
                  for i in indices]
        return sum(widths) + 3 * len(indices) + 1  # one space of padding each side, and the borders

    while needed(keep) > width and any(columns[i].optional for i in keep):
        keep.remove(max(i for i in keep if columns[i].optional))
    dropped = [columns[i].header for i in range(len(columns)) if i not in keep]
    table = Table(title=title, title_justify="left", caption=caption)
    for position, i in enumerate(keep):
        table.add_column(columns[i].header, justify=columns[i].justify, no_wrap=position < len(keep) - 1,
                         overflow="fold")
    for row in rows:
        table.add_row(*(row[i] for i in keep))
    if dropped:
        table.caption = (f"{caption}; " if caption else "") + f"not shown at this width: {', '.join(dropped)}"
    return table


def sites_table(sites: list[dict[str, Any]], skipped: list[dict[str, Any]], adapter: str,
                width: int = 120) -> Table:
    columns = [Column("site"), Column("kind"), Column("post", optional=True), Column("group"),
               Column("input shape", optional=True), Column("verify error", "right", optional=True)]
    rows = [[s["name"], s["kind"], fmt(s["post"]), str(s["group"]), "×".join(map(str, s["input_shape"])),
             fmt(s["verify_error"], 2)] for s in sites]
    table = fitted(f"Residual sites (adapter: {adapter})", columns, rows, width)
    if skipped:  # the reasons are prose: a table of their own, which may wrap them
        table = Table.grid()
        table.add_row(fitted(f"Residual sites (adapter: {adapter})", columns, rows, width))
        reasons = Table(title="Skipped", title_justify="left")
        reasons.add_column("site", no_wrap=True, overflow="fold")
        reasons.add_column("reason")
        for s in skipped:
            reasons.add_row(s["name"], s["reason"])
        table.add_row(reasons)
    return table


def spectra_table(view: ReportView, width: int = 120) -> Table:
    ra3 = {s.site: s for s in view.ra.ra3.sites}
    columns = [Column("site"), Column("σ₁", "right"), Column("rank", "right"), Column("σ₂", "right", True),
               Column("gap", "right", True), Column("residual", "right", True), Column("method", optional=True),
               Column("σ₃", "right", True), Column("seconds", "right", True)]
    rows = []
    for name, spectrum in view.spectra.items():
        sv = list(spectrum.singular_values) + [None] * 3
        r = ra3[name]
        rank = f"{r.rank_median:g}" if r.rank_median is not None else f"≥{r.rank_at_least}"
        rows.append([name, fmt(sv[0]), rank, fmt(sv[1]), fmt(r.gap_mean), fmt(spectrum.max_residual, 2),
                     spectrum.method, fmt(sv[2]), f"{spectrum.timing['seconds']:.2f}"])
    classes, k = view.ra.ra3.classes, view.k
    gap = "σ_C/σ_C+1" + (f" (needs k > C = {classes}: not measured)" if classes and k <= classes else "")
    caption = (f"rank: median #{{σ > τσ₁}}, τ = {view.ra.ra3.tau:g}; gap: {gap}; "
               "residual: largest residual bound")
    return fitted(f"Residual Jacobian spectra (mean over {view.data['samples']} samples)", columns, rows,
                  width, caption)


def ra_table(view: ReportView, width: int = 120) -> Table:
    ra = view.ra
    ra1 = {g.group: g for g in ra.ra1.groups}
    columns = [Column("group"), Column("first site"), Column("last site"), Column("sites", "right"),
               Column("RA2 a_ij", "right"), Column("RA1 linearity", "right"), Column("LSS", "right", True),
               Column("step CV", "right", True), Column("step cos", "right", True)]
    coupling = {g.group: g.mean for g in ra.coupling.groups}
    ks = [str(K) for K in ra.coupling.K]
    columns += [Column(f"coupling K={K}", "right") for K in ks]
    rows, sampled = [], []
    for g in ra.ra2.groups:
        t = ra1[g.group]
        estimated = (g.pairs_measured or 0) < (g.pairs or 0)  # from schema 1.6
        sampled += [f"group {g.group}: {g.pairs_measured} of {g.pairs}"] if estimated else []
        rows.append([str(g.group), g.sites[0], g.sites[-1], str(len(g.sites)),
                     ("≈" if estimated else "") + fmt_ci(g.score, g.score_ci), fmt_ci(t.linearity, t.linearity_ci),
                     fmt(t.lss), fmt(t.step_cv), fmt(t.step_cos)]
                    + [fmt(coupling.get(g.group, {}).get(K)) for K in ks])
    ra4 = ra.ra4
    caption = (f"RA4: L = {ra4.depth}, L·mean σ₁ = {fmt_ci(ra4.L_times_mean_sigma1, ra4.L_times_mean_sigma1_ci)}"
               + _level(view))
    if sampled:
        caption += f"\n≈ estimated from a sample of the pairs ({'; '.join(sampled)}); --align-pairs all measures every pair"
    return fitted("Residual Alignment by group", columns, rows, width, caption)


def null_table(view: ReportView, width: int = 120) -> Table:
    null = view.null
    columns = [Column(""), Column("model", "right"), Column("random init", "right"), Column("ratio", "right")]
    return fitted("Against the same architecture at random init", columns, null_rows(view), width,
                  f"{null.init}, seed {null.seed}, {null.samples} samples" + _level(view))


def cost_table(timings: dict[str, Any], width: int = 120) -> Table:
    columns = [Column(""), Column("predicted", "right"), Column("measured", "right"),
               Column("measured / predicted", "right", True)]
    return fitted("Cost", columns, cost_rows(timings), width, cost_caption(timings))


NC_ROWS = ("nc1", "nc2_equinorm_means", "nc2_equiangular", "nc3", "nc4", "nc2_equinorm_weights")


def nc_table(nc: NCResults, width: int = 120, at_init: NCResults | None = None) -> Table:
    """NC1–NC4, one row each: the value, its interval and, when measured, its value at random init."""
    columns = [Column(""), Column("value", "right"), Column("interval", "right")]
    columns += [Column("random init", "right")] if at_init else []
    rows = []
    for key in NC_ROWS:
        ci = getattr(nc, f"{key}_ci")
        rows.append([label(key), fmt(getattr(nc, key)), "–" if not ci else f"{fmt(ci[0])}–{fmt(ci[1])}"]
                    + ([fmt(getattr(at_init, key))] if at_init else []))
    return fitted(f"Neural Collapse ({nc.classes} classes, {nc.samples} samples, labels from "
                  f"{nc.labels_from})", columns, rows, width, nc.interval_note)


def _level(view: ReportView) -> str:
    """The intervals' caption: their level and how many samples they come from."""
    uncertainty = view.uncertainty  # from schema 1.7
    if not uncertainty or uncertainty.note:
        return ""
    return f"\nin brackets: {uncertainty.level:.0%} bootstrap intervals over {uncertainty.samples} samples"


def _evidence_lines(evidence: Verdict) -> list[str]:
    lines = [f"{'✓' if c.passed else '✗' if c.passed is not None else '?' if c.undetermined else '·'} "
             f"{c.name}: " + (f"{fmt_ci(c.value, c.ci)} ({c.rule})" if c.value is not None else
                              f"undetermined ({c.reason or c.rule})")
             + (f"\n  undetermined: {c.undetermined}" if c.undetermined else "")
             + (f"; about {c.samples_to_decide} samples would decide it" if c.samples_to_decide else "")
             for c in evidence.checks]
    lines += [text for text in (evidence.reason, evidence.scope) if text]
    if evidence.caveat:
        lines.append(f"[yellow]caveat:[/yellow] {evidence.caveat}")
    if evidence.control:
        lines.append(f"control: {evidence.control}")
    return lines


def verdict_table(verdict: Verdicts) -> Table:
    table = Table(title="Verdict", title_justify="left")
    for column in ("", "status", "evidence"):
        table.add_column(column)
    for key in ("ra", "nc"):
        evidence = getattr(verdict, key)
        table.add_row(key.upper(), f"[{STATUS_STYLE[evidence.status]}]{evidence.status}[/]",
                      "\n".join(_evidence_lines(evidence)))
    return table


def print_report(report: dict[str, Any] | ReportView, console: Console | None = None) -> None:
    console = console or Console()
    view = view_of(report)
    data = view.data
    console.print(f"[bold]{view.model_name}[/bold] on {data['name']} "
                  f"({data['samples']} {data['kind'] + ' ' if data.get('kind') else ''}samples, "
                  f"{view.environment['device']}, "
                  f"{view.environment['dtype']})")
    if view.auto_sampling:
        console.print(sampling_line(view.auto_sampling))
    if data.get("description"):  # reports before 1.7 have none
        console.print(f"data: {data['description']}" + (f": {data['reason']}" if data.get("reason") else ""),
                      style="dim")
    if view.sites or view.skipped:
        console.print(sites_table(view.sites, view.skipped, view.model["adapter"], console.width))
    if view.sites:
        console.print(spectra_table(view, console.width))
    if view.ra.ra2.groups:
        console.print(ra_table(view, console.width))
    if view.null.measured and view.sites:
        console.print(null_table(view, console.width))
    if view.nc_measured:
        console.print(nc_table(view.nc_measured, console.width, view.null.nc))
    console.print(verdict_table(view.verdict))
    if cost_rows(view.timings):
        console.print(cost_table(view.timings, console.width))
    for message in view.messages:
        console.print(f"[yellow]note:[/yellow] {message}")


def compare_table(comparison: dict[str, Any]) -> Table:
    """`compare`: one column per report, one row per measurement."""
    table = Table(title=f"Comparison of {len(comparison['reports'])} reports", title_justify="left")
    table.add_column("")
    for row in comparison["reports"]:
        table.add_column(row["label"], justify="right", overflow="fold")
    for row in comparison["table"]:
        if row["metric"].endswith("verdict"):
            key = "ra" if row["metric"].startswith("RA") else "nc"
            cells = [f"[{STATUS_STYLE[r[key]]}]{value}[/]" for r, value in zip(comparison["reports"], row["values"])]
        else:
            cells = [fmt_ci(value, ci) for value, ci in zip(row["values"], row.get("intervals") or [None] * len(row["values"]))]
        table.add_row(row["metric"], *cells)
    return table


def print_comparison(comparison: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    console.print(compare_table(comparison))
    if not comparison["families"]:
        console.print("RA4 across models: no family of models at two or more depths (model names that differ "
                      "only in their digits)", style="dim")
    for family in comparison["families"]:
        console.print(f"RA4 across models, {family['family']}: slope of log mean σ₁ against log L = "
                      f"{family['slope']:.3f} (≈ −1 under RA4; L = {', '.join(map(str, family['depths']))})")
