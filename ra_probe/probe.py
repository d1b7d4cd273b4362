"""The probe (spec §1): sites → capture → engine → metrics, chunk by chunk over the samples, and the
report as plain data. `probe()` is the library entry point; the CLI is a thin layer over it."""
from __future__ import annotations

import math
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch

from ra_probe.cache import ResultCache, RunCache
from ra_probe.capture import Captured, capture, find_classifier, logits_of
from ra_probe.data import Samples, check_labels, chunks, run_model, take, to, unpadded
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
    solver: str = "auto"  # auto | dense | block | lanczos
    chunk: int = 16  # vectors per vmapped Jacobian product call
    dense_limit: int = DENSE_LIMIT  # largest site dimension whose Jacobian is formed exactly
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


@contextmanager
def prepared(model: torch.nn.Module, settings: Settings) -> Iterator[torch.nn.Module]:
    """`model` itself, never a copy, made ready to probe for the duration of the block: eval mode,
    parameters frozen, on the probe's device and dtype, eval-mode BatchNorm2d as the per-channel affine
    map it computes, TF32 off (spectra in true float32). On exit every module's mode, every parameter's
    grad flag, device and dtype, the swapped BatchNorms and the TF32 flags are as they were."""
    modes = {m: m.training for m in model.modules()}
    grads = {p: p.requires_grad for p in model.parameters()}
    data = {p: p.data for p in model.parameters()}
    buffers = {m: dict(m._buffers) for m in model.modules()}
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    model.eval().requires_grad_(False)
    swapped = _affine_batch_norms(model)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        yield model.to(settings.resolved_device(), DTYPES[settings.dtype])
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        for parent, name, original in swapped:
            setattr(parent, name, original)
        for parameter, tensor in data.items():
            parameter.data = tensor
        for module, kept in buffers.items():
            module._buffers.update(kept)
        for parameter, flag in grads.items():
            parameter.requires_grad_(flag)
        for module, mode in modes.items():
            module.training = mode


class _ChannelAffine(torch.nn.Module):
    """An eval-mode BatchNorm2d as what it computes, x·scale + shift per channel: the same outputs, and
    a forward-mode product of one multiply instead of batch_norm's formula (~15% of a conv J·v on CPU)."""

    def __init__(self, norm: torch.nn.BatchNorm2d):
        super().__init__()
        scale = torch.rsqrt(norm.running_var + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight
        shift = -norm.running_mean * scale + (norm.bias if norm.bias is not None else 0.0)
        self.register_buffer("scale", scale.detach().reshape(1, -1, 1, 1))
        self.register_buffer("shift", shift.detach().reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def _affine_batch_norms(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """Swap every BatchNorm2d that has running statistics for its `_ChannelAffine` (one without them
    normalizes with its batch's statistics, which the independence check reports); returns what to
    put back, as (parent, name, original)."""
    swapped = []
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is torch.nn.BatchNorm2d and child.running_mean is not None:
                setattr(parent, name, _ChannelAffine(child))
                swapped.append((parent, name, child))
    return swapped


def discover(model: torch.nn.Module, samples: Samples, settings: Settings) -> SiteReport:
    """Sites found by the adapters and verified on a real forward of the first samples, after checking
    that the model treats samples independently (each sample's Jacobian is its own)."""
    report = find_sites(model)
    device, dtype = settings.resolved_device(), DTYPES[settings.dtype]
    first = to(unpadded(take(samples.inputs, chunks(samples.inputs, 4)[0])), device, dtype)
    try:
        captured = capture(model, first, report.sites, with_head=False)
        alone = capture(model, take(first, slice(0, 1)), report.sites, with_head=False)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise UserError(f"data {samples.name!r} does not fit the model: {str(exc).strip().splitlines()[0]}") from None
    _check_independent(captured, alone)
    return verify_sites(report, captured)


def _check_independent(batch: Captured, alone: Captured) -> None:
    """The first sample's output and site values must not depend on the other samples of its batch:
    batch statistics (BatchNorm in training mode or without running statistics) or any other layer
    that mixes samples would make every Jacobian wrong."""
    pairs = [(batch.logits, alone.logits)] + [(batch.sites[name].y, record.y) for name, record in alone.sites.items()
                                              if name in batch.sites]
    for together, single in pairs:
        if not isinstance(together, torch.Tensor) or len(together) < 2 or together.shape[1:] != single.shape[1:]:
            continue
        finite = torch.isfinite(single) & torch.isfinite(together[:1])  # NaN weights are flagged elsewhere
        gap = (together[:1] - single)[finite].abs()
        scale = single[finite].abs().max() if gap.numel() else None
        if gap.numel() and not bool(gap.max() <= 1e-4 * scale.clamp_min(torch.finfo(single.dtype).tiny)):
            raise UserError("the model's samples interact: a sample's output changes with the other samples of its "
                            "batch (BatchNorm in training mode or without running statistics, or another "
                            "batch-dependent layer); per-sample Jacobians need a model that treats samples "
                            "independently")


def output_classes(model: torch.nn.Module, samples: Samples, settings: Settings) -> int | None:
    """How many classes the model's output scores: the width of its 2-D logits for one sample."""
    one = to(unpadded(take(samples.inputs, chunks(samples.inputs, 1)[0])), settings.resolved_device(),
             DTYPES[settings.dtype])
    with torch.no_grad():
        logits = logits_of(run_model(model, one))
    return logits.shape[1] if isinstance(logits, torch.Tensor) and logits.ndim == 2 else None


def probe(loaded: LoadedModel, samples: Samples, settings: Settings | None = None,
          progress: Progress | None = None, cache: ResultCache | None = None) -> dict[str, Any]:
    """Probe `loaded` on `samples`: the full report as a JSON-ready dict (see report.build_report).
    With a `cache`, group measurements already stored are reused and new ones are stored."""
    from ra_probe.report import build_report

    settings = settings or Settings()
    started = time.perf_counter()
    device = settings.resolved_device()
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []), \
            prepared(loaded.module, settings) as model:
        torch.manual_seed(settings.seed)  # a model that draws random numbers draws the same ones each run
        check_labels(samples, loaded.num_classes or output_classes(model, samples, settings))
        site_report = discover(model, samples, settings)
        run_cache = cache.for_run(model, loaded.name, settings, site_report.adapter) if cache is not None else None
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
    order: list[torch.Tensor] = field(default_factory=list)  # the samples of each chunk, by index
    finite_outputs: bool = True

    def sample_order(self) -> torch.Tensor:
        """Sample indices in the order of the concatenated per-sample results."""
        return torch.cat(self.order)

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
    indices = chunks(samples.inputs, batch_size)
    total, done = len(sites) * len(indices), 0
    for index in indices:
        chunk = to(unpadded(take(samples.inputs, index)), device, dtype)
        captured = capture(model, chunk, sites)
        out.order.append(index)
        if captured.features is not None:
            out.features.append(captured.features.double().cpu())
        if captured.logits is not None:
            out.finite_outputs &= bool(torch.isfinite(captured.logits).all())
            if captured.logits.ndim == 2:  # class scores; per-token outputs differ in length across chunks
                out.logits.append(captured.logits.double().cpu())
        for group, members in groups_of(sites).items():
            if progress:
                progress(members[0].name, done, total)
            out.groups.append(_measure_group_cached(cache, group, members, captured, settings))
            done += len(members)
    if progress:
        progress("done", total, total)
    return out


def _auto_batch_size(sites: list[Site], samples: int, settings: Settings) -> int:
    """Samples per chunk from the device's free memory and the sites' sizes (engine.memory)."""
    dims = [[(math.prod(s.in_shape), math.prod(s.out_shape)) for s in members] for members in groups_of(sites).values()]
    device = settings.resolved_device()
    return auto_batch_size(dims, samples, device, k=settings.k, align_k=settings.align_k or settings.k,
                           block=default_block(settings.k, 1, device), chunk=settings.chunk,
                           itemsize=DTYPES[settings.dtype].itemsize)

def _measure_group_cached(cache: RunCache | None, group: int, members: list[Site], captured: Captured,
                          settings: Settings) -> GroupMeasurement:
    """`measure_group`, served from `cache` when it holds a measurement of the same sites on the same
    captured values (the group's inputs and outputs: what the model computed, not what it is called)."""
    if cache is None:
        return measure_group(group, members, captured, settings)
    values = [t for s in members for t in (captured.sites[s.name].x, captured.sites[s.name].y)]
    return cache.get_or_compute([s.name for s in members], values,
                                lambda: measure_group(group, members, captured, settings), GroupMeasurement)


def measure_group(group: int, members: list[Site], captured: Captured, settings: Settings) -> GroupMeasurement:
    """Top-k SVD of every site of a group on one chunk, then RA2 alignment and RA1 trajectories."""
    out = GroupMeasurement(group)
    svds, ops = {}, {}
    for site in members:
        record = captured.sites[site.name]
        tick = time.perf_counter()
        jacobian = JacobianOperator(site.branch, record.x, record.ctx, chunk=settings.chunk)
        method = choose_method(jacobian.shape, settings.solver, settings.dense_limit)
        op = DenseOperator(jacobian.dense()) if method == "dense" else jacobian  # formed once, reused by RA2
        result = solve(op, settings.k, method=method, tol=settings.tol, seed=settings.seed)
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
    """Mean and (biased) standard deviation over the defined values (NaN marks an undefined sample,
    e.g. one whose branches are exactly zero); NaN when none is defined."""
    defined = values[~values.isnan()]
    if not defined.numel():
        return math.nan, math.nan
    return defined.mean().item(), (defined.std(unbiased=False).item() if defined.numel() > 1 else 0.0)


def summarize(sites: list[Site], measured: Measured, loaded: LoadedModel, settings: Settings,
              labels: torch.Tensor | None = None) -> dict[str, Any]:
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

    ra1_groups, ra2_groups = [], []
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
        alignment = {(i, j): torch.cat(measured.site_values("alignment", (i, j)))
                     for i in names for j in names if i != j}
        matrix = [[1.0 if i == j else _mean_std(alignment[i, j])[0] for j in names] for i in names]
        pairs = [matrix[a][b] for a in range(len(names)) for b in range(len(names)) if a != b]
        undefined = torch.stack(list(alignment.values())).isnan().any(dim=0)
        count = sum(len(t) for t in measured.site_values("S", names[0]))
        heatmaps = {f"{i}|{j}": (sum(measured.site_values("heatmap", (i, j))) / count).tolist()
                    for i in names for j in names if i != j}
        ra2_groups.append({"group": group, "sites": names, "score": sum(pairs) / len(pairs), "matrix": matrix,
                           "heatmaps": heatmaps, "undefined_samples": int(undefined.sum())})

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
                "undetermined": sorted({s["undetermined"] for s in ra3_sites if s["undetermined"]}),
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
    labels = None if labels is None else labels[measured.sample_order()]
    result = nc_metrics.neural_collapse(features, predictions if labels is None else labels,
                                        head.weight.detach().cpu(), predictions)
    result["labels_from"] = source
    return result
