"""Figures of the HTML reports, drawn from the report dict with matplotlib (no pyplot state,
Agg-free SVG canvas) and returned as inline SVG: text stays text (searchable, small), and nothing is
fetched when the page opens. Each function takes plain report data and returns one SVG string."""
from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure

from ra_probe.metrics.ra import spread_sites
from ra_probe.metrics.results import Alignment, Coupling, NCResults, SiteSigma, SiteSpectrum, Trajectories
from ra_probe.report.headline import label

NO_VALUE_FLOOR = 1e-4  # where a zero or missing value sits on a log axis


def _svg(fig: Figure, name: str) -> str:
    """The figure as an <svg> element: no XML prolog or metadata, ids salted with `name` so several
    figures can share one page without clashing clip paths."""
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": name}):
        fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buffer.getvalue()
    text = text[text.index("<svg"):]
    return re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)


def _positive(values: list[float | None]) -> np.ndarray:
    """Values for a log axis: missing or non-positive ones become NaN (a gap, not a fake point)."""
    return np.array([v if v is not None and v > 0 else np.nan for v in values], dtype=float)


def _log_y(ax, values: np.ndarray) -> None:
    """A log y axis where there is something positive to show; otherwise say why the panel is empty."""
    if np.isfinite(values).any():
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "all zero (branches exactly zero?)", transform=ax.transAxes, ha="center", va="center",
                color="0.4", fontsize=8)


LABELLED = 16  # sites up to which every tick and cell of a figure is labelled
LEGEND_SITES = 12  # sites of a group up to which the spectra have a legend


def _ticks(m: int) -> list[int]:
    """Indices of the sites to label on an axis of m: all up to `LABELLED`, else about that many."""
    return list(range(0, m, max(1, math.ceil(m / LABELLED))))


def _grid(count: int, columns: int, size: tuple[float, float]) -> tuple[Figure, list]:
    cols = min(columns, count)
    rows = math.ceil(count / cols)
    fig = Figure(figsize=(size[0] * cols, size[1] * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, axes[:count]


def spectra(sites: Mapping[str, SiteSpectrum], group_of: Mapping[str, int], classes: int | None) -> str:
    """Mean singular values σ_k (log scale) of every site against k, one panel per group (`group_of`, by
    site name); C marked when it falls within the k values shown (the axis spans k, never a C of a
    thousand classes)."""
    groups: dict[int, list[tuple[str, SiteSpectrum]]] = {}
    for name, site in sites.items():
        groups.setdefault(group_of[name], []).append((name, site))
    fig, axes = _grid(len(groups), 3, (4.2, 3.2))
    for ax, (group, members) in zip(axes, groups.items()):
        shown = []
        colors = matplotlib.colormaps["viridis"](np.linspace(0, 0.9, len(members)))
        for color, (name, site) in zip(colors, members):
            sv = _positive(site.singular_values)
            ax.plot(range(1, len(sv) + 1), sv, marker=".", label=name,
                    color=color if len(members) > LEGEND_SITES else None)
            shown.append(sv)
        k = max(len(sv) for sv in shown)
        if classes and classes <= k:
            ax.axvline(classes, color="0.4", linestyle="--", linewidth=1)
            ax.annotate(f"C = {classes}", (classes, 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                        textcoords="offset points", fontsize=8, color="0.3")
        elif classes:
            ax.annotate(f"C = {classes} > k: not shown", (1, 1), xycoords="axes fraction", xytext=(-3, -12),
                        textcoords="offset points", fontsize=8, color="0.3", ha="right")
        ax.set_xlim(0.5, k + 0.5)
        _log_y(ax, np.concatenate(shown))
        ax.set(title=f"group {group}", xlabel="k", ylabel="σ_k")
        if len(members) <= LEGEND_SITES:
            ax.legend(fontsize=7, ncol=2 if len(members) > 6 else 1)
        else:  # a deep group: colour runs with depth, first (dark) to last (light)
            ax.text(0.02, 0.02, f"{members[0][0]} (dark) → {members[-1][0]} (light)",
                    transform=ax.transAxes, fontsize=7, color="0.3")
    return _svg(fig, "spectra")


def alignment_matrix(group: Alignment) -> str:
    """RA2 scores a_ij of one group: row i (the Jacobian J_i), column j (the singular pairs of J_j)."""
    measured, pairs = group.pairs_measured or 0, group.pairs or 0  # from schema 1.6
    sample = f" ({measured} of {pairs} pairs measured, blank: not measured)" if measured < pairs else ""
    return _site_matrix(group.sites, group.matrix, f"group {group.group}: a_ij{sample}",
                        f"alignment-{group.group}", vmax=1.0)


def coupling_matrix(group: Coupling, K: str) -> str:
    """Block coupling c_ij of one group at one K: row i (the Jacobian J_i), column j (J_j's singular
    pairs); 0 is coupled, the colour scale ends at the group's largest value."""
    return _site_matrix(group.sites, group.matrices[K], f"group {group.group}: coupling, K = {K}",
                        f"coupling-{group.group}-{K}", vmax=None, cmap="viridis_r")


def _site_matrix(names: list[str], values: list[list[float | None]], title: str, gid: str, vmax: float | None,
                 cmap: str = "viridis") -> str:
    """A site × site matrix as a heat map, numbered cells where the group is small enough to read them."""
    matrix = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)
    m = len(names)
    cell = 0.55 if m <= LABELLED else max(0.1, 9.0 / m)  # a deep group: the same page width, no numbers
    fig = Figure(figsize=(1.2 + cell * m + 1.2, 0.9 + cell * 0.9 * m + 1.2), layout="constrained")
    ax = fig.subplots()
    top = vmax if vmax is not None else float(np.nanmax(matrix)) if np.isfinite(matrix).any() else 1.0
    image = ax.imshow(matrix, vmin=0, vmax=top or 1.0, cmap=cmap)
    if m <= LABELLED:
        bright = image.norm(matrix) > 0.6 if cmap == "viridis" else image.norm(matrix) < 0.4
        for i in range(m):
            for j in range(m):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if bright[i, j] else "white")
    ticks = _ticks(m)
    ax.set_xticks(ticks, [names[t] for t in ticks], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(ticks, [names[t] for t in ticks], fontsize=8)
    ax.set(xlabel="j (singular pairs of J_j)", ylabel="i (Jacobian J_i)", title=title)
    fig.colorbar(image, ax=ax, shrink=0.8)
    return _svg(fig, gid)


def heatmaps(group: Alignment, sigma1: dict[str, float | None]) -> str:
    """The K×K maps |U_jᵀ J_i V_j| of one group (of at most `HEATMAP_SITES` sites spread over a deep
    one), row i and column j, each divided by σ₁(J_i) so rows share a scale: a bright diagonal means
    J_j's singular pairs also diagonalize J_i (RA2). One axes, each map an image placed in its cell."""
    from matplotlib.patches import Rectangle

    names = spread_sites(group.sites)
    m = len(names)
    K = len(next(iter(group.heatmaps.values()), [[0.0]]))
    step = K + 1  # a map and a gap
    fig = Figure(figsize=(1.6 + 1.1 * m, 1.2 + 1.1 * m), layout="constrained")
    fig.suppressComposite = True  # each map its own SVG image, with its id
    ax = fig.subplots()
    norm, image = PowerNorm(0.5, vmin=0, vmax=1), None
    for i, site_i in enumerate(names):
        scale = sigma1.get(site_i) or 1.0
        for j, site_j in enumerate(names):
            if i == j:
                ax.add_patch(Rectangle((j * step, i * step), K, K, color="0.93"))
                continue
            image = ax.imshow(np.array(group.heatmaps[f"{site_i}|{site_j}"], dtype=float) / scale, norm=norm,
                              cmap="magma", extent=(j * step, j * step + K, i * step + K, i * step),
                              interpolation="nearest")
            image.set_gid(f"heatmap-{group.group}-{i}-{j}")  # the SVG element's id
    centers = [a * step + K / 2 for a in range(m)]
    ax.set_xlim(-0.5, m * step - 0.5)
    ax.set_ylim(m * step - 0.5, -0.5)
    ax.xaxis.tick_top()
    ax.set_xticks(centers, names, rotation=60, ha="left", fontsize=7)
    ax.set_yticks(centers, names, fontsize=7)
    ax.tick_params(length=0)
    ax.set_frame_on(False)
    if image is not None:
        fig.colorbar(image, ax=ax, shrink=0.6, label="|U_jᵀ J_i V_j| / σ₁(J_i)  (square-root scale)")
    sampled = "" if m == len(group.sites) else f" ({m} of {len(group.sites)} sites, evenly spread)"
    ax.set_title(f"group {group.group}: rows J_i, columns (U_j, V_j){sampled}", fontsize=9)
    return _svg(fig, f"heatmaps-{group.group}")


def trajectories(group: Trajectories) -> str:
    """RA1: each sample's h_0 … h_m on the group's top two principal components (circle: h_0)."""
    projection = group.projection
    points = np.array(projection["points"], dtype=float)
    if points.shape[2] < 2:  # a single component: plot it against the step index
        points = np.concatenate([np.broadcast_to(np.arange(points.shape[1])[None, :, None], points.shape), points], 2)
    share = projection["explained_variance"] + [0.0]
    fig = Figure(figsize=(4.6, 3.8), layout="constrained")
    ax = fig.subplots()
    colors = matplotlib.colormaps["tab20"](np.linspace(0, 1, max(len(points), 2)))
    for color, trajectory in zip(colors, points):
        ax.plot(trajectory[:, 0], trajectory[:, 1], marker=".", markersize=4, linewidth=1, color=color)
        ax.plot(trajectory[0, 0], trajectory[0, 1], marker="o", markersize=6, fillstyle="none", color=color)
    names = group.sites
    ax.set(xlabel=f"PC1 ({100 * (share[0] or 0):.1f}%)", ylabel=f"PC2 ({100 * (share[1] or 0):.1f}%)",
           title=f"group {group.group}: {names[0]} → {names[-1]}")
    ax.title.set_fontsize(9)
    return _svg(fig, f"trajectories-{group.group}")


def _error(values: list[float], intervals: list[list[float] | None]) -> np.ndarray | None:
    """matplotlib's yerr (2, n) of confidence intervals around `values`; None when none has one."""
    if not any(intervals):
        return None
    return np.array([[max(v - ci[0], 0.0), max(ci[1] - v, 0.0)] if ci and v is not None else [0.0, 0.0]
                     for v, ci in zip(values, intervals)]).T


def sigma1_depth(ra4_sites: Sequence[SiteSigma], groups: Mapping[str, int],
                 intervals: dict[str, list[float] | None] | None = None) -> str:
    """RA4 within a model: σ₁ (mean ± std over samples, log scale; black: the mean's confidence interval,
    `intervals` by site) of each site against its depth."""
    fig = Figure(figsize=(min(12.0, max(4.5, 0.32 * len(ra4_sites) + 2)), 3.4), layout="constrained")
    ax = fig.subplots()
    depth = [s.depth for s in ra4_sites]
    mean = _positive([s.sigma1_mean for s in ra4_sites])
    std = np.array([s.sigma1_std or 0.0 for s in ra4_sites], dtype=float)
    ax.errorbar(depth, mean, yerr=std, color="0.6", linewidth=1, capsize=2, zorder=1)
    error = _error(list(mean), [(intervals or {}).get(s.site) for s in ra4_sites])
    if error is not None:
        ax.errorbar(depth, mean, yerr=error, fmt="none", ecolor="black", linewidth=2, capsize=0, zorder=1.5)
    ax.scatter(depth, mean, c=[groups.get(s.site, 0) for s in ra4_sites], cmap="tab10", zorder=2, s=18)
    _log_y(ax, mean)
    ticks = _ticks(len(ra4_sites))
    ax.set_xticks([depth[t] for t in ticks], [ra4_sites[t].site for t in ticks], rotation=60, ha="right", fontsize=7)
    ax.set(ylabel="σ₁", title="σ₁ against depth (colour: group)")
    return _svg(fig, "sigma1")


NC_BARS = (("nc1", "nc1_max"), ("nc2_equinorm_means", "nc2_max"), ("nc2_equinorm_weights", None),
           ("nc2_equiangular", "nc2_max"), ("nc3", "nc3_max"), ("nc4", "nc4_max"))  # (NC value, its threshold)


def nc_bars(nc: NCResults, thresholds: Mapping[str, float]) -> str:
    """NC1–NC4 as bars on a log scale (smaller is more collapsed), the verdict's limits as red ticks."""
    fig = Figure(figsize=(5.6, 3.2), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(NC_BARS))
    values = [getattr(nc, key) for key, _ in NC_BARS]
    heights = [max(v, NO_VALUE_FLOOR) if v is not None else NO_VALUE_FLOOR for v in values]
    ax.bar(x, heights, color="#4c72b0", bottom=0,
           yerr=_error(heights, [getattr(nc, f"{key}_ci") for key, _ in NC_BARS]), capsize=3, ecolor="black")
    for xi, (_, limit) in zip(x, NC_BARS):
        if limit in thresholds:
            ax.hlines(thresholds[limit], xi - 0.4, xi + 0.4, colors="#c44e52", linewidth=2)
    for xi, value, height in zip(x, values, heights):
        ax.annotate("–" if value is None else f"{value:.3g}", (xi, height), xytext=(0, 2),
                    textcoords="offset points", ha="center", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylim(NO_VALUE_FLOOR / 2, max(heights + [thresholds.get("nc1_max", 1.0)]) * 4)
    ax.set_xticks(x, [label(key) for key, _ in NC_BARS], rotation=20, ha="right", fontsize=8)
    ax.set(title="Neural Collapse (red: verdict limits; black: confidence intervals)")
    return _svg(fig, "nc")


def compare_sigma1(rows: list[dict[str, Any]]) -> str:
    """σ₁ against relative depth l/L for several reports, one line each (log scale)."""
    fig = Figure(figsize=(6.0, 3.6), layout="constrained")
    ax = fig.subplots()
    shown = [np.full(1, np.nan)]
    for row in rows:
        sigma = _positive(row["sigma1"])
        if len(sigma):
            ax.plot((np.arange(len(sigma)) + 1) / len(sigma), sigma, marker=".", label=row["label"])
            shown.append(sigma)
    _log_y(ax, np.concatenate(shown))
    ax.set(xlabel="relative depth l / L", ylabel="σ₁", title="σ₁ against depth")
    ax.legend(fontsize=7)
    return _svg(fig, "compare-sigma1")


def depth_slopes(families: list[dict[str, Any]]) -> str:
    """RA4 across models: mean σ₁ against depth L (log–log) per family, with the fitted slope."""
    fig = Figure(figsize=(5.0, 3.6), layout="constrained")
    ax = fig.subplots()
    for family in families:
        L, sigma = np.array(family["depths"], float), _positive(family["mean_sigma1"])
        line = ax.plot(L, sigma, marker="o", linestyle="none", label=f"{family['family']}: slope {family['slope']:.2f}")
        keep = np.isfinite(sigma)
        x, y = np.log(L[keep]), np.log(sigma[keep])
        grid = np.linspace(x.min(), x.max(), 20)  # the least-squares line through the mean point
        ax.plot(np.exp(grid), np.exp(y.mean() + family["slope"] * (grid - x.mean())),
                color=line[0].get_color(), linewidth=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set(xlabel="depth L (sites)", ylabel="mean σ₁", title="RA4 across models (≈ −1 under RA4)")
    ax.legend(fontsize=7)
    return _svg(fig, "compare-slopes")


STEP_METRICS = (("linearity", False), ("alignment", False), ("median_rank", False), ("mean_sigma1", True),
                ("nc1", True), ("nc4", False))  # (headline name, log scale)


def metrics_by_step(stepped: list[tuple[int, dict[str, Any]]]) -> str:
    """Checkpoints of one training run: each headline metric against the training step, one panel each."""
    stepped = sorted(stepped, key=lambda pair: pair[0])
    steps = [step for step, _ in stepped]
    fig, axes = _grid(len(STEP_METRICS), 3, (3.4, 2.6))
    for ax, (key, log) in zip(axes, STEP_METRICS):
        title = label(key)
        values = [row[key] for _, row in stepped]
        shown = _positive(values) if log else np.array([np.nan if v is None else v for v in values], dtype=float)
        ax.plot(steps, shown, marker=".")
        if log:
            _log_y(ax, shown)
        ax.set(title=title, xlabel="step")
        ax.title.set_fontsize(9)
    return _svg(fig, "steps")
