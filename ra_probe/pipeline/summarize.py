"""Per-site spectra and RA1–RA4 over the samples, and NC on the classifier's features: plain numbers
from what was measured."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ra_probe.load.loaded import LoadedModel
from ra_probe.metrics import nc as nc_metrics
from ra_probe.metrics import ra as ra_metrics
from ra_probe.metrics import uncertainty
from ra_probe.metrics.uncertainty import Resamples, interval
from ra_probe.pipeline.measure import Measured
from ra_probe.pipeline.settings import Settings
from ra_probe.sites.capture import find_classifier
from ra_probe.sites.records import Group, VerifiedSite


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
    and timing (`sites`); the metrics: RA1–RA4, coupling and NC, each headline number with its confidence
    interval (`metrics`); and the headline numbers on each bootstrap resample (`replicates`, by
    (section, name) as in the metrics), for intervals of what combines them with another probe's."""

    sites: dict[str, dict[str, Any]]
    metrics: dict[str, Any]
    replicates: dict[tuple[str, str], torch.Tensor]


def summarize(groups: Sequence[Group], measured: Measured, loaded: LoadedModel, settings: Settings,
              labels: torch.Tensor | None = None, features: Measured | None = None,
              collapse_too: bool = True) -> Summary:
    """Per-site spectra and RA1–RA4 over samples, NC on the classifier features: those of `features` when
    given (a forward over more samples than the Jacobians were measured on), else of `measured`;
    `collapse_too` False leaves NC out (null)."""
    sites = [site for group in groups for site in group.sites]
    logits = torch.cat(measured.logits) if measured.logits else None
    num_classes = loaded.num_classes or (logits.shape[1] if logits is not None and logits.ndim == 2 else None)
    fully_connected = bool(sites) and all(len(s.in_shape) == 1 for s in sites)
    ordered_labels = None if labels is None else labels[measured.sample_order()]
    boot = _resamples(measured, logits, ordered_labels, settings)
    replicates: dict[tuple[str, str], torch.Tensor] = {}
    per_site, ra3_sites, ra4_sites, ranks, sigma1_values = {}, [], [], [], []
    for site in sites:
        S = torch.cat(measured.site_values("S", site.name))
        ranks.append(ra_metrics.numerical_rank(S, settings.tau).double())
        sigma1_values.append(S[:, 0].double())
        gap = ra_metrics.singular_gap(S, num_classes) if num_classes else None
        overlaps = measured.site_values("overlap", site.name)
        overlap = torch.cat(overlaps).mean(dim=0).tolist() if overlaps else None
        per_site[site.name] = {
            "singular_values": S.mean(dim=0).tolist(), "singular_values_std": S.std(dim=0, unbiased=False).tolist(),
            "singular_values_ci": None if boot is None else interval(boot.means(S.double()), boot.level),
            "max_residual": torch.cat(measured.site_values("residual", site.name)).max().item(),
            "method": measured.method(site.name), "uv_overlap": overlap, "timing": measured.timing(site.name),
        }
        ra3_sites.append({"site": site.name, **ra_metrics.rank_summary(S, settings.tau, num_classes),
                          "gap_mean": None if gap is None else gap.mean().item()})
        s1_mean, s1_std = _mean_std(S[:, 0])
        ra4_sites.append({"site": site.name, "depth": len(ra4_sites) + 1, "sigma1_mean": s1_mean, "sigma1_std": s1_std})

    ra1_groups, ra2_groups, coupling_groups, group_linearity, group_scores = [], [], [], [], []
    for group in groups:
        members = group.sites
        if len(members) < 2:
            continue
        entry, linearity = _trajectories(group.index, members, measured, boot)
        ra1_groups.append(entry)
        group_linearity.append(linearity)
        ra2_groups.append(_alignment(group.index, members, measured, boot, group_scores))
        if settings.coupling_k:
            coupling_groups.append(_coupling(group.index, [s.name for s in members], measured, settings.coupling_k))

    judged = [s["rank_le_classes"] for s in ra3_sites if s["rank_le_classes"] is not None]
    sigma1 = [s["sigma1_mean"] for s in ra4_sites]
    L = len(sites)
    if boot is not None:
        replicates.update(_ra_replicates(boot, group_linearity, group_scores, ranks, sigma1_values, ra3_sites,
                                         settings.k, num_classes))
    metrics = {
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
        "nc": None,
    }
    _attach_intervals(metrics, replicates, boot)
    if collapse_too:
        metrics["nc"], nc_replicates = collapse(loaded.module, features or measured, labels, settings)
        replicates.update(nc_replicates)
    metrics["uncertainty"] = _uncertainty(boot, settings, measured)
    return Summary(per_site, metrics, replicates)


def _trajectories(group: int, members: Sequence[VerifiedSite], measured: Measured, boot: Resamples | None
                  ) -> tuple[dict[str, Any], torch.Tensor | None]:
    """A group's RA1 entry (each trajectory statistic's mean and std over samples, linearity's interval)
    and its linearity on each resample."""
    chunks = measured.trajectories(group)
    stats = {k: torch.cat([t[k] for t in chunks]) for k in chunks[0]}
    entry = {"group": group, "sites": [s.name for s in members],
             "undefined_samples": int(stats["linearity"].isnan().sum())}
    for key, values in stats.items():
        entry[key], entry[f"{key}_std"] = _mean_std(values)
    linearity = None if boot is None else boot.means(stats["linearity"].double())
    entry["linearity_ci"] = None if linearity is None else interval(linearity, boot.level)
    entry["projection"] = measured.projection(group)
    return entry, linearity


def _alignment(group: int, members: Sequence[VerifiedSite], measured: Measured, boot: Resamples | None,
               group_scores: list) -> dict[str, Any]:
    """A group's RA2 entry: the a_ij matrix over the pairs measured, the group score, the K×K maps kept,
    and their intervals (the score's replicates appended to `group_scores`)."""
    names = [s.name for s in members]
    alignment = {(i, j): torch.cat(values) for i in names for j in names if i != j
                 for values in [measured.site_values("alignment", (i, j))] if values}
    matrix = _pair_matrix(names, alignment, diagonal=1.0)
    undefined = torch.stack(list(alignment.values())).isnan().any(dim=0)
    count = sum(len(t) for t in measured.site_values("S", names[0]))
    heatmaps = {f"{i}|{j}": (sum(measured.site_values("heatmap", (i, j))) / count).tolist()
                for i, j in ra_metrics.heatmap_pairs(names)}
    return {"group": group, "sites": names, "score": ra_metrics.pair_mean(matrix), "matrix": matrix,
            "pairs_measured": len(alignment), "pairs": len(names) * (len(names) - 1),
            "heatmaps": heatmaps, "undefined_samples": int(undefined.sum()),
            **_alignment_intervals(names, alignment, matrix, boot, group_scores)}


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
                     labels: torch.Tensor | None, boot: Resamples | None,
                     replicates: dict[tuple[str, str], torch.Tensor]) -> dict | None:
    """NC on the classifier's features with `labels` (in the order of the per-sample results), or the
    model's predictions; with each value's replicates on the bootstrap resamples put in `replicates`."""
    if measured.next_tokens and _causal_lm(module):
        return _next_token_collapse(module, measured)
    head = find_classifier(module)
    if head is None or not measured.features or logits is None or logits.ndim != 2:
        return None
    features = torch.cat(measured.features)
    if features.shape[1] != head.in_features or logits.shape[1] != head.out_features:
        return None
    source = "data" if labels is not None else "predictions"
    labels = logits.argmax(dim=1) if labels is None else labels
    weight = head.weight.detach().cpu()
    result = nc_metrics.neural_collapse(features, labels, weight, logits=logits)
    result["labels_from"] = source
    if boot is not None and result["undetermined"] is None:
        values = [nc_metrics.neural_collapse(features[i], labels[i], weight, logits=logits[i]) for i in boot.index]
        for key in NC_VALUES:
            replicates["nc", key] = torch.tensor([_nan_if_none(v[key]) for v in values], dtype=torch.float64)
    return result


def collapse(module: torch.nn.Module, measured: Measured, labels: torch.Tensor | None,
             settings: Settings) -> tuple[dict | None, dict[tuple[str, str], torch.Tensor]]:
    """NC alone, from a forward's classifier features (no Jacobian: `measure` with no sites), with its
    intervals; and its values on each bootstrap resample."""
    logits = torch.cat(measured.logits) if measured.logits else None
    ordered = None if labels is None else labels[measured.sample_order()]
    boot = _resamples(measured, logits, ordered, settings)
    replicates: dict[tuple[str, str], torch.Tensor] = {}
    metrics = {"nc": _neural_collapse(module, measured, logits, ordered, boot, replicates)}
    _attach_intervals(metrics, replicates, boot)
    return metrics["nc"], replicates


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
    result["interval_note"] = ("no intervals: the tokens of one text are not independent samples, and a "
                               "resample of texts is not implemented")
    return result


NC_VALUES = ("nc1", "nc2_equinorm_means", "nc2_equinorm_weights", "nc2_equiangular", "nc3", "nc4")
# the headline numbers given an interval: (section, name) of the metrics dict
INTERVALS = (("ra1", "mean_linearity"), ("ra2", "mean_score"), ("ra3", "share_rank_le_classes"),
             ("ra3", "median_rank"), ("ra4", "L_times_mean_sigma1"), *(("nc", key) for key in NC_VALUES))


def _nan_if_none(value: float | None) -> float:
    return math.nan if value is None else value


def _resamples(measured: Measured, logits: torch.Tensor | None, labels: torch.Tensor | None,
               settings: Settings) -> Resamples | None:
    """The probe's bootstrap resamples, within each class: of the labels, else of the model's predictions
    (a model without a classifier head: unstratified)."""
    n = measured.samples
    if not n:
        return None
    strata = labels if labels is not None else (logits.argmax(dim=1) if logits is not None and logits.ndim == 2
                                                 and len(logits) == n else None)
    return uncertainty.resamples(n, strata, settings.resamples, settings.confidence, settings.seed)


def _alignment_intervals(names: list[str], alignment: dict[tuple[str, str], torch.Tensor],
                         matrix: list[list], boot: Resamples | None, group_scores: list) -> dict[str, Any]:
    """A group's RA2 intervals: each measured a_ij's (`matrix_ci`, [low, high] or None) and the group
    score's (`score_ci`), computed on the same resamples; the score's replicates appended to `group_scores`."""
    if boot is None or not alignment:
        group_scores.append(None)
        return {"score_ci": None, "matrix_ci": None}
    index = {name: a for a, name in enumerate(names)}
    pairs = list(alignment)
    means = torch.stack([boot.means(alignment[pair].double()) for pair in pairs], dim=1)  # (R, pairs)
    weights = ra_metrics.pair_weights(matrix)
    score = means @ torch.tensor([weights[index[i], index[j]] for i, j in pairs], dtype=torch.float64)
    group_scores.append(score)
    bounds = {pair: interval(means[:, p], boot.level) for p, pair in enumerate(pairs)}
    return {"score_ci": interval(score, boot.level),
            "matrix_ci": [[bounds.get((i, j)) for j in names] for i in names]}


def _ra_replicates(boot: Resamples, group_linearity: list, group_scores: list, ranks: list[torch.Tensor],
                   sigma1: list[torch.Tensor], ra3_sites: list[dict], k: int,
                   classes: int | None) -> dict[tuple[str, str], torch.Tensor]:
    """The RA headline numbers on each resample, computed as the point values are."""
    out = {}
    if group_linearity and None not in group_linearity:
        out["ra1", "mean_linearity"] = torch.stack(group_linearity).mean(dim=0)
    if group_scores and None not in group_scores:
        out["ra2", "mean_score"] = torch.stack(group_scores).mean(dim=0)
    if ranks:
        medians = torch.stack([boot.medians(rank) for rank in ranks])  # (sites, R); a rank reaching k is ≥ k
        # as `median_rank`: known while the upper middle site is below k (saturated sites sort last)
        known = medians.sort(dim=0).values[len(ranks) // 2] < k
        out["ra3", "median_rank"] = medians.quantile(0.5, dim=0).masked_fill(~known, math.nan)
        judged = [a for a, site in enumerate(ra3_sites) if site["rank_le_classes"] is not None]
        if classes is not None and judged:
            out["ra3", "share_rank_le_classes"] = (medians[judged] <= classes).double().mean(dim=0)
        out["ra4", "L_times_mean_sigma1"] = torch.stack([boot.means(s) for s in sigma1]).sum(dim=0)
    return out


def _attach_intervals(metrics: dict[str, Any], replicates: dict[tuple[str, str], torch.Tensor],
                      boot: Resamples | None) -> None:
    """`<name>_ci` beside each headline number: [low, high], or None where it has no interval."""
    for section, name in INTERVALS:
        if metrics.get(section) is None:
            continue
        values = replicates.get((section, name))
        metrics[section][f"{name}_ci"] = None if boot is None or values is None else interval(values, boot.level)
    if metrics["nc"] is not None and boot is not None and ("nc", "nc1") in replicates:
        nc2 = torch.maximum(replicates["nc", "nc2_equinorm_means"], replicates["nc", "nc2_equiangular"])
        metrics["nc"]["nc2_ci"] = interval(nc2, boot.level)


def _uncertainty(boot: Resamples | None, settings: Settings, measured: Measured) -> dict[str, Any]:
    """How the intervals were made, recorded in the report."""
    samples = measured.samples
    if boot is None:
        return {"level": settings.confidence, "resamples": settings.resamples, "samples": samples,
                "stratified": False, "method": uncertainty.METHOD,
                "note": "no intervals: one sample says nothing of its spread" if samples == 1 else "nothing measured"}
    return {"level": boot.level, "resamples": len(boot.index), "samples": boot.samples, "stratified": boot.stratified,
            "method": uncertainty.METHOD, "note": None}
