"""The adapter registry: adapters installed through the entry-point group `ra_probe.adapters` and those
registered at runtime, and `find_sites`, which asks them for a model's sites."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from importlib.metadata import entry_points
from typing import Any

from torch import nn

from ra_probe.sites.records import Adapter, Found, Site, Skipped, inside

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


Claimed = list[tuple[Site, str]]  # sites, each with the name of the adapter that found it


def _found(adapter: Adapter, model: nn.Module, run: Callable[[], Any] | None, **kwargs) -> Found | None:
    """What one adapter finds, as a Found. Detectors that look at any module (`any_module`) also get
    `run`, a forward on example inputs, for strategies that watch one."""
    found = adapter.find(model, run=run, **kwargs) if getattr(adapter, "any_module", False) else adapter.find(model)
    if found is None:
        return None
    if isinstance(found, Found):
        return Found(adapter.name, tuple(found.sites), tuple(found.skipped),
                     {**{s.name: adapter.name for s in found.sites}, **found.adapters})
    return Found(adapter.name, tuple(found), (), {s.name: adapter.name for s in found})


def _claimed(found: Found) -> Claimed:
    return [(site, found.adapter_of(site)) for site in found.sites]


def _named(adapter: str, claimed: Claimed, skipped) -> Found:
    """The sites under distinct names, each with its adapter."""
    sites = distinct_names([site for site, _ in claimed])
    return Found(adapter, tuple(sites), tuple(skipped), {site.name: name for site, (_, name) in zip(sites, claimed)})


def _ordered(model: nn.Module, claimed: Claimed) -> Claimed:
    return in_module_order(model, claimed, key=lambda pair: pair[0].module_path)


def find_sites(model: nn.Module, adapters: list[Adapter] | None = None,
               run: Callable[[], Any] | None = None) -> Found:
    """The sites of `model` from the first adapter that claims it (unverified; see `verify_sites`). An
    adapter returns its sites, or a Found when it also found residual adds it cannot use. The
    modules a `partial` adapter leaves (neither its sites' blocks nor inside them: block classes it does
    not know) go to the fallback detectors that look at any module, so every residual block gets its
    sites; an adapter without that flag speaks for the whole model."""
    adapters = adapters if adapters is not None else registered_adapters()
    for adapter in adapters:
        found = _found(adapter, model, run)
        if found is None:
            continue
        claimed, skipped = _claimed(found), list(found.skipped)
        if getattr(adapter, "partial", False) and not getattr(adapter, "fallback", False):
            paths = {site.module_path for site in found.sites}
            for detector in (a for a in adapters if getattr(a, "any_module", False)):
                rest = _found(detector, model, run, exclude=paths)
                claimed, skipped = _ordered(model, claimed + _claimed(rest)), skipped + list(rest.skipped)
        return _named(found.adapter, claimed, skipped)
    return Found("none", ())


def hand_over(model: nn.Module, found: Found, refused: tuple[Skipped, ...], adapters: list[Adapter] | None = None,
              run: Callable[[], Any] | None = None) -> Found | None:
    """`found` with the sites of blocks whose family-adapter sites the real forward refused (the block
    is of a layout the adapter does not know: another library version, a variant) replaced by what the
    fallback detectors find in those blocks; None when they find nothing there. Unverified."""
    adapters = adapters if adapters is not None else registered_adapters()
    detectors = [a for a in adapters if getattr(a, "any_module", False)]
    names = {d.name for d in detectors}
    blocks = {s.site.module_path for s in refused if s.site is not None and s.adapter not in names}
    if not blocks:
        return None
    found_there = [_found(d, model, run, within=blocks) for d in detectors]
    sites = [pair for f in found_there for pair in _claimed(f)]
    redone = {b for b in blocks if any(inside(s.module_path, (b,)) for s, _ in sites)}
    if not redone:
        return None
    kept = [pair for pair in _claimed(found) if pair[0].module_path not in redone]
    skipped = [s for f in found_there for s in f.skipped if s.site is None or s.site.module_path in redone]
    return _named(found.adapter, _ordered(model, kept + sites), list(found.skipped) + skipped)


def distinct_names(sites: list[Site]) -> list[Site]:
    """Sites with distinct names (new records where a name changes). A block names a branch after its
    main child (`block.attn`); when that child has an add of its own, found as a site named by its path
    too, the child's own site becomes `child:inner`; any other repeated name is numbered `:2`, `:3`...
    in order."""
    claimed = {site.name for site in sites if site.module_path != site.name}
    seen: dict[str, int] = {}
    out = []
    for site in sites:
        name = f"{site.name}:inner" if site.module_path == site.name and site.name in claimed else site.name
        seen[name] = seen.get(name, 0) + 1
        name = f"{name}:{seen[name]}" if seen[name] > 1 else name
        out.append(site if name == site.name else replace(site, name=name))
    return out


def in_module_order(model: nn.Module, items: list, key: Callable[[Any], str] = lambda site: site.module_path) -> list:
    """Sites (or what `key` gives the block path of) sorted by where their blocks are registered in the
    model (the order of its forward, as a rule), the sites of one block kept in their order."""
    index = {path: i for i, (path, _) in enumerate(model.named_modules())}
    return sorted(items, key=lambda item: index.get(key(item), -1))
