"""The probe (spec §1): sites → capture → engine → metrics, chunk by chunk over the samples, and the
report as plain data. `probe()` is the library entry point; the CLI is a thin layer over it."""
from __future__ import annotations

import copy
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from timm.layers import freeze_batch_norm_2d

from ra_probe.cache import ResultCache, RunCache
from ra_probe.capture import Captured, capture, find_classifier
from ra_probe.data import Samples, take, to
from ra_probe.errors import UserError
from ra_probe.engine.solvers import DENSE_LIMIT
from ra_probe.engine import DenseOperator, JacobianOperator, auto_batch_size, choose_method, default_block, solve
from ra_probe.metrics import nc as nc_metrics
from ra_probe.metrics import ra as ra_metrics
from ra_probe.metrics.verdict import Thresholds, nc_verdict, ra_verdict
from ra_probe.sites import Site, SiteReport, find_sites, verify_sites
from ra_probe.sources import LoadedModel

Progress = Callable[[str, int, int], None]
DTYPES = {"float32": torch.float32, "float64": torch.float64}
PROJECTED_SAMPLES = 16  # RA1 trajectories kept per group for the report's picture


@dataclass
class Settings:
    k: int = 16  # singular triplets per site and sample
    align_k: int | None = None  # K of RA2 (default: k)
    samples: int = 64
    batch_size: int | None = None  # samples per chunk; None: the most that fit the device's free memory
    tol: float = 1e-3
    solver: str = "auto"  # auto | dense | block
    chunk: int = 16  # vectors per vmapped Jacobian product call
    dense_limit: int = DENSE_LIMIT  # largest site dimension whose Jacobian auto may form (cost model below)
    tau: float = 1e-2
    dtype: str = "float32"
    device: str | None = None
    seed: int = 0
    thresholds: Thresholds = field(default_factory=Thresholds)

    def resolved_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["device"] = str(self.resolved_device())
        out["align_k"] = self.align_k or self.k
        return out


def prepare(model: torch.nn.Module, settings: Settings) -> torch.nn.Module:
    """A frozen, eval-mode copy on the probe's device and dtype: the user's model is never touched."""
    # eval-mode BatchNorm2d as the fixed per-channel affine map it is: the same outputs, and its
    # forward-mode product is one multiply instead of batch_norm's formula (~15% of a conv J·v on CPU)
    work = freeze_batch_norm_2d(copy.deepcopy(model))
    work.eval().requires_grad_(False)
    torch.backends.cuda.matmul.allow_tf32 = False  # spectra in true float32 (spec §4)
    torch.backends.cudnn.allow_tf32 = False
    return work.to(settings.resolved_device(), DTYPES[settings.dtype])


def discover(model: torch.nn.Module, samples: Samples, settings: Settings) -> SiteReport:
    """Sites found by the adapters and verified on a real forward of the first samples."""
    report = find_sites(model)
    device, dtype = settings.resolved_device(), DTYPES[settings.dtype]
    first = to(take(samples.inputs, slice(0, min(len(samples), 4))), device, dtype)
    try:
        captured = capture(model, first, report.sites, with_head=False)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise UserError(f"data {samples.name!r} does not fit the model: {str(exc).strip().splitlines()[0]}") from None
    return verify_sites(report, captured)


def probe(loaded: LoadedModel, samples: Samples, settings: Settings | None = None,
          progress: Progress | None = None, cache: ResultCache | None = None) -> dict[str, Any]:
    """Probe `loaded` on `samples`: the full report as a JSON-ready dict (see report.build_report).
    With a `cache`, group measurements already stored are reused and new ones are stored."""
    from ra_probe.report import build_report

    settings = settings or Settings()
    torch.manual_seed(settings.seed)
    started = time.perf_counter()
    model = prepare(loaded.module, settings)
    site_report = discover(model, samples, settings)
    run_cache = cache.for_run(model, loaded.name, settings) if cache is not None else None
    measured = measure(model, site_report.sites, samples, settings, progress, run_cache)
    metrics = summarize(site_report.sites, measured, loaded, settings, samples.labels)
    verdict = {"ra": ra_verdict(metrics, settings.thresholds), "nc": nc_verdict(metrics["nc"], settings.thresholds)}
    return build_report(loaded, samples, settings, site_report, measured, metrics, verdict,
                        seconds=time.perf_counter() - started)


@dataclass
class GroupMeasurement:
    """What one chunk of B samples gives for one group of sites; per-sample tensors on the CPU (float64).
    Small by design (no singular vectors), so it can be stored and merged."""

    group: int
    S: dict[str, torch.Tensor] = field(default_factory=dict)  # site → (B, k)
    residual: dict[str, torch.Tensor] = field(default_factory=dict)  # site → (B, k), max of both sides
    overlap: dict[str, torch.Tensor] = field(default_factory=dict)  # site → (B, k) |⟨u_k, v_k⟩|
    method: dict[str, str] = field(default_factory=dict)
    timing: dict[str, dict[str, float]] = field(default_factory=dict)  # seconds, products, iterations
    alignment: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)  # (i, j) → (B,) a_ij
    heatmap: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)  # (i, j) → (K, K) Σ_b |M_ij|
    trajectory: dict[str, torch.Tensor] | None = None  # RA1 statistic → (B,)
    projection: tuple[torch.Tensor, torch.Tensor] | None = None  # RA1 picture: (P, m+1, 2) points, (2,) shares


@dataclass
class Measured:
    """Everything measured, chunk by chunk: group measurements in order, classifier features, logits."""

    groups: list[GroupMeasurement] = field(default_factory=list)
    batch_size: int = 0  # samples per chunk
    features: list[torch.Tensor] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)

    def site_values(self, attribute: str, key) -> list[torch.Tensor]:
        """The chunks' tensors of one site (or pair) for `attribute` ("S", "residual", "alignment"...)."""
        return [getattr(g, attribute)[key] for g in self.groups if key in getattr(g, attribute)]

    def trajectories(self, group: int) -> list[dict[str, torch.Tensor]]:
        return [g.trajectory for g in self.groups if g.group == group and g.trajectory is not None]

    def projection(self, group: int) -> dict[str, Any] | None:
        """The first chunk's RA1 projection of a group, as report data."""
        first = next((g.projection for g in self.groups if g.group == group and g.projection is not None), None)
        if first is None:
            return None
        points, share = first
        return {"samples": points.shape[0], "explained_variance": share.tolist(), "points": points.tolist()}

    def timing(self, site: str) -> dict[str, float]:
        """Seconds and products (SVD and RA2 alignment) and converged samples summed over chunks; the
        most iterations of any chunk."""
        chunks = self.site_values("timing", site)
        total = {key: sum(t.get(key, 0) for t in chunks) for key in chunks[0] if key != "iterations"}
        return {**total, "iterations": max(t["iterations"] for t in chunks)}

    def method(self, site: str) -> str:
        return self.site_values("method", site)[0]


def groups_of(sites: list[Site]) -> dict[int, list[Site]]:
    groups: dict[int, list[Site]] = defaultdict(list)
    for site in sites:
        groups[site.group].append(site)
    return dict(groups)


def measure(model: torch.nn.Module, sites: list[Site], samples: Samples, settings: Settings,
            progress: Progress | None = None, cache: RunCache | None = None) -> Measured:
    """Spectra, alignment and trajectories of every site, chunk of samples by chunk (each group and
    chunk served from `cache` when it holds it)."""
    out = Measured()
    device, dtype = settings.resolved_device(), DTYPES[settings.dtype]
    n = len(samples)
    batch_size = settings.batch_size or _auto_batch_size(sites, n, settings)
    out.batch_size = batch_size
    total, done = len(sites) * -(-n // batch_size), 0
    for start in range(0, n, batch_size):
        chunk = to(take(samples.inputs, slice(start, start + batch_size)), device, dtype)
        captured = capture(model, chunk, sites)
        if captured.features is not None:
            out.features.append(captured.features.double().cpu())
        if captured.logits is not None:
            out.logits.append(captured.logits.double().cpu())
        for group, members in groups_of(sites).items():
            if progress:
                progress(members[0].name, done, total)
            out.groups.append(_measure_group_cached(cache, group, members, captured, chunk, settings, start))
            done += len(members)
    if progress:
        progress("done", total, total)
    return out


def _auto_batch_size(sites: list[Site], samples: int, settings: Settings) -> int:
    """Samples per chunk from the device's free memory and the sites' sizes and solvers (engine.memory)."""
    device, dtype = settings.resolved_device(), DTYPES[settings.dtype]

    def sized(site: Site) -> tuple[int, int, str]:
        n, m = math.prod(site.in_shape), math.prod(site.out_shape)
        return n, m, choose_method((1, m, n), settings.solver, settings.dense_limit, k=settings.k,
                                   itemsize=dtype.itemsize)

    dims = [[sized(s) for s in members] for members in groups_of(sites).values()]
    return auto_batch_size(dims, samples, device, k=settings.k, align_k=settings.align_k or settings.k,
                           block=default_block(settings.k, 1, device), chunk=settings.chunk,
                           itemsize=dtype.itemsize)

def _measure_group_cached(cache: RunCache | None, group: int, members: list[Site], captured: Captured,
                          chunk, settings: Settings, first: int = 0) -> GroupMeasurement:
    if cache is None:
        return measure_group(group, members, captured, settings, first)
    return cache.get_or_compute([s.name for s in members], chunk,
                                lambda: measure_group(group, members, captured, settings, first), GroupMeasurement)


def measure_group(group: int, members: list[Site], captured: Captured, settings: Settings,
                  first: int = 0) -> GroupMeasurement:
    """Top-k SVD of every site of a group on one chunk (samples `first`, `first` + 1, …: the solver's
    random vectors follow the sample, not its place in the chunk), then RA2 alignment and RA1
    trajectories."""
    out = GroupMeasurement(group)
    svds, ops = {}, {}
    for site in members:
        record = captured.sites[site.name]
        tick = time.perf_counter()
        jacobian = JacobianOperator(site.branch, record.x, record.ctx, chunk=settings.chunk)
        method = choose_method(jacobian.shape, settings.solver, settings.dense_limit, k=settings.k,
                               itemsize=jacobian.dtype.itemsize)
        op = DenseOperator(jacobian.dense()) if method == "dense" else jacobian  # formed once, reused by RA2
        result = solve(op, settings.k, method=method, tol=settings.tol, seed=settings.seed,
                       sample_ids=torch.arange(first, first + op.shape[0]))
        ops[site.name] = op
        svds[site.name] = result
        formed = jacobian.products if op is not jacobian else 0
        out.timing[site.name] = {"seconds": time.perf_counter() - tick, "products": formed + result.products,
                                 "iterations": result.iterations,
                                 "converged": int(result.converged.sum()), "samples": op.shape[0]}
        out.method[site.name] = result.method
        out.S[site.name] = result.S.double().cpu()
        out.residual[site.name] = torch.maximum(result.res_left, result.res_right).double().cpu()
        if op.shape[1] == op.shape[2]:
            out.overlap[site.name] = ra_metrics.singular_vector_overlap(result.U, result.V).double().cpu()
    if len(members) >= 2:
        _measure_alignment(members, captured, svds, ops, settings, out)
        H = torch.stack([captured.sites[members[0].name].x] + [captured.sites[s.name].y for s in members], dim=1)
        out.trajectory = {k: v.cpu() for k, v in ra_metrics.trajectory_stats(H).items()}
        points, share = ra_metrics.trajectory_projection(H[:PROJECTED_SAMPLES])
        out.projection = points.double().cpu(), share.double().cpu()
    return out


def _measure_alignment(members: list[Site], captured: Captured, svds, ops, settings: Settings,
                       out: GroupMeasurement) -> None:
    """RA2 within a group: M_ij = U_jᵀ J_i V_j for every ordered pair i ≠ j: K·(m−1) products per site
    and sample, in one chunked block product J_i [V_j …] (a dense site's J_i is already formed)."""
    K = min(settings.align_k or settings.k, *(svds[s.name].S.shape[1] for s in members))
    for site_i in members:
        tick = time.perf_counter()
        op, before = ops[site_i.name], ops[site_i.name].products
        S_i = svds[site_i.name].S[:, :K]
        partners = [s for s in members if s is not site_i]
        V = torch.cat([svds[s.name].V[:, :, :K] for s in partners], dim=2)
        JV = op.matmat(V)
        for index, site_j in enumerate(partners):
            M = svds[site_j.name].U[:, :, :K].transpose(1, 2) @ JV[:, :, index * K:(index + 1) * K]
            key = (site_i.name, site_j.name)
            out.alignment[key] = ra_metrics.alignment_score(M, S_i).double().cpu()
            out.heatmap[key] = M.abs().sum(dim=0).double().cpu()
        out.timing[site_i.name].update(align_seconds=time.perf_counter() - tick, align_products=op.products - before)


def _mean_std(values: torch.Tensor) -> tuple[float, float]:
    return values.mean().item(), (values.std(unbiased=False).item() if values.numel() > 1 else 0.0)


def summarize(sites: list[Site], measured: Measured, loaded: LoadedModel, settings: Settings,
              labels: torch.Tensor | None = None) -> dict[str, Any]:
    """Per-site spectra and RA1–RA4 over samples, NC on the classifier features."""
    logits = torch.cat(measured.logits) if measured.logits else None
    num_classes = loaded.num_classes or (logits.shape[1] if logits is not None and logits.ndim == 2 else None)
    fully_connected = bool(sites) and all(len(s.in_shape) == 1 for s in sites)
    per_site, ra3_sites, ra4_sites = {}, [], []
    for site in sites:
        S = torch.cat(measured.site_values("S", site.name))
        rank = ra_metrics.numerical_rank(S, settings.tau).double()
        gap = ra_metrics.singular_gap(S, num_classes) if num_classes else None
        overlaps = measured.site_values("overlap", site.name)
        overlap = torch.cat(overlaps).mean(dim=0).tolist() if overlaps else None
        per_site[site.name] = {
            "singular_values": S.mean(dim=0).tolist(), "singular_values_std": S.std(dim=0, unbiased=False).tolist(),
            "max_residual": torch.cat(measured.site_values("residual", site.name)).max().item(),
            "method": measured.method(site.name), "uv_overlap": overlap, "timing": measured.timing(site.name),
        }
        rank_mean, rank_std = _mean_std(rank)
        ra3_sites.append({"site": site.name, "rank_mean": rank_mean, "rank_std": rank_std,
                          "rank_median": rank.median().item(), "rank_saturated": bool((rank >= S.shape[1]).any()),
                          "gap_mean": None if gap is None else gap.mean().item(),
                          "rank_le_classes": None if num_classes is None else bool(rank.median().item() <= num_classes)})
        s1_mean, s1_std = _mean_std(S[:, 0])
        ra4_sites.append({"site": site.name, "depth": len(ra4_sites) + 1, "sigma1_mean": s1_mean, "sigma1_std": s1_std})

    ra1_groups, ra2_groups = [], []
    for group, members in groups_of(sites).items():
        if len(members) < 2:
            continue
        chunks = measured.trajectories(group)
        stats = {k: torch.cat([t[k] for t in chunks]) for k in chunks[0]}
        entry = {"group": group, "sites": [s.name for s in members]}
        for key, values in stats.items():
            entry[key], entry[f"{key}_std"] = _mean_std(values)
        entry["projection"] = measured.projection(group)
        ra1_groups.append(entry)
        names = [s.name for s in members]
        matrix = [[1.0 if i == j else torch.cat(measured.site_values("alignment", (i, j))).mean().item()
                   for j in names] for i in names]
        pairs = [matrix[a][b] for a in range(len(names)) for b in range(len(names)) if a != b]
        count = sum(len(t) for t in measured.site_values("S", names[0]))
        heatmaps = {f"{i}|{j}": (sum(measured.site_values("heatmap", (i, j))) / count).tolist()
                    for i in names for j in names if i != j}
        ra2_groups.append({"group": group, "sites": names, "score": sum(pairs) / len(pairs), "matrix": matrix,
                           "heatmaps": heatmaps})

    judged = [s["rank_le_classes"] for s in ra3_sites if s["rank_le_classes"] is not None]
    sigma1 = [s["sigma1_mean"] for s in ra4_sites]
    L = len(sites)
    return {
        "site_details": per_site,
        "ra1": {"groups": ra1_groups, "mean_linearity": _mean_or_none([g["linearity"] for g in ra1_groups])},
        "ra2": {"groups": ra2_groups, "mean_score": _mean_or_none([g["score"] for g in ra2_groups]),
                "K": settings.align_k or settings.k},
        "ra3": {"sites": ra3_sites, "tau": settings.tau, "classes": num_classes, "fully_connected": fully_connected,
                "judged": fully_connected and bool(judged),
                "share_rank_le_classes": sum(judged) / len(judged) if judged else None},
        "ra4": {"sites": ra4_sites, "depth": L, "L_times_mean_sigma1": sum(sigma1) if L else None,
                "zero_sites": [s["site"] for s in ra4_sites if s["sigma1_mean"] == 0.0]},
        "nc": _neural_collapse(loaded.module, measured, logits, labels),
    }


def _mean_or_none(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _neural_collapse(module: torch.nn.Module, measured: Measured, logits: torch.Tensor | None,
                     labels: torch.Tensor | None) -> dict | None:
    head = find_classifier(module)
    if head is None or not measured.features or logits is None or logits.ndim != 2:
        return None
    features = torch.cat(measured.features)
    if features.shape[1] != head.in_features or logits.shape[1] != head.out_features:
        return None
    predictions = logits.argmax(dim=1)
    source = "data" if labels is not None else "predictions"
    result = nc_metrics.neural_collapse(features, predictions if labels is None else labels,
                                        head.weight.detach().cpu(), predictions)
    result["labels_from"] = source
    return result
