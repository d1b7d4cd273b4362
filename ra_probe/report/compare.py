"""`ra-probe compare`: several reports side by side — verdicts, RA1–RA4 and NC — and RA4
across models: within a family of models at different depths, the log–log slope of σ₁ against the
depth L (≈ −1 under RA4). Reads report dicts only; the console and the HTML render the result."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ra_probe.metrics.ra import depth_slope
from ra_probe.metrics.results import Verdict
from ra_probe.report.headline import HEADLINE, headline, intervals
from ra_probe.report.view import view_of


def family_of(model: str) -> str:
    """Models that differ only in the digits of their names are one family at different depths
    ("timm/resnet18", "timm/resnet50" → "timm/resnet"; "my.py:net_d8", "my.py:net_d16" → "my.py:net_d")."""
    return re.sub(r"\d+", "", model)


def _labels(reports: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """The model names, with the file name added where two reports are of the same model."""
    names = [view_of(report).model_name for _, report in reports]
    return [f"{name} ({Path(source).name})" if names.count(name) > 1 else name
            for name, (source, _) in zip(names, reports)]


def _status(evidence: Verdict) -> str:
    return f"{evidence.status} ({evidence.reason})" if evidence.reason else evidence.status


def summary(report: dict[str, Any], label: str) -> dict[str, Any]:
    """The numbers `compare` shows for one report: its headline numbers, by their names, and more."""
    view = view_of(report)
    sigma1 = [s.sigma1_mean for s in view.ra.ra4.sites]
    return {
        "label": label, "model": view.model_name, "family": family_of(view.model_name),
        "ra": view.status("ra"), "nc": view.status("nc"),
        "ra_status": _status(view.verdict.ra), "nc_status": _status(view.verdict.nc),
        "samples": view.data["samples"], "classes": view.ra.ra3.classes,
        "group_scores": ", ".join(f"{g.group}: {g.score:.3f}" for g in view.ra.ra2.groups if g.score is not None) or None,
        "sigma1": sigma1, "sigma1_first": sigma1[0] if sigma1 else None, "sigma1_last": sigma1[-1] if sigma1 else None,
        **headline(view), "intervals": intervals(view),
    }


def _rows(*keys: str) -> tuple[tuple[str, str], ...]:
    return tuple((HEADLINE[key].label, key) for key in keys)


# (row label, summary key): the side-by-side table, one column per report
ROWS = (("RA verdict", "ra_status"), ("NC verdict", "nc_status"), ("samples", "samples"),
        *_rows("depth", "linearity", "alignment"), ("RA2 score by group", "group_scores"),
        *_rows("median_rank", "largest_rank"), ("classes C", "classes"), *_rows("rank_share"),
        ("σ₁ first site", "sigma1_first"), ("σ₁ last site", "sigma1_last"),
        *_rows("mean_sigma1", "L_times_mean_sigma1", "nc1", "nc2_equinorm_means", "nc2_equiangular", "nc3", "nc4"))


def compare(reports: list[tuple[str, dict[str, Any]]], labels: list[str] | None = None) -> dict[str, Any]:
    """Reports given as (file name, report dict): one summary per report, the side-by-side table
    (`table`: [{"metric", "values"}], values in report order) and, per family with at least two
    depths, the RA4 slope of log mean σ₁ against log L. `labels` name the columns (default: the model
    names, with the file name where two reports are of the same model)."""
    rows = [summary(report, label) for (_, report), label in zip(reports, labels or _labels(reports))]
    families = []
    for family in dict.fromkeys(row["family"] for row in rows):
        members = [r for r in rows if r["family"] == family and r["depth"] and r["mean_sigma1"]]
        depths = [r["depth"] for r in members]
        slope = depth_slope(depths, [r["mean_sigma1"] for r in members])
        if slope is not None:
            families.append({"family": family, "labels": [r["label"] for r in members], "depths": depths,
                             "mean_sigma1": [r["mean_sigma1"] for r in members], "slope": slope})
    return {"reports": rows, "files": [source for source, _ in reports],
            "table": [{"metric": label, "values": [row[key] for row in rows],
                       "intervals": [row["intervals"].get(key) for row in rows]} for label, key in ROWS],
            "families": families}
