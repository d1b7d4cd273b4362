"""Residual sites: the `Site` record adapters return, the adapter registry (entry-point
group `ra_probe.adapters`), grouping into stages, and numerical verification of every site."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from importlib.metadata import entry_points
from itertools import groupby
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch
from torch import nn


ENTRY_POINT_GROUP = "ra_probe.adapters"

Context = dict[str, Any]  # side inputs of a branch: {"args": tuple, "kwargs": dict}
Branch = Callable[[torch.Tensor, Context], torch.Tensor]


@dataclass(frozen=True)
class Tap:
    """Where a tensor is read during a forward: the first positional input or the output of a module,
    at its `call`-th call within the call of the site's block (a module the block calls twice), optionally
    passed through `fn` (a reshape, say, when a block flattens its tokens between sites)."""

    module: str  # dotted path, "" for the model itself
    where: str = "output"  # "input" | "output"
    fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    call: int = 0

    def read(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.fn is None else self.fn(tensor)


@dataclass
class Site:
    """One `out = post(skip(x) + F(x))`. `branch(x, ctx)` recomputes F on a batch of captured site
    inputs x; `skip`/`post` are None for the identity. `ctx_module` names the module whose extra call
    arguments (attention masks, rotary embeddings...) the branch needs as `ctx`. Its taps are read in
    the `call`-th call of the block at `module_path`; None (as adapters return it) stands for every
    call, one site each (see `each_call`)."""

    name: str
    module_path: str
    branch: Branch
    input_tap: Tap
    output_tap: Tap
    kind: str = "identity"  # identity | projection | scaled
    skip: Callable[[torch.Tensor], torch.Tensor] | None = None
    post: Callable[[torch.Tensor], torch.Tensor] | None = None
    post_name: str | None = None
    ctx_module: str | None = None
    call: int | None = None
    adapter: str = ""
    group: int = -1
    group_start: str | None = None  # why this site starts a new group (None: it continues one)
    in_shape: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()
    verify_error: float | None = None

    def output_from(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        """post(skip(x) + F(x)): what the block should output."""
        skip = x if self.skip is None else self.skip(x)
        out = skip + self.branch(x, ctx)
        return out if self.post is None else self.post(out)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "module": self.module_path, "kind": self.kind, "post": self.post_name,
                "group": self.group, "group_start": self.group_start, "adapter": self.adapter, "input_shape": list(self.in_shape),
                "output_shape": list(self.out_shape), "verify_error": self.verify_error}


@dataclass
class Skipped:
    name: str
    reason: str


class Adapter(Protocol):
    """An architecture family. `find(model)` returns its sites, or None when the model is not of the
    family. `fallback` adapters are tried only when no other adapter claims the model."""

    name: str
    description: str
    fallback: bool

    def find(self, model: nn.Module) -> list[Site] | SiteReport | None: ...


@dataclass
class SiteReport:
    adapter: str
    sites: list[Site]
    skipped: list[Skipped] = field(default_factory=list)


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


def find_sites(model: nn.Module, adapters: list[Adapter] | None = None) -> SiteReport:
    """The sites of `model` from the first adapter that claims it (unverified; see `verify_sites`). An
    adapter returns its sites, or a SiteReport when it also found residual adds it cannot use."""
    for adapter in adapters if adapters is not None else registered_adapters():
        found = adapter.find(model)
        if found is not None:
            report = found if isinstance(found, SiteReport) else SiteReport(adapter.name, found)
            report.adapter = adapter.name
            for site in report.sites:
                site.adapter = adapter.name
            return report
    return SiteReport("none", [])


def each_call(sites: list[Site], calls: dict[str, int]) -> list[Site]:
    """One site per call of its block, given how many times each block was called in a forward: a
    block called once keeps its name, one called n times (shared weights) gives `name@1`...`name@n`,
    in the order of the calls (the sites of one block interleaved: a@1, b@1, a@2, b@2...). Sites
    already bound to a call are kept as they are."""
    out = []
    for _, block in groupby(sites, key=lambda site: (site.module_path, site.call is None)):
        block = list(block)
        if block[0].call is not None:
            out.extend(block)
            continue
        n = calls.get(block[0].module_path, 0)
        out.extend(replace(site, call=i, name=site.name if n == 1 else f"{site.name}@{i + 1}")
                   for i in range(max(n, 1)) for site in block)
    return out


def module_at(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model
