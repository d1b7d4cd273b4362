"""Console output: rich tables rendered from the report dict, so everything printed is also in the
JSON."""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from ra_probe.report.format import fmt

STATUS_STYLE = {"present": "bold green", "partial": "bold yellow", "absent": "bold red", "not_applicable": "dim"}


def sites_table(sites: list[dict[str, Any]], skipped: list[dict[str, Any]], adapter: str) -> Table:
    table = Table(title=f"Residual sites (adapter: {adapter})", title_justify="left")
    for column in ("site", "kind", "post", "group", "input shape", "verify error"):
        table.add_column(column)
    for s in sites:
        table.add_row(s["name"], s["kind"], fmt(s["post"]), str(s["group"]),
                      "×".join(map(str, s["input_shape"])), fmt(s["verify_error"], 2))
    for s in skipped:
        table.add_row(s["name"], "[red]skipped[/red]", "", "", "", s["reason"])
    return table


def spectra_table(report: dict[str, Any]) -> Table:
    ra3 = {s["site"]: s for s in report["metrics"]["ra3"]["sites"]}
    table = Table(title=f"Residual Jacobian spectra (mean over {report['data']['samples']} samples)",
                  title_justify="left")
    for column in ("site", "method", "σ₁", "σ₂", "σ₃", f"median rank (τ={report['metrics']['ra3']['tau']:g})",
                   "gap σ_C/σ_C+1", "max residual", "seconds"):
        table.add_column(column, justify="right" if column != "site" else "left")
    for s in report["sites"]:
        sv = s["singular_values"] + [None] * 3
        r = ra3[s["name"]]
        rank = f"{r['rank_median']:g}" if r["rank_median"] is not None else f"≥{r['rank_at_least']}"
        table.add_row(s["name"], s["method"], fmt(sv[0]), fmt(sv[1]), fmt(sv[2]), rank, fmt(r["gap_mean"]),
                      fmt(s["max_residual"], 2), f"{s['timing']['seconds']:.2f}")
    return table


def ra_table(report: dict[str, Any]) -> Table:
    metrics = report["metrics"]
    ra1 = {g["group"]: g for g in metrics["ra1"]["groups"]}
    table = Table(title="Residual Alignment by group", title_justify="left")
    for column in ("group", "sites", "RA1 linearity", "LSS", "step CV", "step cos", "RA2 score a_ij"):
        table.add_column(column)
    for g in metrics["ra2"]["groups"]:
        t = ra1[g["group"]]
        names = g["sites"]
        table.add_row(str(g["group"]), f"{names[0]} … {names[-1]} ({len(names)})", fmt(t["linearity"]),
                      fmt(t["lss"]), fmt(t["step_cv"]), fmt(t["step_cos"]), fmt(g["score"]))
    ra4 = metrics["ra4"]
    table.caption = f"RA4: L = {ra4['depth']}, L·mean σ₁ = {fmt(ra4['L_times_mean_sigma1'])}"
    return table


def nc_table(nc: dict[str, Any]) -> Table:
    table = Table(title=f"Neural Collapse ({nc['classes']} classes, {nc['samples']} samples, labels from "
                        f"{nc['labels_from']})", title_justify="left")
    for column in ("NC1", "NC2 equinorm μ", "NC2 equinorm w", "NC2 equiangular", "NC3", "NC4"):
        table.add_column(column, justify="right")
    table.add_row(*(fmt(nc[k]) for k in ("nc1", "nc2_equinorm_means", "nc2_equinorm_weights", "nc2_equiangular",
                                           "nc3", "nc4")))
    return table


def verdict_table(verdict: dict[str, Any]) -> Table:
    table = Table(title="Verdict", title_justify="left")
    for column in ("", "status", "evidence"):
        table.add_column(column)
    for key in ("ra", "nc"):
        evidence = verdict["evidence"][key]
        lines = [f"{'✓' if c['passed'] else '✗' if c['passed'] is not None else '·'} {c['name']}: "
                 f"{fmt(c['value'])} ({c['rule']})" for c in evidence["checks"]]
        if evidence.get("reason"):
            lines.append(evidence["reason"])
        status = verdict[key]
        table.add_row(key.upper(), f"[{STATUS_STYLE[status]}]{status}[/]", "\n".join(lines))
    return table


def print_report(report: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    console.print(f"[bold]{report['model']['name']}[/bold] on {report['data']['name']} "
                  f"({report['data']['samples']} samples, {report['environment']['device']}, "
                  f"{report['environment']['dtype']})")
    if report["sites"] or report["skipped"]:
        console.print(sites_table(report["sites"], report["skipped"], report["model"]["adapter"]))
    if report["sites"]:
        console.print(spectra_table(report))
    if report["metrics"]["ra2"]["groups"]:
        console.print(ra_table(report))
    if report["metrics"]["nc"] is not None:
        console.print(nc_table(report["metrics"]["nc"]))
    console.print(verdict_table(report["verdict"]))
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
            cells = [fmt(value) for value in row["values"]]
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
