"""The records of the sites stage, each built once and never changed: the `Site` an adapter returns
(the adapters' contract), what the adapters `Found` in a model, a site at one call of its block
(`SiteCall`), a `VerifiedSite` once the real forward confirmed it, the `Group`s of sites that chain,
and a model's `SiteReport`; the adapter protocol, and the helpers that read a branch's inputs and
outputs."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from itertools import groupby
from typing import Any, Protocol

import torch
from torch import nn

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
    rows: bool = False  # the first dimension holds each sample's rows in turn (windows, flattened tokens)

    def read(self, tensor: torch.Tensor, batch: int | None = None) -> torch.Tensor:
        """The value for `batch` samples: through `fn`, and as (samples, rows, ...) for a `rows` tap."""
        tensor = tensor if self.fn is None else self.fn(tensor)
        return per_sample(tensor, batch) if self.rows and batch is not None else tensor


def per_sample(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """A tensor whose first dimension holds the rows of each of `batch` samples in turn (windows,
    patches, tokens flattened with the batch) as (batch, rows, ...); a batch-first tensor as it is."""
    return tensor if tensor.shape[0] == batch else tensor.unflatten(0, (batch, -1))


@dataclass(frozen=True)
class Site:
    """What an adapter returns for one residual site, `out = post(skip(x) + F(x))`: the contract of
    every adapter, built in or third-party. `branch(x, ctx)` recomputes F on a batch of captured site
    inputs x; `skip`/`post` are None for the identity (a skip the block's caller computes and passes in
    is read from the captured call by `side_skip`); `kind` says what the skip is (identity, projection:
    it has parameters, scaled: any other map of x). `ctx_module` names the module whose extra call
    arguments (attention masks, rotary embeddings...) the branch needs as `ctx`. The taps are read in
    the `call`-th call of the block at `module_path`; None stands for every call, one site each (a
    block called n times gives n sites, see `each_call`). `level` is "block" or "sublayer" where a
    family offers both granularities, `default_level` the one a probe takes when asked for none.

    A third-party adapter (any object with `name`, `description`, `fallback` and `find(model)`, which
    returns the sites, or None when the model is not of its family)::

        import torch
        from torch import nn

        import ra_probe
        from ra_probe.sites import Site, Tap


        class GatedBlock(nn.Module):  # out = relu(x + fc2(tanh(fc1(x))))
            def __init__(self, width: int):
                super().__init__()
                self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)

            def forward(self, x):
                return torch.relu(x + self.fc2(torch.tanh(self.fc1(x))))


        class GatedAdapter:
            name, description, fallback = "gated", "GatedBlock: relu(x + fc2(tanh(fc1(x))))", False

            def find(self, model):
                blocks = [(path, m) for path, m in model.named_modules() if isinstance(m, GatedBlock)]
                if not blocks:
                    return None  # not of this family: the next adapter is asked
                return [Site(name=path, module_path=path, input_tap=Tap(path, "input"), output_tap=Tap(path, "output"),
                             branch=lambda x, ctx, b=block: b.fc2(torch.tanh(b.fc1(x))),
                             post=torch.relu, post_name="relu")
                        for path, block in blocks]


        ra_probe.register_adapter(GatedAdapter())  # or the entry-point group ra_probe.adapters

    Verification checks each site on a real forward and makes a `VerifiedSite` of it; nothing changes
    a Site once an adapter made it."""

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
    side_skip: Callable[[Context], torch.Tensor] | None = None  # a skip the caller passes the block
    level: str | None = None  # "block" | "sublayer" where a family offers both granularities (None: the only one)
    default_level: str | None = None  # the family's granularity when the probe asks for none

    def output_from(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        """post(skip(x) + F(x)): what the block should output."""
        if self.side_skip is not None:
            skip = self.side_skip(ctx)
        else:
            skip = x if self.skip is None else self.skip(x)
        out = skip + self.branch(x, ctx)
        return out if self.post is None else self.post(out)


@dataclass(frozen=True)
class SiteCall:
    """A site at one call of its block: the adapter's `site`, the `call` its taps are read in, and the
    `name` the site is known by at that call (`name@2` for the second call of a block called several
    times), with the adapter that found it."""

    site: Site
    call: int
    name: str
    adapter: str

    @property
    def module_path(self) -> str:
        return self.site.module_path

    @property
    def input_tap(self) -> Tap:
        return self.site.input_tap

    @property
    def output_tap(self) -> Tap:
        return self.site.output_tap

    @property
    def ctx_module(self) -> str | None:
        return self.site.ctx_module


@dataclass(frozen=True)
class VerifiedSite:
    """A site the real forward confirmed: `post(skip(x) + F(x))` reproduced the block's output at its
    call (`at`) within `verify_error` (relative). `rows_in`/`rows_out`: its input/output holds several
    rows per sample along its first dimension (windows, tokens flattened with the batch), so that its
    taps regroup them per sample and its branch, skip and post take and give (samples, rows, ...)
    tensors. The shapes are one sample's, as measured."""

    at: SiteCall
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    verify_error: float
    rows_in: bool = False
    rows_out: bool = False

    @property
    def site(self) -> Site:
        return self.at.site

    @property
    def name(self) -> str:
        return self.at.name

    @property
    def call(self) -> int:
        return self.at.call

    @property
    def adapter(self) -> str:
        return self.at.adapter

    @property
    def module_path(self) -> str:
        return self.at.site.module_path

    @property
    def ctx_module(self) -> str | None:
        return self.at.site.ctx_module

    @property
    def kind(self) -> str:
        return self.at.site.kind

    @property
    def post_name(self) -> str | None:
        return self.at.site.post_name

    @property
    def level(self) -> str | None:
        return self.at.site.level

    @property
    def regrouped(self) -> bool:
        return self.rows_in or self.rows_out

    @property
    def input_tap(self) -> Tap:
        return replace(self.site.input_tap, rows=True) if self.regrouped else self.site.input_tap

    @property
    def output_tap(self) -> Tap:
        return replace(self.site.output_tap, rows=True) if self.regrouped else self.site.output_tap

    @property
    def branch(self) -> Branch:
        """F on this site's tensors as captured (per sample when regrouped)."""
        return by_rows(self.site.branch, self.rows_in) if self.regrouped else self.site.branch

    def output_from(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        """post(skip(x) + F(x)) on this site's tensors as captured."""
        return output_by_rows(self.site, x, ctx, self.rows_in, self.rows_out)

    def describe(self, group: int, group_start: str | None) -> dict[str, Any]:
        """What the site is, for reports, with the index of its group and why it starts it (None when it
        continues one)."""
        return {"name": self.name, "module": self.module_path, "kind": self.kind, "post": self.post_name,
                "group": group, "group_start": group_start, "adapter": self.adapter, "level": self.level,
                "input_shape": list(self.in_shape), "output_shape": list(self.out_shape),
                "verify_error": self.verify_error}


def by_rows(fn: Callable, rows: bool) -> Callable:
    """`fn(t, *ctx)` for a site whose tensors hold each sample's rows in turn along their first dimension,
    on (samples, rows, ...) tensors: on its input's rows flattened back (`rows`: the input holds rows)
    and its output regrouped per sample."""
    return lambda t, *ctx: per_sample(fn(t.flatten(0, 1) if rows else t, *ctx), t.shape[0])


def output_by_rows(site: Site, x: torch.Tensor, ctx: Context, rows_in: bool, rows_out: bool) -> torch.Tensor:
    """`site.output_from(x, ctx)`, on (samples, rows, ...) tensors where its input (`rows_in`) or output
    (`rows_out`) holds several rows per sample (see `by_rows`)."""
    if not (rows_in or rows_out):
        return site.output_from(x, ctx)
    if site.side_skip is not None:
        skip = site.side_skip(ctx)
    else:
        skip = x if site.skip is None and not rows_in else by_rows(site.skip or (lambda t: t), rows_in)(x)
    out = skip + by_rows(site.branch, rows_in)(x, ctx)
    return out if site.post is None and not rows_in else by_rows(site.post or (lambda t: t), rows_in)(out)


@dataclass(frozen=True)
class Group:
    """Consecutive verified sites that chain (a stage): each site's input is, on the captured forward,
    the previous one's output, with equal shapes and no projection. `start` says why the group starts
    where it does (first site, projection skip, shape changes...)."""

    index: int
    sites: tuple[VerifiedSite, ...]
    start: str


@dataclass(frozen=True)
class Skipped:
    """A site (or residual add) not measured, and why. `site`: a site an adapter found that the real
    forward refused, with the adapter that found it (its block may be handed to the generic detector)."""

    name: str
    reason: str
    site: Site | None = field(default=None, repr=False, compare=False)
    adapter: str | None = None


class Adapter(Protocol):
    """An architecture family. `find(model)` returns its sites, or None when the model is not of the
    family. `fallback` adapters are tried only when no other adapter claims the model. Optional flags:
    `partial` (the modules it leaves go to the fallback detectors) and `any_module` (a detector that
    also takes `run=`, a forward on example inputs, `exclude=`, module paths to leave alone, and
    `within=`, the only module paths to look in, with what is inside them)."""

    name: str
    description: str
    fallback: bool

    def find(self, model: nn.Module) -> list[Site] | Found | None: ...


@dataclass(frozen=True)
class Found:
    """What the adapters found in a model, before any forward: the sites, each with the adapter that
    found it (`adapters`, by site name), and the residual adds found but not usable. `adapter` names the
    adapter that claimed the model."""

    adapter: str
    sites: tuple[Site, ...]
    skipped: tuple[Skipped, ...] = ()
    adapters: Mapping[str, str] = field(default_factory=dict, compare=False)

    def adapter_of(self, site: Site) -> str:
        return self.adapters.get(site.name, self.adapter)

    def at_level(self, level: str) -> Found:
        """The sites of one granularity: those of `level` ("block" or "sublayer"; "auto": each family's
        default) where a family offers both, and every site that has only one."""
        return Found(self.adapter, tuple(s for s in self.sites if s.level is None
                                         or s.level == (s.default_level if level == "auto" else level)),
                     self.skipped, self.adapters)


@dataclass(frozen=True)
class SiteReport:
    """A model's sites after discovery: the verified sites in groups, in the order the forward computes
    them, and those skipped with the reason (refused ones included). `adapter`: the one that claimed
    the model."""

    adapter: str
    groups: tuple[Group, ...]
    skipped: tuple[Skipped, ...] = ()

    @property
    def sites(self) -> tuple[VerifiedSite, ...]:
        return tuple(site for group in self.groups for site in group.sites)

    def describe(self) -> list[dict[str, Any]]:
        """One dict per site, in order: what it is (`VerifiedSite.describe`) with its group and, for the
        first site of a group, why the group starts (None for the others)."""
        return [site.describe(group.index, group.start if i == 0 else None)
                for group in self.groups for i, site in enumerate(group.sites)]


def main_input(args: tuple, kwargs: dict) -> Any:
    """A module call's main input: its first positional argument, else its first tensor keyword."""
    if args:
        return args[0]
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


def output_tensor(output: Any) -> torch.Tensor | None:
    """A module's main output: the output itself, or the first item of a tuple, list, dict or
    dataclass (attention modules return (output, weights); Hugging Face layers a ModelOutput); None
    when that is not a tensor."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        items = iter(output)
    elif isinstance(output, dict):
        items = iter(output.values())
    elif is_dataclass(output):
        items = (getattr(output, f.name) for f in fields(output))
    else:
        return None
    first = next(items, None)
    return first if isinstance(first, torch.Tensor) else None


def each_call(found: Found, calls: dict[str, int]) -> list[SiteCall]:
    """The sites `found` at each call of their blocks, given how many times each block was called in a
    forward: a site bound to a call (`Site.call`) at that call under its name; one for every call at each
    of them, under its name for a block called once, `name@1`...`name@n` for one called n times (shared
    weights), in the order of the calls (the sites of one block interleaved: a@1, b@1, a@2, b@2...)."""
    out = []
    for _, block in groupby(found.sites, key=lambda site: (site.module_path, site.call is None)):
        block = list(block)
        if block[0].call is not None:
            out.extend(SiteCall(site, site.call, site.name, found.adapter_of(site)) for site in block)
            continue
        n = calls.get(block[0].module_path, 0)
        out.extend(SiteCall(site, i, site.name if n == 1 else f"{site.name}@{i + 1}", found.adapter_of(site))
                   for i in range(max(n, 1)) for site in block)
    return out


def inside(path: str, roots) -> bool:
    """Whether module `path` is one of `roots` or inside one ("" is the model: everything is inside)."""
    return any(path == root or path.startswith(f"{root}.") or not root for root in roots)


def module_at(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model
