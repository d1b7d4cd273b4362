"""Per-site spectra and RA1–RA4 over the samples, and NC on the classifier's features: plain numbers
from what was measured."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ra_probe.load.loaded import LoadedModel
from ra_probe.metrics import nc as nc_metrics
from ra_probe.metrics import ra as ra_metrics
from ra_probe.metrics import uncertainty
from ra_probe.metrics.results import (
    NC_VALUES,
    RA1,
    RA2,
    RA3,
    RA4,
    Alignment,
    Coupling,
    CouplingResults,
    NCResults,
    RAResults,
    SiteRank,
    SiteSigma,
    SiteSpectrum,
    Trajectories,
    Uncertainty,
)
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
    """What a probe's measurements come to: each site's spectrum by site name (`sites`); RA1–RA4 and
    the coupling (`ra`); NC (`nc`, None without a classifier head or when left out); how the intervals
    were made (`uncertainty`); and the headline numbers on each bootstrap resample (`replicates`, by
    `RAHeadline` section, "rank_share" and NC value name), for intervals of what combines them with
    another probe's."""

    sites: dict[str, SiteSpectrum]
    ra: RAResults
    nc: NCResults | None
    uncertainty: Uncertainty
    replicates: dict[str, torch.Tensor]


def summarize(groups: Sequence[Group], measured: Measured, loaded: LoadedModel, settings: Settings,
              labels: torch.Tensor | None = None, features: Measured | None = None,
              collapse_too: bool = True) -> Summary:
    """Per-site spectra and RA1–RA4 over samples, NC on the classifier features: those of `features` when
    given (a forward over more samples than the Jacobians were measured on), else of `measured`;
    `collapse_too` False leaves NC out (null)."""
    sites = [site for group in groups for site in group.sites]
    logits = torch.cat(measured.logits) if measured.logits else None
    num_classes = loaded.num_classes or (logits.shape[1] if logits is not None and logits.ndim == 2 else None)
    ordered_labels = None if labels is None else labels[measured.sample_order()]
    boot = _resamples(measured, logits, ordered_labels, settings)
    per_site, ra3_sites, ra4_sites, ranks, sigma1_values = {}, [], [], [], []
    for site in sites:
        S = torch.cat(measured.site_values("S", site.name))
        ranks.append(ra_metrics.numerical_rank(S, settings.tau).double())
        sigma1_values.append(S[:, 0].double())
        gap = ra_metrics.singular_gap(S, num_classes) if num_classes else None
        overlaps = measured.site_values("overlap", site.name)
        per_site[site.name] = SiteSpectrum(
            S.mean(dim=0).tolist(), S.std(dim=0, unbiased=False).tolist(),
            None if boot is None else interval(boot.means(S.double()), boot.level),
            torch.cat(measured.site_values("residual", site.name)).max().item(), measured.method(site.name),
            torch.cat(overlaps).mean(dim=0).tolist() if overlaps else None, measured.timing(site.name))
        ra3_sites.append(SiteRank(site.name, **ra_metrics.rank_summary(S, settings.tau, num_classes),
                                  gap_mean=None if gap is None else gap.mean().item()))
        ra4_sites.append(SiteSigma(site.name, len(ra4_sites) + 1, *_mean_std(S[:, 0])))
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
    replicates: dict[str, torch.Tensor] = {}
    if boot is not None:
        replicates.update(_ra_replicates(boot, group_linearity, group_scores, ranks, sigma1_values, ra3_sites,
                                         settings.k, num_classes))
    ra = _ra_results(sites, ra1_groups, ra2_groups, ra3_sites, ra4_sites, coupling_groups, num_classes, settings,
                     lambda key: _ci(replicates, key, boot))
    nc = None
    if collapse_too:
        nc, nc_replicates = collapse(loaded.module, features or measured, labels, settings)
        replicates.update(nc_replicates)
    return Summary(per_site, ra, nc, _uncertainty(boot, settings, measured), replicates)


def _ra_results(sites: list[VerifiedSite], ra1_groups: list[Trajectories], ra2_groups: list[Alignment],
                ra3_sites: list[SiteRank], ra4_sites: list[SiteSigma], coupling_groups: list[Coupling],
                num_classes: int | None, settings: Settings, ci: Callable[[str], list | None]) -> RAResults:
    """RA1–RA4 and the coupling over the network from its groups' and sites' entries; `ci` gives the
    interval of a headline number by its replicates' key."""
    fully_connected = bool(sites) and all(len(s.in_shape) == 1 for s in sites)
    judged = [s.rank_le_classes for s in ra3_sites if s.rank_le_classes is not None]
    sigma1 = [s.sigma1_mean for s in ra4_sites]
    return RAResults(
        RA1(ra1_groups, _mean_or_none([g.linearity for g in ra1_groups]), ci("ra1")),
        RA2(ra2_groups, _mean_or_none([g.score for g in ra2_groups]), settings.alignment_k(), ci("ra2")),
        RA3(ra3_sites, settings.tau, num_classes, fully_connected, fully_connected and bool(judged),
            sorted({s.undetermined for s in ra3_sites if s.undetermined}),
            sum(judged) / len(judged) if judged else None,
            ra_metrics.median_rank([dataclasses.asdict(s) for s in ra3_sites], settings.k), ci("rank_share"),
            ci("ra3")),
        RA4(ra4_sites, len(sites), sum(sigma1) if sites else None,
            [s.site for s in ra4_sites if s.sigma1_mean == 0.0], ci("ra4")),
        CouplingResults(list(settings.coupling_k), settings.tokens, coupling_groups))


def _trajectories(group: int, members: Sequence[VerifiedSite], measured: Measured, boot: Resamples | None
                  ) -> tuple[Trajectories, torch.Tensor | None]:
    """A group's RA1 (each trajectory statistic's mean and std over samples, linearity's interval) and
    its linearity on each resample."""
    chunks = measured.trajectories(group)
    stats = {k: torch.cat([t[k] for t in chunks]) for k in chunks[0]}
    spread = {}
    for key, values in stats.items():
        spread[key], spread[f"{key}_std"] = _mean_std(values)
    linearity = None if boot is None else boot.means(stats["linearity"].double())
    return Trajectories(group, [s.name for s in members], int(stats["linearity"].isnan().sum()), **spread,
                        linearity_ci=None if linearity is None else interval(linearity, boot.level),
                        projection=measured.projection(group)), linearity


def _alignment(group: int, members: Sequence[VerifiedSite], measured: Measured, boot: Resamples | None,
               group_scores: list) -> Alignment:
    """A group's RA2: the a_ij matrix over the pairs measured, the group score, the K×K maps kept,
    and their intervals (the score's replicates appended to `group_scores`)."""
    names = [s.name for s in members]
    alignment = {(i, j): torch.cat(values) for i in names for j in names if i != j
                 for values in [measured.site_values("alignment", (i, j))] if values}
    matrix = _pair_matrix(names, alignment, diagonal=1.0)
    undefined = torch.stack(list(alignment.values())).isnan().any(dim=0)
    count = sum(len(t) for t in measured.site_values("S", names[0]))
    heatmaps = {f"{i}|{j}": (sum(measured.site_values("heatmap", (i, j))) / count).tolist()
                for i, j in ra_metrics.heatmap_pairs(names)}
    return Alignment(group, names, ra_metrics.pair_mean(matrix), matrix, len(alignment), len(names) * (len(names) - 1),
                     heatmaps, int(undefined.sum()), *_alignment_intervals(names, alignment, matrix, boot, group_scores))


def _coupling(group: int, names: list[str], measured: Measured, ks: tuple[int, ...]) -> Coupling:
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
    return Coupling(group, names, matrices, means)


def _pair_matrix(names: list[str], values: dict[tuple[str, str], torch.Tensor], diagonal: float) -> list[list]:
    """A group's site × site matrix of per-sample values averaged over samples: `diagonal` on the
    diagonal, None for a pair not measured (a large group's RA2 measures a sample of its pairs)."""
    return [[diagonal if i == j else _mean_std(values[i, j])[0] if (i, j) in values else None for j in names]
            for i in names]


def _mean_or_none(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _neural_collapse(module: torch.nn.Module, measured: Measured, logits: torch.Tensor | None,
                     labels: torch.Tensor | None, boot: Resamples | None,
                     replicates: dict[str, torch.Tensor]) -> NCResults | None:
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
    if boot is not None and result["undetermined"] is None:
        values = [nc_metrics.neural_collapse(features[i], labels[i], weight, logits=logits[i]) for i in boot.index]
        for key in NC_VALUES:
            replicates[key] = torch.tensor([_nan_if_none(v[key]) for v in values], dtype=torch.float64)
    return NCResults(**result, labels_from=source, **_nc_intervals(replicates, boot))


def collapse(module: torch.nn.Module, measured: Measured, labels: torch.Tensor | None,
             settings: Settings) -> tuple[NCResults | None, dict[str, torch.Tensor]]:
    """NC alone, from a forward's classifier features (no Jacobian: `measure` with no sites), with its
    intervals; and its values on each bootstrap resample."""
    logits = torch.cat(measured.logits) if measured.logits else None
    ordered = None if labels is None else labels[measured.sample_order()]
    boot = _resamples(measured, logits, ordered, settings)
    replicates: dict[str, torch.Tensor] = {}
    return _neural_collapse(module, measured, logits, ordered, boot, replicates), replicates


def _causal_lm(module: torch.nn.Module) -> bool:
    """A Hugging Face model that generates the next token of its own input (not an encoder-decoder,
    whose logits follow its decoder's inputs, nor a masked LM)."""
    can_generate = getattr(module, "can_generate", None)
    config = getattr(module, "config", None)
    return callable(can_generate) and bool(can_generate()) and not getattr(config, "is_encoder_decoder", False)


def _next_token_collapse(module: torch.nn.Module, measured: Measured) -> NCResults | None:
    """NC of a causal LM with its tokens as samples and their next tokens as classes, against the LM
    head (`get_output_embeddings`: tied to the input embeddings or not)."""
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else find_classifier(module)
    if head is None or getattr(head, "weight", None) is None:
        return None
    features, labels, predictions = (torch.cat(parts) for parts in zip(*measured.next_tokens))
    result = nc_metrics.neural_collapse(features, labels, head.weight.detach().cpu(), predictions)
    return NCResults(**result, labels_from="next tokens",
                     interval_note="no intervals: the tokens of one text are not independent samples, and a "
                                   "resample of texts is not implemented")


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
                         matrix: list[list], boot: Resamples | None, group_scores: list) -> tuple[list | None, list | None]:
    """A group's RA2 intervals: the group score's and each measured a_ij's ([low, high] or None),
    computed on the same resamples; the score's replicates appended to `group_scores`."""
    if boot is None or not alignment:
        group_scores.append(None)
        return None, None
    index = {name: a for a, name in enumerate(names)}
    pairs = list(alignment)
    means = torch.stack([boot.means(alignment[pair].double()) for pair in pairs], dim=1)  # (R, pairs)
    weights = ra_metrics.pair_weights(matrix)
    score = means @ torch.tensor([weights[index[i], index[j]] for i, j in pairs], dtype=torch.float64)
    group_scores.append(score)
    bounds = {pair: interval(means[:, p], boot.level) for p, pair in enumerate(pairs)}
    return interval(score, boot.level), [[bounds.get((i, j)) for j in names] for i in names]


def _ra_replicates(boot: Resamples, group_linearity: list, group_scores: list, ranks: list[torch.Tensor],
                   sigma1: list[torch.Tensor], ra3_sites: list[SiteRank], k: int,
                   classes: int | None) -> dict[str, torch.Tensor]:
    """The RA headline numbers on each resample, computed as the point values are, by `RAHeadline`
    section (and "rank_share")."""
    out = {}
    if group_linearity and None not in group_linearity:
        out["ra1"] = torch.stack(group_linearity).mean(dim=0)
    if group_scores and None not in group_scores:
        out["ra2"] = torch.stack(group_scores).mean(dim=0)
    if ranks:
        medians = torch.stack([boot.medians(rank) for rank in ranks])  # (sites, R); a rank reaching k is ≥ k
        # as `median_rank`: known while the upper middle site is below k (saturated sites sort last)
        known = medians.sort(dim=0).values[len(ranks) // 2] < k
        out["ra3"] = medians.quantile(0.5, dim=0).masked_fill(~known, math.nan)
        judged = [a for a, site in enumerate(ra3_sites) if site.rank_le_classes is not None]
        if classes is not None and judged:
            out["rank_share"] = (medians[judged] <= classes).double().mean(dim=0)
        out["ra4"] = torch.stack([boot.means(s) for s in sigma1]).sum(dim=0)
    return out


def _ci(replicates: dict[str, torch.Tensor], key: str, boot: Resamples | None) -> list | None:
    """The interval of the headline number whose replicates are `replicates[key]`; None without."""
    values = replicates.get(key)
    return None if boot is None or values is None else interval(values, boot.level)


def _nc_intervals(replicates: dict[str, torch.Tensor], boot: Resamples | None) -> dict[str, Any]:
    """Each NC value's interval, and NC2's as the verdict takes it (where resampled)."""
    out = {f"{key}_ci": _ci(replicates, key, boot) for key in NC_VALUES}
    if boot is not None and "nc1" in replicates:
        out["nc2_ci"] = interval(torch.maximum(replicates["nc2_equinorm_means"], replicates["nc2_equiangular"]),
                                 boot.level)
    return out


def _uncertainty(boot: Resamples | None, settings: Settings, measured: Measured) -> Uncertainty:
    """How the intervals were made, recorded in the report."""
    samples = measured.samples
    if boot is None:
        return Uncertainty(settings.confidence, settings.resamples, samples, False, uncertainty.METHOD,
                           "no intervals: one sample says nothing of its spread" if samples == 1 else "nothing measured")
    return Uncertainty(boot.level, len(boot.index), boot.samples, boot.stratified, uncertainty.METHOD, None)
