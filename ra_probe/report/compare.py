"""`ra-probe compare`: several reports side by side — verdicts, RA1–RA4 and NC — and RA4
across models: within a family of models at different depths, the log–log slope of σ₁ against the
depth L (≈ −1 under RA4). Reads report dicts only; the console and the HTML render the result."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ra_probe.metrics.ra import depth_slope, median_rank


def family_of(model: str) -> str:
    """Models that differ only in the digits of their names are one family at different depths
    ("timm/resnet18", "timm/resnet50" → "timm/resnet"; "my.py:net_d8", "my.py:net_d16" → "my.py:net_d")."""
    return re.sub(r"\d+", "", model)


def _labels(reports: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """The model names, with the file name added where two reports are of the same model."""
    names = [report["model"]["name"] for _, report in reports]
    return [f"{name} ({Path(source).name})" if names.count(name) > 1 else name
            for name, (source, _) in zip(names, reports)]


def _status(evidence: dict[str, Any]) -> str:
    reason = evidence.get("reason")
    return f"{evidence['status']} ({reason})" if reason else evidence["status"]


def _positive_mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None and v > 0]
    return sum(kept) / len(kept) if kept else None


def summary(report: dict[str, Any], label: str) -> dict[str, Any]:
    """The numbers `compare` shows for one report."""
    metrics, evidence = report["metrics"], report["verdict"]["evidence"]
    sigma1 = [s["sigma1_mean"] for s in metrics["ra4"]["sites"]]
    ranks = [s["rank_median"] for s in metrics["ra3"]["sites"]]
    nc = metrics["nc"] or {}
    return {
        "label": label, "model": report["model"]["name"], "family": family_of(report["model"]["name"]),
        "ra": report["verdict"]["ra"], "nc": report["verdict"]["nc"],
        "ra_status": _status(evidence["ra"]), "nc_status": _status(evidence["nc"]),
        "samples": report["data"]["samples"], "depth": metrics["ra4"]["depth"],
        "linearity": metrics["ra1"]["mean_linearity"], "alignment": metrics["ra2"]["mean_score"],
        "group_scores": ", ".join(f"{g['group']}: {g['score']:.3f}" for g in metrics["ra2"]["groups"]
                                  if g["score"] is not None) or None,
        "rank_median": median_rank(metrics["ra3"]["sites"], report["settings"]["k"]),
        # a site whose rank reaches k has no known rank: no maximum over sites then
        "rank_max": max(ranks) if ranks and None not in ranks else None,
        "classes": metrics["ra3"]["classes"], "rank_share": metrics["ra3"]["share_rank_le_classes"],
        "sigma1": sigma1, "sigma1_first": sigma1[0] if sigma1 else None, "sigma1_last": sigma1[-1] if sigma1 else None,
        "mean_sigma1": _positive_mean(sigma1), "L_times_mean_sigma1": metrics["ra4"]["L_times_mean_sigma1"],
        **{key: nc.get(key) for key in ("nc1", "nc2_equinorm_means", "nc2_equiangular", "nc3", "nc4")},
    }


# (row label, summary key): the side-by-side table, one column per report
ROWS = (("RA verdict", "ra_status"), ("NC verdict", "nc_status"), ("samples", "samples"),
        ("sites L", "depth"), ("RA1 mean linearity", "linearity"), ("RA2 mean score a_ij", "alignment"),
        ("RA2 score by group", "group_scores"), ("RA3 median rank", "rank_median"),
        ("RA3 largest rank", "rank_max"), ("classes C", "classes"), ("RA3 share rank ≤ C", "rank_share"),
        ("σ₁ first site", "sigma1_first"), ("σ₁ last site", "sigma1_last"), ("mean σ₁", "mean_sigma1"),
        ("RA4 L·mean σ₁", "L_times_mean_sigma1"), ("NC1", "nc1"), ("NC2 equinorm μ", "nc2_equinorm_means"),
        ("NC2 equiangular", "nc2_equiangular"), ("NC3", "nc3"), ("NC4", "nc4"))


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
            "table": [{"metric": label, "values": [row[key] for row in rows]} for label, key in ROWS],
            "families": families}
