"""Verification of the sites on a real forward: a site is kept only when `post(skip(x) + F(x))`
reproduces the block's captured output; the kept sites are then grouped into stages that chain."""
from __future__ import annotations

import torch

from ra_probe.capture import Captured
from ra_probe.sites import Site, SiteReport, Skipped, each_call

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
        if not (torch.isfinite(record.x).all() and torch.isfinite(record.y).all()):
            skipped.append(Skipped(site.name, "NaN or Inf in the block's input or output (non-finite weights?)"))
            continue
        try:
            with torch.no_grad():
                rebuilt = site.output_from(record.x, record.ctx)
            site.verify_error = relative_error(rebuilt, record.y)
        except Exception as exc:  # an adapter's branch that cannot run is a skipped site, not a crash
            skipped.append(Skipped(site.name, f"branch failed: {type(exc).__name__}: {exc}".splitlines()[0]))
            continue
        if not site.verify_error <= VERIFY_RTOL:
            skipped.append(Skipped(site.name, f"post(skip(x)+F(x)) differs from the block output "
                                              f"(relative error {site.verify_error:.2e})"))
            continue
        site.in_shape, site.out_shape = tuple(record.x.shape[1:]), tuple(record.y.shape[1:])
        kept.append(site)
    assign_groups(kept, captured)
    return SiteReport(report.adapter, kept, skipped)


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
