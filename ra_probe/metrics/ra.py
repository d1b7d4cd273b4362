"""Residual Alignment measurements, on plain tensors, per sample."""
from __future__ import annotations

import statistics

import torch

# Elements of float64 one chunk of a Gram matrix's coordinates holds (`_gram`): 32 MB
GRAM_CHUNK_ELEMENTS = 1 << 22


def _gram(points: torch.Tensor, rows) -> torch.Tensor:
    """Σ over the coordinates of R Rᵀ in float64, (B, r, r), for R = rows(points) (B, r, d') a linear
    map of points (B, n, d) that acts on each coordinate alone (differences, centering), taken chunk of
    coordinates by chunk: float64 copies of whole trajectories cost 10× their size in float32 (the 65
    points of 1.56M coordinates of a 546-px ViT's group: 3.9 GB for 0.4 GB of points)."""
    points = points.flatten(2)
    chunk = max(1, GRAM_CHUNK_ELEMENTS // max(1, points.shape[0] * points.shape[1]))
    gram = None
    for start in range(0, points.shape[2], chunk):
        part = rows(points[:, :, start:start + chunk].double())
        gram = part @ part.mT if gram is None else gram.baddbmm_(part, part.mT)
    return gram


def _centered(points: torch.Tensor) -> torch.Tensor:
    return points - points.mean(dim=1, keepdim=True)


def trajectory_stats(H: torch.Tensor) -> dict[str, torch.Tensor]:
    """RA1 for trajectories H (B, m+1, d): the representations h_0..h_m of each sample across a group.

    - linearity: σ₁²/Σσ² of the centered trajectory (1 = a line);
    - lss: m / ‖x̃_m − x̃_0‖ for unit steps x̃_{l+1} = x̃_l + Δ_l/‖Δ_l‖ (≥ 1, 1 = a line);
    - step_cv: std/mean of the step norms ‖Δ_l‖ (0 = equispaced);
    - step_cos: mean cosine of consecutive steps.
    Each (B,); NaN for a sample whose trajectory does not move (every branch exactly zero): a point
    is no line, and no evidence either way. All from two (m+1)-sized Gram matrices, of the steps and
    of the centered points (`_gram`)."""
    tiny = torch.finfo(torch.float64).tiny
    steps = _gram(H, lambda points: points[:, 1:] - points[:, :-1])  # ⟨Δ_l, Δ_l'⟩
    centered = _gram(H, _centered)
    squares = torch.linalg.eigvalsh(centered)  # σ² of the centered trajectory
    linearity = squares[:, -1].clamp_min(0.0) / centered.diagonal(dim1=1, dim2=2).sum(dim=1).clamp_min(tiny)
    norms = steps.diagonal(dim1=1, dim2=2).clamp_min(0.0).sqrt()
    scale = 1.0 / norms.clamp_min(tiny)
    units = steps * scale[:, :, None] * scale[:, None, :]  # ⟨Δ_l/‖Δ_l‖, Δ_l'/‖Δ_l'‖⟩
    lss = norms.shape[1] / units.sum(dim=(1, 2)).clamp_min(0.0).sqrt().clamp_min(tiny)
    step_cv = norms.std(dim=1, unbiased=False) / norms.mean(dim=1).clamp_min(tiny)
    if norms.shape[1] > 1:
        step_cos = units.diagonal(offset=1, dim1=1, dim2=2).mean(dim=1)
    else:
        step_cos = torch.ones(H.shape[0], dtype=torch.float64, device=H.device)
    still = (norms == 0).all(dim=1)
    stats = {"linearity": linearity, "lss": lss, "step_cv": step_cv, "step_cos": step_cos}
    return {name: value.masked_fill(still, float("nan")) for name, value in stats.items()}


def trajectory_projection(H: torch.Tensor, components: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """RA1 picture: the trajectories H (P, m+1, d) of P samples projected on the top principal components
    of all their P·(m+1) representations (centered at their mean). A linear map keeps lines straight, so
    straight, equispaced trajectories stay so in the picture.

    Through the Gram matrix X Xᵀ = W Λ Wᵀ of the centered points X (N, d), the scores are W √Λ (N × N
    work, never d × d; `_gram`). Signs are fixed so that the trajectories advance, on average, along +PC.
    Returns the points (P, m+1, c) and each component's share of the variance (c,)."""
    P, steps = H.shape[:2]
    eigenvalues, W = torch.linalg.eigh(_gram(H.flatten(2).reshape(1, P * steps, -1), _centered)[0])
    eigenvalues, W = eigenvalues.flip(0).clamp_min(0.0), W.flip(1)
    c = min(components, W.shape[1])
    scores = (W[:, :c] * eigenvalues[:c].sqrt()).reshape(P, steps, c)
    advance = (scores[:, -1] - scores[:, 0]).sum(dim=0)
    scores = scores * torch.where(advance < 0, -1.0, 1.0)
    share = eigenvalues[:c] / eigenvalues.sum().clamp_min(torch.finfo(eigenvalues.dtype).tiny)
    return scores, share


def alignment_score(M: torch.Tensor, S_i: torch.Tensor) -> torch.Tensor:
    """RA2: a_ij = Σ_k |M_ij[k,k]| / Σ_k σ_{i,k} for M_ij = U_{j,K}ᵀ J_i V_{j,K} (B, K, K) and J_i's top-K
    singular values S_i (B, K): the share of J_i's top-K action that J_j's singular pairs capture. (B,)
    NaN where J_i is exactly zero (nothing to align)."""
    diag = M.diagonal(dim1=1, dim2=2).abs().sum(dim=1)
    total = S_i.sum(dim=1)
    return (diag / total.clamp_min(torch.finfo(S_i.dtype).tiny)).masked_fill(total == 0, float("nan"))


def coupling_score(M: torch.Tensor, S_i: torch.Tensor) -> torch.Tensor:
    """Transformer Block Coupling (Aubry et al., 2025): ‖ |M_ij| − diag(S_i) ‖_F / tr(S_i) for
    M_ij = U_{j,K}ᵀ J_i V_{j,K} (B, K, K) and J_i's top-K singular values S_i (B, K): 0 when J_j's top
    singular vectors are J_i's own (coupled), larger as they part. (B,) NaN where J_i is exactly zero."""
    gap = (M.abs() - torch.diag_embed(S_i)).flatten(1).norm(dim=1)
    total = S_i.sum(dim=1)
    return (gap / total.clamp_min(torch.finfo(S_i.dtype).tiny)).masked_fill(total == 0, float("nan"))


HEATMAP_SITES = 8  # a group's K×K maps are kept for every pair among this many sites, and for neighbours


def _spread(m: int) -> list[int]:
    """Up to `HEATMAP_SITES` indices spread evenly from the first site to the last."""
    if m <= HEATMAP_SITES:
        return list(range(m))
    return sorted({round(a * (m - 1) / (HEATMAP_SITES - 1)) for a in range(HEATMAP_SITES)})


def spread_sites(names: list[str]) -> list[str]:
    """The sites of a group among which every K×K map is kept (see `heatmap_pairs`), in order."""
    return [names[i] for i in _spread(len(names))]


def _heatmap_indices(m: int) -> set[tuple[int, int]]:
    spread = _spread(m)
    pairs = {(a, b) for a in spread for b in spread if a != b}
    return pairs | {(a, a + 1) for a in range(m - 1)} | {(a + 1, a) for a in range(m - 1)}


def heatmap_pairs(names: list[str]) -> list[tuple[str, str]]:
    """The ordered pairs (i, j) of a group whose K×K maps |U_jᵀ J_i V_j| a report keeps: every pair when
    the group has at most `HEATMAP_SITES` sites; else every pair among that many sites spread evenly
    from the first to the last, and each site with its neighbours. So a report grows linearly with
    depth, not as L²."""
    return [(names[a], names[b]) for a, b in sorted(_heatmap_indices(len(names)))]


AUTO_ALL_PAIRS = 17  # auto: every pair of a group up to this many sites (16 partners each), else
AUTO_PARTNERS = 6  # this many partners per site on average: alignment a fraction of the SVDs' products


def partners_per_site(m: int, setting: str | int) -> int | None:
    """How many partners each site of a group of `m` has on average for RA2 (`align_pairs`: all, auto
    or a number); None for every pair."""
    if setting == "all" or (setting == "auto" and m <= AUTO_ALL_PAIRS):
        return None
    partners = AUTO_PARTNERS if setting == "auto" else int(setting)
    return None if partners >= m - 1 else partners


def alignment_pairs(m: int, partners: int | None, seed: int) -> list[tuple[int, int]]:
    """The ordered pairs (a, b), a ≠ b, of a group of `m` sites whose M_ab = U_bᵀ J_a V_b RA2 measures:
    every pair when `partners` is None; else every neighbour pair and every pair whose K×K map a
    report keeps (`heatmap_pairs`), and pairs drawn uniformly at random among the others (under
    `seed`) until the group has `partners`·m. Each pair costs K products of J_a, so exact RA2 grows as
    m²; a sample keeps it linear in depth."""
    every = [(a, b) for a in range(m) for b in range(m) if a != b]
    if partners is None:
        return every
    kept = _heatmap_indices(m)
    others = [pair for pair in every if pair not in kept]
    drawn = torch.randperm(len(others), generator=torch.Generator().manual_seed(seed))
    return sorted(kept | {others[i] for i in drawn[:max(0, partners * m - len(kept))].tolist()})


def pair_weights(matrix: list[list[object]]) -> dict[tuple[int, int], float]:
    """The weight of each measured off-diagonal entry (not None) of a group's matrix in its mean over every
    ordered pair, by strata: neighbour pairs and the others, each stratum's measured entries standing
    for the whole stratum (a stratum with none measured left out). The weights sum to 1 (no entry: empty)."""
    m, weights, total = len(matrix), {}, 0
    for near in (True, False):
        stratum = [(a, b) for a in range(m) for b in range(m) if a != b and (abs(a - b) == 1) == near]
        measured = [pair for pair in stratum if matrix[pair[0]][pair[1]] is not None]
        for pair in measured:
            weights[pair] = len(stratum) / len(measured)
        total += len(stratum) if measured else 0
    return {pair: w / total for pair, w in weights.items()}


def pair_mean(matrix: list[list[float | None]]) -> float | None:
    """The mean of a group's off-diagonal entries over every ordered pair, estimated from those measured
    (None: not measured) by strata (`pair_weights`). Exact when every pair is measured; None when none
    is; NaN when a measured entry is NaN."""
    weights = pair_weights(matrix)
    return sum(w * matrix[a][b] for (a, b), w in weights.items()) if weights else None


def singular_vector_overlap(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """|⟨u_k, v_k⟩| of a site's own singular pairs (input and output spaces equal): (B, k)."""
    return (U * V).sum(dim=1).abs()


def numerical_rank(S: torch.Tensor, tau: float) -> torch.Tensor:
    """#{σ_k > τ σ_1} per sample (B,). With only the top k known it saturates at k."""
    return (S > tau * S[:, :1]).sum(dim=1)


def rank_summary(S: torch.Tensor, tau: float, classes: int | None) -> dict:
    """RA3 for one site from its top-k values per sample S (B, k): the numerical rank #{σ > τσ₁} is
    only known below k; a sample whose rank reaches k has rank ≥ k. The median over samples is exact
    when it is below k (saturated samples sort last whatever their true rank), else it is undetermined
    (None, with `rank_at_least` = k). Whether rank ≤ C is then known only when k > C (rank ≥ k > C);
    with k ≤ C it is undetermined and `undetermined` says how to settle it."""
    k = S.shape[1]
    rank = numerical_rank(S, tau).double()
    saturated = bool((rank >= k).any())
    median = rank.median().item()
    exact = median < k
    out = {"rank_mean": None if saturated else rank.mean().item(),
           "rank_std": None if saturated else (rank.std(unbiased=False).item() if len(rank) > 1 else 0.0),
           "rank_median": median if exact else None, "rank_at_least": None if exact else k,
           "rank_saturated": saturated, "rank_le_classes": None, "undetermined": None}
    if classes is not None:
        if exact:
            out["rank_le_classes"] = median <= classes
        elif k > classes:
            out["rank_le_classes"] = False
        else:
            out["undetermined"] = (f"the rank reaches k = {k} ≤ C = {classes}: whether rank ≤ C takes k > C "
                                   f"triplets per site (--k {classes + 1}) to settle")
    elif not exact:
        out["undetermined"] = f"the rank reaches k = {k}: raise --k"
    return out


def median_rank(sites: list[dict], k: int) -> float | None:
    """RA3 over a network: the median over sites of each site's median rank (`rank_summary` entries).
    A site whose rank reaches k has rank ≥ k and sorts last whatever its true rank, so the median is
    exact when its upper middle value is below k; otherwise it is undetermined (None)."""
    ranks = [s["rank_median"] if s["rank_median"] is not None else s.get("rank_at_least") for s in sites]
    if not ranks or None in ranks or statistics.median_high(ranks) >= k:
        return None
    return statistics.median(ranks)


def singular_gap(S: torch.Tensor, c: int) -> torch.Tensor | None:
    """σ_C / σ_{C+1} per sample, when C+1 values are known."""
    if S.shape[1] <= c:
        return None
    return S[:, c - 1] / S[:, c].clamp_min(torch.finfo(S.dtype).tiny)


def depth_slope(depths: list[float], sigma1: list[float]) -> float | None:
    """RA4 across models: least-squares slope of log σ₁ against log L (≈ −1 under RA4)."""
    fit = depth_fit(depths, sigma1)
    return None if fit is None else fit["slope"]


def depth_fit(depths: list[float], sigma1: list[float]) -> dict[str, float] | None:
    """The least-squares line log σ₁ = intercept + slope · log L over the pairs with L, σ₁ > 0, and its
    coefficient of determination r² (1: the points lie on the line); None without two distinct depths."""
    import numpy as np

    pairs = [(d, s) for d, s in zip(depths, sigma1) if d > 0 and s > 0]
    if len({d for d, _ in pairs}) < 2:
        return None
    x, y = np.log([p[0] for p in pairs]), np.log([p[1] for p in pairs])
    slope, intercept = np.polyfit(x, y, 1)
    spread = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(((y - (intercept + slope * x)) ** 2).sum()) / spread if spread > 0 else 1.0
    return {"slope": float(slope), "intercept": float(intercept), "r2": r2, "points": len(pairs)}
