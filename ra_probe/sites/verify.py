"""Verification of the sites on a real forward: a site is kept only when `post(skip(x) + F(x))`
reproduces the block's captured output; the kept sites are then grouped into stages that chain."""
from __future__ import annotations

import torch

from ra_probe.errors import first_line
from ra_probe.sites.capture import Captured, SiteRecord
from ra_probe.sites.records import (
    Found,
    Group,
    Site,
    SiteReport,
    Skipped,
    VerifiedSite,
    each_call,
    output_by_rows,
    per_sample,
)

VERIFY_RTOL = 1e-3
CHAIN_RTOL = 1e-5  # a site's input "is" the previous site's output up to float32 rounding of a copy


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(torch.finfo(b.dtype).tiny)).item()


def verify_sites(found: Found, captured: Captured) -> SiteReport:
    """The sites `found` whose `post(skip(x) + F(x))` reproduces the captured block output, at each call of
    their block, in groups; the others skipped with the reason."""
    kept, skipped = [], list(found.skipped)
    for at in each_call(found, captured.calls):
        record = captured.sites.get(at.name)
        if record is None:
            skipped.append(Skipped(at.name, "not reached by the forward pass"))
            continue
        shape = _not_a_tensor(record) or _not_per_sample(record, captured.batch)
        if shape is not None:
            skipped.append(Skipped(at.name, shape))
            continue
        rows_in, rows_out, record = _per_sample(at.site, record, captured.batch)
        captured.sites[at.name] = record
        if not (torch.isfinite(record.x).all() and torch.isfinite(record.y).all()):
            skipped.append(Skipped(at.name, "NaN or Inf in the block's input or output (non-finite weights?)"))
            continue
        try:
            with torch.no_grad():
                error = relative_error(output_by_rows(at.site, record.x, record.ctx, rows_in, rows_out), record.y)
        except Exception as exc:  # an adapter's branch that cannot run is a skipped site, not a crash
            skipped.append(Skipped(at.name, f"its branch cannot be recomputed from the captured input "
                                            f"({first_line(exc)})", at.site, at.adapter))
            continue
        if not error <= VERIFY_RTOL:
            skipped.append(Skipped(at.name, f"post(skip(x)+F(x)) differs from the block output "
                                            f"(relative error {error:.2e})", at.site, at.adapter))
            continue
        kept.append(VerifiedSite(at, tuple(record.x.shape[1:]), tuple(record.y.shape[1:]), error, rows_in, rows_out))
    # in the order the forward computes them (a parent block's add after its children's, whatever the
    # order the modules were registered in)
    kept.sort(key=lambda site: captured.sites[site.name].order)
    return SiteReport(found.adapter, grouped(kept, captured), tuple(skipped))


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


def _per_sample(site: Site, record: SiteRecord, batch: int) -> tuple[bool, bool, SiteRecord]:
    """Whether a site's input and output hold several rows per sample in their first dimension (windows,
    patches, tokens flattened with the batch), and its record re-expressed on (samples, rows, ...)
    tensors, so that each sample's Jacobian covers all of its rows (see `VerifiedSite`). A site whose
    taps regroup rows already, and any other, as it is."""
    rows_in, rows_out = (len(t) != batch for t in (record.x, record.y))
    if not (rows_in or rows_out) or site.input_tap.rows or site.output_tap.rows:
        return False, False, record
    return rows_in, rows_out, SiteRecord(per_sample(record.x, batch), per_sample(record.y, batch), record.ctx,
                                         record.order)


def grouped(sites: list[VerifiedSite], captured: Captured) -> tuple[Group, ...]:
    """Consecutive sites form a group (a stage) while they chain: each site's input is, numerically on
    the captured forward, the previous site's output, with equal shapes and no projection. Each group
    says why it starts."""
    starts: list[tuple[str, list[VerifiedSite]]] = []
    previous = None
    for site in sites:
        why = _group_break(previous, site, captured)
        if why is not None:
            starts.append((why, []))
        starts[-1][1].append(site)
        previous = site
    return tuple(Group(index, tuple(members), why) for index, (why, members) in enumerate(starts))


def _group_break(previous: VerifiedSite | None, site: VerifiedSite, captured: Captured) -> str | None:
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
