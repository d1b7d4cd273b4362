"""The adapter registry: adapters installed through the entry-point group `ra_probe.adapters` and those
registered at runtime, and `find_sites`, which asks them for a model's sites."""
from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from torch import nn

from ra_probe.sites.records import Adapter, Site, SiteReport, Skipped, inside

ENTRY_POINT_GROUP = "ra_probe.adapters"

_RUNTIME: list[Adapter] = []  # adapters added with register_adapter, in this process


def register_adapter(adapter: Adapter) -> None:
    """Add an adapter for this process (besides the entry-point group): it is tried before the
    installed adapters of the same role. Registering an adapter of the same name again replaces it."""
    for attribute in ("name", "description", "fallback", "find"):
        if not hasattr(adapter, attribute):
            raise TypeError(f"an adapter needs name, description, fallback and find(model); {adapter!r} has no "
                            f"{attribute}")
    _RUNTIME[:] = [a for a in _RUNTIME if a.name != adapter.name] + [adapter]


def registered_adapters() -> list[Adapter]:
    """Adapters registered at runtime and from the entry-point group: specific ones first, fallbacks
    last; within each, runtime ones first, then by name."""
    adapters, seen = list(_RUNTIME), {a.name for a in _RUNTIME}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in seen:
            continue
        seen.add(ep.name)
        adapters.append(ep.load())
    return sorted(adapters, key=lambda a: (bool(getattr(a, "fallback", False)), a not in _RUNTIME, a.name))


def _found(adapter: Adapter, model: nn.Module, run: Callable[[], Any] | None, **kwargs) -> SiteReport | None:
    """What one adapter finds, as a SiteReport with its name on every site. Detectors that look at any
    module (`any_module`) also get `run`, a forward on example inputs, for strategies that watch one."""
    found = adapter.find(model, run=run, **kwargs) if getattr(adapter, "any_module", False) else adapter.find(model)
    if found is None:
        return None
    report = found if isinstance(found, SiteReport) else SiteReport(adapter.name, found)
    report.adapter = adapter.name
    for site in report.sites:
        site.adapter = adapter.name
    return report


def find_sites(model: nn.Module, adapters: list[Adapter] | None = None,
               run: Callable[[], Any] | None = None) -> SiteReport:
    """The sites of `model` from the first adapter that claims it (unverified; see `verify_sites`). An
    adapter returns its sites, or a SiteReport when it also found residual adds it cannot use. The
    modules a `partial` adapter leaves (neither its sites' blocks nor inside them: block classes it does
    not know) go to the fallback detectors that look at any module, so every residual block gets its
    sites; an adapter without that flag speaks for the whole model."""
    adapters = adapters if adapters is not None else registered_adapters()
    for adapter in adapters:
        report = _found(adapter, model, run)
        if report is None:
            continue
        if getattr(adapter, "partial", False) and not getattr(adapter, "fallback", False):
            claimed = {site.module_path for site in report.sites}
            for detector in (a for a in adapters if getattr(a, "any_module", False)):
                rest = _found(detector, model, run, exclude=claimed)
                report.sites, report.skipped = in_module_order(model, report.sites + rest.sites), \
                    report.skipped + rest.skipped
        report.sites = distinct_names(report.sites)
        return report
    return SiteReport("none", [])


def hand_over(model: nn.Module, report: SiteReport, refused: list[Skipped], adapters: list[Adapter] | None = None,
              run: Callable[[], Any] | None = None) -> SiteReport | None:
    """`report` with the sites of blocks whose family-adapter sites the real forward refused (the block
    is of a layout the adapter does not know: another library version, a variant) replaced by what the
    fallback detectors find in those blocks; None when they find nothing there. Unverified."""
    adapters = adapters if adapters is not None else registered_adapters()
    detectors = [a for a in adapters if getattr(a, "any_module", False)]
    names = {d.name for d in detectors}
    blocks = {s.site.module_path for s in refused if s.site is not None and s.site.adapter not in names}
    if not blocks:
        return None
    found = [_found(d, model, run, within=blocks) for d in detectors]
    sites = [site for f in found for site in f.sites]
    redone = {b for b in blocks if any(inside(s.module_path, (b,)) for s in sites)}
    if not redone:
        return None
    kept = [s for s in report.sites if s.module_path not in redone]
    skipped = [s for f in found for s in f.skipped if s.site is None or s.site.module_path in redone]
    return SiteReport(report.adapter, distinct_names(in_module_order(model, kept + sites)), report.skipped + skipped)


def distinct_names(sites: list[Site]) -> list[Site]:
    """Sites with distinct names. A block names a branch after its main child (`block.attn`); when that
    child has an add of its own, found as a site named by its path too, the child's own site becomes
    `child:inner`; any other repeated name is numbered `:2`, `:3`... in order."""
    claimed = {site.name for site in sites if site.module_path != site.name}
    seen: dict[str, int] = {}
    for site in sites:
        if site.module_path == site.name and site.name in claimed:
            site.name = f"{site.name}:inner"
        seen[site.name] = seen.get(site.name, 0) + 1
        if seen[site.name] > 1:
            site.name = f"{site.name}:{seen[site.name]}"
    return sites


def at_level(sites: list[Site], level: str) -> list[Site]:
    """The sites of one granularity: those of `level` ("block" or "sublayer"; "auto": each family's
    default) where a family offers both, and every site that has only one."""
    return [s for s in sites if s.level is None or s.level == (s.default_level if level == "auto" else level)]


def in_module_order(model: nn.Module, sites: list[Site]) -> list[Site]:
    """Sites sorted by where their blocks are registered in the model (the order of its forward, as a
    rule), the sites of one block kept in their order."""
    index = {path: i for i, (path, _) in enumerate(model.named_modules())}
    return sorted(sites, key=lambda site: index.get(site.module_path, -1))


