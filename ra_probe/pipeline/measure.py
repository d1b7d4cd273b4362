"""Measurement: the top-k SVD of every site's Residual Jacobian, the RA2 alignment products and the
RA1 trajectories, group by group and chunk of samples by chunk (each served from the cache when it
holds it)."""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ra_probe.engine import JacobianOperator, auto_batch_size, choose_method, default_width, solve_operator, wide_calls
from ra_probe.engine.memory import bytes_per_sample
from ra_probe.engine.operators import branch_saved_bytes
from ra_probe.errors import UserError, first_line
from ra_probe.host import trim_freed_memory
from ra_probe.load.offload import Offloading, held, offloading
from ra_probe.load.samples import Samples, batch, chunks, real_tokens, take
from ra_probe.metrics import nc as nc_metrics
from ra_probe.metrics import ra as ra_metrics
from ra_probe.pipeline.cache import RunCache
from ra_probe.pipeline.settings import Progress, Settings
from ra_probe.sites.capture import Captured, SiteRecord, capture
from ra_probe.sites.records import Group, VerifiedSite

PROJECTED_SAMPLES = 16  # RA1 trajectories kept per group for the report's picture


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
    coupling: dict[tuple[str, str, int], torch.Tensor] = field(default_factory=dict)  # (i, j, K) → (B,)
    trajectory: dict[str, torch.Tensor] | None = None  # RA1 statistic → (B,)
    projection: tuple[torch.Tensor, torch.Tensor] | None = None  # RA1 picture: (P, m+1, 2) points, (2,) shares


@dataclass
class Measured:
    """Everything measured, chunk by chunk: group measurements in order, classifier features, logits."""

    groups: list[GroupMeasurement] = field(default_factory=list)
    batch_size: int = 0  # samples per chunk
    features: list[torch.Tensor] = field(default_factory=list)
    next_tokens: list[tuple[torch.Tensor, ...]] = field(default_factory=list)  # LM: features, next tokens, predictions
    logits: list[torch.Tensor] = field(default_factory=list)
    order: list[torch.Tensor] = field(default_factory=list)  # the samples of each chunk, by index
    finite_outputs: bool = True
    peak: PeakEstimate | None = None  # the memory the probe was estimated to need

    @property
    def samples(self) -> int:
        """How many samples were measured."""
        return sum(len(order) for order in self.order)

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


@dataclass
class ChunkCost:
    """What one chunk of samples cost: its wall seconds (capture and measurement), and for the groups
    served from the cache, the seconds they took when first measured (not spent now)."""

    samples: torch.Tensor  # the chunk's sample indices
    seconds: float
    cached_seconds: float = 0.0
    served: int = 0  # groups served from the cache
    groups: list[GroupMeasurement] = field(default_factory=list)


def measure(model: torch.nn.Module, groups: Sequence[Group], samples: Samples, settings: Settings,
            progress: Progress | None = None, cache: RunCache | None = None) -> Measured:
    """Spectra, alignment and trajectories of every site of `groups`, chunk of samples by chunk (each
    group and chunk served from `cache` when it holds it)."""
    out = Measured()
    for _ in measuring(out, model, groups, samples, settings, progress, cache):
        pass
    return out


def measuring(out: Measured, model: torch.nn.Module, groups: Sequence[Group], samples: Samples, settings: Settings,
              progress: Progress | None = None, cache: RunCache | None = None,
              first_alone: bool = False, rounds: list[int] | None = None) -> Iterator[ChunkCost]:
    """`measure` into `out`, yielding each chunk's cost once it is measured. `first_alone`: the first
    sample is a chunk of its own, so that what a whole sample costs is known after one sample (the
    solver's random vectors follow the sample, so its results are those of any chunking). `rounds`:
    sample counts no chunk straddles (after each, the caller may stop)."""
    device, dtype = settings.resolved_device(), settings.resolved_dtype()
    n = len(samples)
    if settings.tokens == "last" and real_tokens(samples.inputs) is None:
        raise UserError("--tokens last takes text data (token ids with an attention mask): "
                        f"{samples.name!r} is not")
    sites = [site for group in groups for site in group.sites]
    out.peak = peak_estimate(model, groups, samples, settings)
    batch_size = out.batch_size = out.peak.samples
    hold = offloading(model)
    bounds = [0, *[r for r in rounds or () if 0 < r < n], n]
    indices = [index + start for start, end in zip(bounds, bounds[1:])
               for index in chunks(take(samples.inputs, slice(start, end)), batch_size)]
    if first_alone and len(indices[0]) > 1:
        indices[:1] = [indices[0][:1], indices[0][1:]]
    total, done = len(sites) * len(indices), 0

    def site_done(what: str, seconds: float, products: int, advance: int = 1) -> None:
        nonlocal done
        done += advance
        if progress:
            progress(f"{what} ({seconds:.1f} s, {products} products)" if products else what, done, total)
    for number, index in enumerate(indices, 1):
        tick = time.perf_counter()
        chunk = batch(samples.inputs, index, device, dtype)
        captured = captured_sites(model, chunk, sites, settings)
        out.order.append(index)
        if captured.features is not None and captured.features.ndim == 3:  # a language model's head, per token
            if isinstance(chunk, dict) and "input_ids" in chunk:
                out.next_tokens.append(tuple(t.cpu() for t in nc_metrics.next_token_samples(
                    captured.features, captured.logits, chunk["input_ids"])))
        elif captured.features is not None:
            out.features.append(captured.features.double().cpu())
        if captured.logits is not None:
            out.finite_outputs &= bool(torch.isfinite(captured.logits).all())
            if captured.logits.ndim == 2:  # class scores; per-token outputs differ in length across chunks
                out.logits.append(captured.logits.double().cpu())
        where = f", chunk {number}/{len(indices)}" if len(indices) > 1 else ""
        cost = ChunkCost(index, 0.0)
        for group in groups:
            end = done + len(group.sites)
            say = lambda what, seconds, products, advance=1: site_done(f"{what}{where}", seconds, products, advance)  # noqa: B023, E731
            measurement, served = _measure_group_cached(cache, group, captured, settings, index, say, hold)
            out.groups.append(measurement)
            cost.groups.append(measurement)
            if served:  # nothing was measured: what it cost when it was
                cost.served += 1
                cost.cached_seconds += sum(t["seconds"] + t["align_seconds"] for t in measurement.timing.values())
            if done < end:
                site_done(f"group {group.index}{where} from the cache", 0.0, 0, end - done)
        del chunk, captured  # a suspended caller (another measurement meanwhile) holds none of the chunk
        cost.seconds = time.perf_counter() - tick
        yield cost


def captured_sites(model: torch.nn.Module, chunk: Any, sites: list[VerifiedSite], settings: Settings) -> Captured:
    """The sites' inputs, outputs and side inputs on a chunk of model inputs, at the last token with
    `tokens` "last"."""
    captured = capture(model, chunk, sites)
    return at_last_token(sites, captured) if settings.tokens == "last" else captured


def at_last_token(sites: list[VerifiedSite], captured: Captured) -> Captured:
    """The sites' captured values at the last token of each sentence (a chunk's sentences have no
    padding, see `load.data.unpadded`, so it is the last position), with the sentences' tokens, from
    which `branch_of` recomputes each site's branch as a function of that token's input alone."""
    records = {}
    for site in sites:
        record = captured.sites[site.name]
        if record.x.ndim < 3 or record.y.shape[:2] != record.x.shape[:2]:
            raise UserError(f"--tokens last: site {site.name} has no token axis (input {tuple(record.x.shape)}, "
                            f"output {tuple(record.y.shape)}); it takes a text model's sites")
        records[site.name] = SiteRecord(record.x[:, -1], record.y[:, -1], {"tokens": record.x, "ctx": record.ctx},
                                        record.order)
    return dataclasses.replace(captured, sites=records)


def branch_of(site: VerifiedSite, settings: Settings):
    """The function whose Jacobian is measured at `site`: its branch, or at the last token (`tokens`
    "last"), F(x)[:, -1] as a function of that token's input alone, x's earlier tokens held at their
    captured values (see `at_last_token`)."""
    return _last_token_branch(site.branch) if settings.tokens == "last" else site.branch


def _last_token_branch(branch):
    def at_last(x: torch.Tensor, ctx) -> torch.Tensor:
        tokens = ctx["tokens"]
        return branch(torch.cat([tokens[:, :-1], x.unsqueeze(1)], dim=1), ctx["ctx"])[:, -1]
    return at_last


@dataclass
class PeakEstimate:
    """What a probe is estimated to hold at its peak, in bytes (engine.memory): the model's weights on
    its devices, the most offloaded weights made resident at once (one site's block), and what each
    sample of a chunk costs."""

    weights: int
    resident_block: int
    per_sample: int
    samples: int  # per chunk

    @property
    def total(self) -> int:
        return self.weights + self.resident_block + self.per_sample * self.samples


def peak_estimate(model: torch.nn.Module, groups: Sequence[Group], samples: Samples, settings: Settings) -> PeakEstimate:
    """The probe's peak memory, with chunks of `settings.batch_size` samples, or as many of `samples`
    as the device's free memory allows (sized by what each site's branch saves of the first sample)."""
    device, dtype = settings.resolved_device(), settings.resolved_dtype()
    dims, memory = site_dims(model, groups, samples, settings), _memory_settings(settings)
    offload = offloading(model)
    resident = offload.largest_block([site for group in groups for site in group.sites], dtype.itemsize)
    batch_size = settings.batch_size or auto_batch_size(dims, len(samples), device, held=resident, **memory)
    return PeakEstimate(offload.device_bytes(), resident, bytes_per_sample(dims, device=device, **memory), batch_size)


def site_dims(model: torch.nn.Module, groups: Sequence[Group], samples: Samples,
              settings: Settings) -> list[list[tuple[int, int, str, int]]]:
    """(input dimension, output dimension, solver, bytes its branch saves a sample) of every site, by
    group, as engine.memory takes them; the bytes measured on the first sample of `samples`."""
    itemsize = settings.resolved_dtype().itemsize
    saved = saved_bytes(model, [site for group in groups for site in group.sites], samples, settings)

    def sized(site: VerifiedSite, partners: list[VerifiedSite]) -> tuple[int, int, str, int]:
        n, m = math.prod(site.in_shape), math.prod(site.out_shape)
        return n, m, choose_method((1, m, n), settings.solver, settings.dense_limit, k=settings.k,
                                   itemsize=itemsize, after=len(partners) * settings.widest_alignment_k()), saved[site.name]

    partnered = [(group.sites, alignment_partners(group.sites, settings)) for group in groups]
    return [[sized(s, partners[s.name]) for s in members] for members, partners in partnered]


def saved_bytes(model: torch.nn.Module, sites: list[VerifiedSite], samples: Samples, settings: Settings) -> dict[str, int]:
    """Bytes each site's branch saves of its forward on the first sample (`branch_saved_bytes`): one
    forward of the model and one of each branch on that sample, whose freed memory goes back after."""
    device, dtype, hold = settings.resolved_device(), settings.resolved_dtype(), offloading(model)
    captured = captured_sites(model, batch(samples.inputs, torch.arange(1), device, dtype), sites, settings)
    out = {}
    for site in sites:
        record = captured.sites[site.name]
        with held(hold, site):
            out[site.name] = branch_saved_bytes(branch_of(site, settings), record.x, record.ctx)
    del captured
    trim_freed_memory()
    return out


def _memory_settings(settings: Settings) -> dict[str, int]:
    return dict(k=settings.k, align_k=settings.widest_alignment_k(), width=default_width(settings.k),
                vectors_per_call=settings.vectors_per_call,
                itemsize=settings.resolved_dtype().itemsize)


SiteDone = Callable[..., None]  # (what was measured, seconds, products): after each site's SVD and each alignment


def _measure_group_cached(cache: RunCache | None, group: Group, captured: Captured,
                          settings: Settings, sample_ids: torch.Tensor, on_done: SiteDone | None = None,
                          hold: Offloading | None = None) -> tuple[GroupMeasurement, bool]:
    """`measure_group`, served from `cache` when it holds a measurement of the same sites on the same
    captured values (the group's inputs and outputs: what the model computed, not what it is called);
    and whether it was served."""
    computed = []

    def compute() -> GroupMeasurement:
        computed.append(True)
        return measure_group(group, captured, settings, sample_ids, on_done, hold)
    if cache is None:
        return compute(), False
    records = [captured.sites[s.name] for s in group.sites]  # at the last token: the sentences' tokens too
    values = [sample_ids] + [t for r in records for t in (r.x, r.y, r.ctx.get("tokens")) if t is not None]
    measurement = cache.get_or_compute([s.name for s in group.sites], values, compute, GroupMeasurement)
    return measurement, not computed


def measure_group(group: Group, captured: Captured, settings: Settings,
                  sample_ids: torch.Tensor | None = None, on_done: SiteDone | None = None,
                  hold: Offloading | None = None) -> GroupMeasurement:
    """Top-k SVD of every site of a group on one chunk of samples (`sample_ids`, their indices in the
    data: the solver's random vectors follow the sample, not its place in the chunk), then RA2
    alignment and RA1 trajectories. `hold`: what makes a site's offloaded weights resident while
    its products run (a model whose weights accelerate offloads)."""
    members = group.sites
    out = GroupMeasurement(group.index)
    svds, ops, partners = {}, {}, alignment_partners(members, settings)
    for site in members:
        record = captured.sites[site.name]
        tick = time.perf_counter()
        # at the last token, a tangent runs through every token of the sentence
        tangent_size = record.ctx["tokens"][0].numel() if settings.tokens == "last" else None
        with held(hold, site):
            jacobian = JacobianOperator(branch_of(site, settings), record.x, record.ctx,
                                        vectors_per_call=settings.vectors_per_call,
                                        tangent_size=tangent_size)
            try:  # op: J formed once (in wide calls) where the dense solver was chosen, reused by RA2
                op, result = solve_operator(jacobian, settings.k, method=settings.solver, tol=settings.tol,
                                            dense_limit=settings.dense_limit, seed=settings.seed,
                                            sample_ids=sample_ids, after=len(partners[site.name]) * settings.widest_alignment_k())
            except NotImplementedError as exc:  # an operation of the branch without a forward-mode derivative
                raise UserError(f"site {site.name}: {first_line(exc)}") from None
            # what the products saved of the branch's forward (activations, attention maps: up to GBs a
            # site at high resolution; an offloaded block's weights) goes while the group's other sites
            # are solved; RA2's products build the linearized program again from the kept trace
            op.release(keep_trace=hold is None or not hold.offloaded)
        trim_freed_memory()
        ops[site.name] = op
        svds[site.name] = result
        out.timing[site.name] = {"seconds": time.perf_counter() - tick, "products": result.products,
                                 "iterations": result.iterations,
                                 "converged": int(result.converged.sum()), "samples": op.shape[0],
                                 "align_seconds": 0.0, "align_products": 0}  # a site alone in its group aligns with none
        out.method[site.name] = result.method
        out.S[site.name] = result.S.double().cpu()
        out.residual[site.name] = torch.maximum(result.res_left, result.res_right).double().cpu()
        if op.shape[1] == op.shape[2]:
            out.overlap[site.name] = ra_metrics.singular_vector_overlap(result.U, result.V).double().cpu()
        if on_done:
            on_done(site.name, out.timing[site.name]["seconds"], out.timing[site.name]["products"])
    if len(members) >= 2:
        _measure_alignment(members, partners, svds, ops, settings, out, hold)
        if on_done:
            timings = [out.timing[s.name] for s in members]
            on_done(f"group {group.index} RA2 alignment", sum(t["align_seconds"] for t in timings),
                    sum(t["align_products"] for t in timings), advance=0)
        first = captured.sites[members[0].name].x
        H = torch.stack([first] + [captured.sites[s.name].y.to(first.device) for s in members], dim=1)
        out.trajectory = {k: v.cpu() for k, v in ra_metrics.trajectory_stats(H).items()}
        points, share = ra_metrics.trajectory_projection(H[:PROJECTED_SAMPLES])
        out.projection = points.double().cpu(), share.double().cpu()
    return out


def alignment_partners(members: Sequence[VerifiedSite], settings: Settings) -> dict[str, list[VerifiedSite]]:
    """Each site's partners j of a group, those whose M_ij RA2 and coupling measure: every other site,
    or in a large group a sample of them (`align_pairs`, see `ra.alignment_pairs`)."""
    partners = ra_metrics.partners_per_site(len(members), settings.align_pairs)
    out: dict[str, list[VerifiedSite]] = {site.name: [] for site in members}
    for a, b in ra_metrics.alignment_pairs(len(members), partners, settings.seed):
        out[members[a].name].append(members[b])
    return out


def _measure_alignment(members: Sequence[VerifiedSite], partners_of: dict[str, list[VerifiedSite]], svds, ops,
                       settings: Settings, out: GroupMeasurement, hold: Offloading | None = None) -> None:
    """RA2 and block coupling within a group from M_ij = U_jᵀ J_i V_j for each site i and its partners
    j: J_i applied to the partners' top vectors in one wide block product J_i [V_j …] (a dense site's
    J_i is already formed), then every partner's U_jᵀ in one batched product. K of the largest of RA2
    and coupling; each takes M's leading K×K block. `hold`: as in `measure_group`."""
    available = min(svds[s.name].S.shape[1] for s in members)
    K = min(settings.alignment_k(), available)
    wide = max([K, *(c for c in settings.coupling_k if c <= available)])
    for site_i in members:
        tick, partners = time.perf_counter(), partners_of[site_i.name]
        op, before = ops[site_i.name], ops[site_i.name].products
        S_i = svds[site_i.name].S[:, :wide]
        here = S_i.device  # the device of J_i's block; a model split across devices has the others elsewhere
        V = torch.cat([svds[s.name].V[:, :, :wide].to(here) for s in partners], dim=2)
        with held(hold, site_i), wide_calls(op, V.shape[2]):
            JV = op.matmat(V).unflatten(2, (len(partners), wide))  # (B, m, P, K)
            op.release(keep_trace=False)
        trim_freed_memory()
        U = torch.stack([svds[s.name].U[:, :, :wide].to(here) for s in partners], dim=1)  # (B, P, m, K)
        Ms = torch.einsum("bpmk,bmpl->bpkl", U, JV)  # (B, P, K, K): M_ij of each partner j
        for index, site_j in enumerate(partners):
            M, key = Ms[:, index], (site_i.name, site_j.name)
            out.alignment[key] = ra_metrics.alignment_score(M[:, :K, :K], S_i[:, :K]).double().cpu()
            out.heatmap[key] = M[:, :K, :K].abs().sum(dim=0).double().cpu()
            for c in (c for c in settings.coupling_k if c <= available):
                out.coupling[(*key, c)] = ra_metrics.coupling_score(M[:, :c, :c], S_i[:, :c]).double().cpu()
        out.timing[site_i.name].update(align_seconds=time.perf_counter() - tick, align_products=op.products - before)


