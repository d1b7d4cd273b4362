"""Per-site spectra and RA1–RA4 over the samples, and NC on the classifier's features: plain numbers
from what was measured."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ra_probe.load.models import LoadedModel
from ra_probe.metrics import nc as nc_metrics
from ra_probe.metrics import ra as ra_metrics
from ra_probe.pipeline.measure import Measured, groups_of
from ra_probe.pipeline.settings import Settings
from ra_probe.sites.capture import find_classifier
from ra_probe.sites.records import Site


def _mean_std(values: torch.Tensor) -> tuple[float, float]:
    """Mean and (biased) standard deviation over the defined values (NaN marks an undefined sample,
    e.g. one whose branches are exactly zero); NaN when none is defined."""
    defined = values[~values.isnan()]
    if not defined.numel():
        return math.nan, math.nan
    return defined.mean().item(), (defined.std(unbiased=False).item() if defined.numel() > 1 else 0.0)


@dataclass
class Summary:
    """What a probe's measurements come to: by site name, each site's mean spectrum, residual, solver
    and timing (`sites`); and the metrics: RA1–RA4, coupling and NC (`metrics`)."""

    sites: dict[str, dict[str, Any]]
    metrics: dict[str, Any]


def summarize(sites: list[Site], measured: Measured, loaded: LoadedModel, settings: Settings,
              labels: torch.Tensor | None = None) -> Summary:
    """Per-site spectra and RA1–RA4 over samples, NC on the classifier features."""
    logits = torch.cat(measured.logits) if measured.logits else None
    num_classes = loaded.num_classes or (logits.shape[1] if logits is not None and logits.ndim == 2 else None)
    fully_connected = bool(sites) and all(len(s.in_shape) == 1 for s in sites)
    per_site, ra3_sites, ra4_sites = {}, [], []
    for site in sites:
        S = torch.cat(measured.site_values("S", site.name))
        gap = ra_metrics.singular_gap(S, num_classes) if num_classes else None
        overlaps = measured.site_values("overlap", site.name)
        overlap = torch.cat(overlaps).mean(dim=0).tolist() if overlaps else None
        per_site[site.name] = {
            "singular_values": S.mean(dim=0).tolist(), "singular_values_std": S.std(dim=0, unbiased=False).tolist(),
            "max_residual": torch.cat(measured.site_values("residual", site.name)).max().item(),
            "method": measured.method(site.name), "uv_overlap": overlap, "timing": measured.timing(site.name),
        }
        ra3_sites.append({"site": site.name, **ra_metrics.rank_summary(S, settings.tau, num_classes),
                          "gap_mean": None if gap is None else gap.mean().item()})
        s1_mean, s1_std = _mean_std(S[:, 0])
        ra4_sites.append({"site": site.name, "depth": len(ra4_sites) + 1, "sigma1_mean": s1_mean, "sigma1_std": s1_std})

    ra1_groups, ra2_groups, coupling_groups = [], [], []
    for group, members in groups_of(sites).items():
        if len(members) < 2:
            continue
        chunks = measured.trajectories(group)
        stats = {k: torch.cat([t[k] for t in chunks]) for k in chunks[0]}
        entry = {"group": group, "sites": [s.name for s in members],
                 "undefined_samples": int(stats["linearity"].isnan().sum())}
        for key, values in stats.items():
            entry[key], entry[f"{key}_std"] = _mean_std(values)
        entry["projection"] = measured.projection(group)
        ra1_groups.append(entry)
        names = [s.name for s in members]
        alignment = {(i, j): torch.cat(values) for i in names for j in names if i != j
                     for values in [measured.site_values("alignment", (i, j))] if values}
        matrix = _pair_matrix(names, alignment, diagonal=1.0)
        undefined = torch.stack(list(alignment.values())).isnan().any(dim=0)
        count = sum(len(t) for t in measured.site_values("S", names[0]))
        heatmaps = {f"{i}|{j}": (sum(measured.site_values("heatmap", (i, j))) / count).tolist()
                    for i, j in ra_metrics.heatmap_pairs(names)}
        ra2_groups.append({"group": group, "sites": names, "score": ra_metrics.pair_mean(matrix), "matrix": matrix,
                           "pairs_measured": len(alignment), "pairs": len(names) * (len(names) - 1),
                           "heatmaps": heatmaps, "undefined_samples": int(undefined.sum())})
        if settings.coupling_k:
            coupling_groups.append(_coupling(group, names, measured, settings.coupling_k))

    judged = [s["rank_le_classes"] for s in ra3_sites if s["rank_le_classes"] is not None]
    sigma1 = [s["sigma1_mean"] for s in ra4_sites]
    L = len(sites)
    return Summary(per_site, {
        "ra1": {"groups": ra1_groups, "mean_linearity": _mean_or_none([g["linearity"] for g in ra1_groups])},
        "ra2": {"groups": ra2_groups, "mean_score": _mean_or_none([g["score"] for g in ra2_groups]),
                "K": settings.align_k or settings.k},
        "ra3": {"sites": ra3_sites, "tau": settings.tau, "classes": num_classes, "fully_connected": fully_connected,
                "judged": fully_connected and bool(judged),
                "undetermined": sorted({s["undetermined"] for s in ra3_sites if s["undetermined"]}),
                "share_rank_le_classes": sum(judged) / len(judged) if judged else None,
                "median_rank": ra_metrics.median_rank(ra3_sites, settings.k)},
        "ra4": {"sites": ra4_sites, "depth": L, "L_times_mean_sigma1": sum(sigma1) if L else None,
                "zero_sites": [s["site"] for s in ra4_sites if s["sigma1_mean"] == 0.0]},
        "coupling": {"K": list(settings.coupling_k), "tokens": settings.tokens, "groups": coupling_groups},
        "nc": _neural_collapse(loaded.module, measured, logits, labels),
    })


def _coupling(group: int, names: list[str], measured: Measured, ks: tuple[int, ...]) -> dict[str, Any]:
    """Block coupling of a group for each K: the matrix c_ij (mean over samples; 0 on the diagonal,
    where U_iᵀ J_i V_i = S_i) and its mean over the pairs i ≠ j (null for a K above the group's sites'
    singular triplets)."""
    matrices, means = {}, {}
    for K in ks:
        chunks = {(i, j): torch.cat(values) for i in names for j in names if i != j
                  for values in [measured.site_values("coupling", (i, j, K))] if values}
        if not chunks:  # K above the group's sites' singular triplets
            matrices[str(K)], means[str(K)] = None, None
            continue
        matrices[str(K)] = _pair_matrix(names, chunks, diagonal=0.0)
        # a pair whose J_i is exactly zero has no coupling: left out of the mean as if not measured
        means[str(K)] = ra_metrics.pair_mean([[None if v is None or math.isnan(v) else v for v in row]
                                              for row in matrices[str(K)]])
    return {"group": group, "sites": names, "matrices": matrices, "mean": means}


def _pair_matrix(names: list[str], values: dict[tuple[str, str], torch.Tensor], diagonal: float) -> list[list]:
    """A group's site × site matrix of per-sample values averaged over samples: `diagonal` on the
    diagonal, None for a pair not measured (a large group's RA2 measures a sample of its pairs)."""
    return [[diagonal if i == j else _mean_std(values[i, j])[0] if (i, j) in values else None for j in names]
            for i in names]


def _mean_or_none(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _neural_collapse(module: torch.nn.Module, measured: Measured, logits: torch.Tensor | None,
                     labels: torch.Tensor | None) -> dict | None:
    if measured.next_tokens and _causal_lm(module):
        return _next_token_collapse(module, measured)
    head = find_classifier(module)
    if head is None or not measured.features or logits is None or logits.ndim != 2:
        return None
    features = torch.cat(measured.features)
    if features.shape[1] != head.in_features or logits.shape[1] != head.out_features:
        return None
    source = "data" if labels is not None else "predictions"
    labels = logits.argmax(dim=1) if labels is None else labels[measured.sample_order()]
    result = nc_metrics.neural_collapse(features, labels, head.weight.detach().cpu(), logits=logits)
    result["labels_from"] = source
    return result


def _causal_lm(module: torch.nn.Module) -> bool:
    """A Hugging Face model that generates the next token of its own input (not an encoder-decoder,
    whose logits follow its decoder's inputs, nor a masked LM)."""
    can_generate = getattr(module, "can_generate", None)
    config = getattr(module, "config", None)
    return callable(can_generate) and bool(can_generate()) and not getattr(config, "is_encoder_decoder", False)


def _next_token_collapse(module: torch.nn.Module, measured: Measured) -> dict | None:
    """NC of a causal LM with its tokens as samples and their next tokens as classes, against the LM
    head (`get_output_embeddings`: tied to the input embeddings or not)."""
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else find_classifier(module)
    if head is None or getattr(head, "weight", None) is None:
        return None
    features, labels, predictions = (torch.cat(parts) for parts in zip(*measured.next_tokens))
    result = nc_metrics.neural_collapse(features, labels, head.weight.detach().cpu(), predictions)
    result["labels_from"] = "next tokens"
    return result
