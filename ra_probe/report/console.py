"""Console output: rich tables rendered from the report dict, so everything printed is also in the
JSON."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ra_probe.report.format import cost_caption, cost_rows, fmt, fmt_ci, null_rows, sampling_line

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


def spectra_table(report: dict[str, Any], width: int = 120) -> Table:
    ra3 = {s["site"]: s for s in report["metrics"]["ra3"]["sites"]}
    columns = [Column("site"), Column("σ₁", "right"), Column("rank", "right"), Column("σ₂", "right", True),
               Column("gap", "right", True), Column("residual", "right", True), Column("method", optional=True),
               Column("σ₃", "right", True), Column("seconds", "right", True)]
    rows = []
    for s in report["sites"]:
        sv = s["singular_values"] + [None] * 3
        r = ra3[s["name"]]
        rank = f"{r['rank_median']:g}" if r["rank_median"] is not None else f"≥{r['rank_at_least']}"
        rows.append([s["name"], fmt(sv[0]), rank, fmt(sv[1]), fmt(r["gap_mean"]), fmt(s["max_residual"], 2),
                     s["method"], fmt(sv[2]), f"{s['timing']['seconds']:.2f}"])
    classes, k = report["metrics"]["ra3"]["classes"], report["settings"]["k"]
    gap = "σ_C/σ_C+1" + (f" (needs k > C = {classes}: not measured)" if classes and k <= classes else "")
    caption = (f"rank: median #{{σ > τσ₁}}, τ = {report['metrics']['ra3']['tau']:g}; gap: {gap}; "
               "residual: largest residual bound")
    return fitted(f"Residual Jacobian spectra (mean over {report['data']['samples']} samples)", columns, rows,
                  width, caption)


def ra_table(report: dict[str, Any], width: int = 120) -> Table:
    metrics = report["metrics"]
    ra1 = {g["group"]: g for g in metrics["ra1"]["groups"]}
    columns = [Column("group"), Column("first site"), Column("last site"), Column("sites", "right"),
               Column("RA2 a_ij", "right"), Column("RA1 linearity", "right"), Column("LSS", "right", True),
               Column("step CV", "right", True), Column("step cos", "right", True)]
    coupling = {g["group"]: g["mean"] for g in metrics.get("coupling", {}).get("groups", [])}  # from schema 1.5
    ks = [str(K) for K in metrics.get("coupling", {}).get("K", [])]
    columns += [Column(f"coupling K={K}", "right") for K in ks]
    rows, sampled = [], []
    for g in metrics["ra2"]["groups"]:
        t = ra1[g["group"]]
        names = g["sites"]
        estimated = g.get("pairs_measured", 0) < g.get("pairs", 0)  # from schema 1.6
        sampled += [f"group {g['group']}: {g['pairs_measured']} of {g['pairs']}"] if estimated else []
        rows.append([str(g["group"]), names[0], names[-1], str(len(names)),
                     ("≈" if estimated else "") + fmt_ci(g["score"], g.get("score_ci")),
                     fmt_ci(t["linearity"], t.get("linearity_ci")),
                     fmt(t["lss"]), fmt(t["step_cv"]), fmt(t["step_cos"])]
                    + [fmt(coupling.get(g["group"], {}).get(K)) for K in ks])
    ra4 = metrics["ra4"]
    caption = (f"RA4: L = {ra4['depth']}, L·mean σ₁ = {fmt_ci(ra4['L_times_mean_sigma1'], ra4.get('L_times_mean_sigma1_ci'))}"
               + _level(metrics))
    if sampled:
        caption += f"\n≈ estimated from a sample of the pairs ({'; '.join(sampled)}); --align-pairs all measures every pair"
    return fitted("Residual Alignment by group", columns, rows, width, caption)


def null_table(metrics: dict[str, Any], width: int = 120) -> Table:
    null = metrics["null"]
    columns = [Column(""), Column("model", "right"), Column("random init", "right"), Column("ratio", "right")]
    return fitted("Against the same architecture at random init", columns, null_rows(metrics), width,
                  f"{null['init']}, seed {null['seed']}, {null['samples']} samples" + _level(metrics))


def cost_table(timings: dict[str, Any], width: int = 120) -> Table:
    columns = [Column(""), Column("predicted", "right"), Column("measured", "right"),
               Column("measured / predicted", "right", True)]
    return fitted("Cost", columns, cost_rows(timings), width, cost_caption(timings))


NC_ROWS = (("NC1", "nc1"), ("NC2 μ norms", "nc2_equinorm_means"), ("NC2 angles", "nc2_equiangular"),
           ("NC3", "nc3"), ("NC4", "nc4"), ("NC2 w norms", "nc2_equinorm_weights"))


def nc_table(nc: dict[str, Any], width: int = 120, at_init: dict[str, Any] | None = None) -> Table:
    """NC1–NC4, one row each: the value, its interval and, when measured, its value at random init."""
    columns = [Column(""), Column("value", "right"), Column("interval", "right")]
    columns += [Column("random init", "right")] if at_init else []
    rows = [[label, fmt(nc[key]), "–" if not nc.get(f"{key}_ci") else f"{fmt(nc[f'{key}_ci'][0])}–{fmt(nc[f'{key}_ci'][1])}"]
            + ([fmt(at_init.get(key))] if at_init else []) for label, key in NC_ROWS]
    return fitted(f"Neural Collapse ({nc['classes']} classes, {nc['samples']} samples, labels from "
                  f"{nc['labels_from']})", columns, rows, width, nc.get("interval_note"))


def _level(metrics: dict[str, Any]) -> str:
    """The intervals' caption: their level and how many samples they come from."""
    uncertainty = metrics.get("uncertainty")  # from schema 1.7
    if not uncertainty or uncertainty.get("note"):
        return ""
    return f"\nin brackets: {uncertainty['level']:.0%} bootstrap intervals over {uncertainty['samples']} samples"


def verdict_table(verdict: dict[str, Any]) -> Table:
    table = Table(title="Verdict", title_justify="left")
    for column in ("", "status", "evidence"):
        table.add_column(column)
    for key in ("ra", "nc"):
        evidence = verdict["evidence"][key]
        lines = [f"{'✓' if c['passed'] else '✗' if c['passed'] is not None else '?' if c.get('undetermined') else '·'} "
                 f"{c['name']}: " + (f"{fmt_ci(c['value'], c.get('ci'))} ({c['rule']})" if c["value"] is not None else
                                     f"undetermined ({c.get('reason') or c['rule']})")
                 + (f"\n  undetermined: {c['undetermined']}" if c.get("undetermined") else "")
                 + (f"; about {c['samples_to_decide']} samples would decide it" if c.get("samples_to_decide") else "")
                 for c in evidence["checks"]]
        lines += [text for text in (evidence.get("reason"), evidence.get("scope")) if text]
        if evidence.get("caveat"):
            lines.append(f"[yellow]caveat:[/yellow] {evidence['caveat']}")
        if evidence.get("control"):
            lines.append(f"control: {evidence['control']}")
        status = verdict[key]
        table.add_row(key.upper(), f"[{STATUS_STYLE[status]}]{status}[/]", "\n".join(lines))
    return table


def print_report(report: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    data = report["data"]
    console.print(f"[bold]{report['model']['name']}[/bold] on {data['name']} "
                  f"({data['samples']} {data['kind'] + ' ' if data.get('kind') else ''}samples, "
                  f"{report['environment']['device']}, "
                  f"{report['environment']['dtype']})")
    sampling = report["metrics"].get("sampling")  # from schema 1.7
    if sampling and sampling["mode"] == "auto":
        console.print(sampling_line(sampling))
    if data.get("description"):  # reports before 1.7 have none
        console.print(f"data: {data['description']}" + (f": {data['reason']}" if data.get("reason") else ""),
                      style="dim")
    if report["sites"] or report["skipped"]:
        console.print(sites_table(report["sites"], report["skipped"], report["model"]["adapter"], console.width))
    if report["sites"]:
        console.print(spectra_table(report, console.width))
    if report["metrics"]["ra2"]["groups"]:
        console.print(ra_table(report, console.width))
    if report["metrics"].get("null", {}).get("status") == "measured" and report["sites"]:  # reports before 1.4 have none
        console.print(null_table(report["metrics"], console.width))
    if report["metrics"]["nc"] is not None and not report["metrics"]["nc"].get("undetermined"):
        console.print(nc_table(report["metrics"]["nc"], console.width, report["metrics"].get("null", {}).get("nc")))
    console.print(verdict_table(report["verdict"]))
    if cost_rows(report["timings"]):
        console.print(cost_table(report["timings"], console.width))
    for message in report["messages"]:
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
