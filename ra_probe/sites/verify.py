"""Verification of the sites on a real forward: a site is kept only when `post(skip(x) + F(x))`
reproduces the block's captured output; the kept sites are then grouped into stages that chain."""
from __future__ import annotations

from dataclasses import replace

import torch

from ra_probe.errors import first_line
from ra_probe.sites.capture import Captured, SiteRecord
from ra_probe.sites.records import Site, SiteReport, Skipped, each_call, per_sample

VERIFY_RTOL = 1e-3
CHAIN_RTOL = 1e-5  # a site's input "is" the previous site's output up to float32 rounding of a copy


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(torch.finfo(b.dtype).tiny)).item()


def verify_sites(report: SiteReport, captured: Captured) -> SiteReport:
    """Keep the sites whose `post(skip(x) + F(x))` reproduces the captured block output; report the
    others as skipped with the reason. Then fill shapes and groups."""
    kept, skipped = [], list(report.skipped)
    for site in each_call(report.sites, captured.calls):
        record = captured.sites.get(site.name)
        if record is None:
            skipped.append(Skipped(site.name, "not reached by the forward pass"))
            continue
        shape = _not_a_tensor(record) or _not_per_sample(record, captured.batch)
        if shape is not None:
            skipped.append(Skipped(site.name, shape))
            continue
        site, record = _per_sample_site(site, record, captured.batch)
        captured.sites[site.name] = record
        if not (torch.isfinite(record.x).all() and torch.isfinite(record.y).all()):
            skipped.append(Skipped(site.name, "NaN or Inf in the block's input or output (non-finite weights?)"))
            continue
        try:
            with torch.no_grad():
                rebuilt = site.output_from(record.x, record.ctx)
            site.verify_error = relative_error(rebuilt, record.y)
        except Exception as exc:  # an adapter's branch that cannot run is a skipped site, not a crash
            skipped.append(Skipped(site.name, f"its branch cannot be recomputed from the captured input "
                                              f"({first_line(exc)})", site))
            continue
        if not site.verify_error <= VERIFY_RTOL:
            skipped.append(Skipped(site.name, f"post(skip(x)+F(x)) differs from the block output "
                                              f"(relative error {site.verify_error:.2e})", site))
            continue
        site.in_shape, site.out_shape = tuple(record.x.shape[1:]), tuple(record.y.shape[1:])
        kept.append(site)
    # in the order the forward computes them (a parent block's add after its children's, whatever the
    # order the modules were registered in)
    kept.sort(key=lambda site: captured.sites[site.name].order)
    assign_groups(kept, captured)
    return SiteReport(report.adapter, kept, skipped)


def _not_a_tensor(record) -> str | None:
    """Why a site's captured input or output cannot be measured: it is not one tensor (a block that
    takes or returns a tuple, a dict, a dataclass...)."""
    for what, value in (("input", record.x), ("output", record.y)):
        if not isinstance(value, torch.Tensor):
            return f"the block's {what} is a {type(value).__name__}, not one tensor: no Jacobian of one tensor to measure"
    return None


def _not_per_sample(record, batch: int) -> str | None:
    """Why a site's tensors cannot be split by sample: a first dimension that is not a multiple of it."""
    if all(len(t) % batch == 0 for t in (record.x, record.y)):
        return None
    return (f"its tensors ({tuple(record.x.shape)} in, {tuple(record.y.shape)} out) do not hold the {batch} samples "
            "along their first dimension: no per-sample Jacobian")


def _per_sample_site(site: Site, record: SiteRecord, batch: int) -> tuple[Site, SiteRecord]:
    """A site whose tensors hold several rows per sample in their first dimension (windows, patches,
    tokens flattened with the batch) re-expressed on (samples, rows, ...) tensors, so that each sample's
    Jacobian covers all of its rows; other sites as they are."""
    rows_in, rows_out = (len(t) != batch for t in (record.x, record.y))
    if not (rows_in or rows_out) or site.input_tap.rows or site.output_tap.rows:
        return site, record

    def flat(fn, rows):
        if fn is None and not rows:
            return None
        fn = fn or (lambda t: t)
        return lambda t, *ctx: per_sample(fn(t.flatten(0, 1) if rows else t, *ctx), t.shape[0])
    wrapped = replace(site, branch=flat(site.branch, rows_in), skip=flat(site.skip, rows_in),
                      post=flat(site.post, rows_in), input_tap=replace(site.input_tap, rows=True),
                      output_tap=replace(site.output_tap, rows=True))
    return wrapped, SiteRecord(per_sample(record.x, batch), per_sample(record.y, batch), record.ctx, record.order)


def assign_groups(sites: list[Site], captured: Captured) -> None:
    """Consecutive sites form a group (a stage) while they chain: each site's input is, numerically on
    the captured forward, the previous site's output, with equal shapes and no projection. Each site
    that starts a group says why in `group_start`."""
    group, previous = -1, None
    for site in sites:
        why = _group_break(previous, site, captured)
        if why is not None:
            group += 1
        site.group, site.group_start, previous = group, why, site


def _group_break(previous: Site | None, site: Site, captured: Captured) -> str | None:
    """Why `site` cannot continue the group of `previous` (None when it can)."""
    if previous is None:
        return "first site"
    if "projection" in (site.kind, previous.kind):
        return "projection skip"
    if not site.in_shape == site.out_shape == previous.in_shape == previous.out_shape:
        return "shape changes"
    before, now = captured.sites[previous.name].y, captured.sites[site.name].x
    if before.shape != now.shape or relative_error(now, before.to(now.device)) > CHAIN_RTOL:
        return "its input is not the previous site's output (layers in between)"
    return None
