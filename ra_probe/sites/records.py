"""The records of the sites stage: the `Site` an adapter returns, the adapter protocol, a model's
`SiteReport`, and the helpers that read a branch's inputs and outputs."""
from __future__ import annotations

from collections.abc import Callable
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


@dataclass
class Site:
    """One `out = post(skip(x) + F(x))`. `branch(x, ctx)` recomputes F on a batch of captured site
    inputs x; `skip`/`post` are None for the identity (a skip the block's caller computes and passes
    in is read from the captured call by `side_skip`). `ctx_module` names the module whose extra call
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

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "module": self.module_path, "kind": self.kind, "post": self.post_name,
                "group": self.group, "group_start": self.group_start, "adapter": self.adapter, "level": self.level,
                "input_shape": list(self.in_shape), "output_shape": list(self.out_shape),
                "verify_error": self.verify_error}


@dataclass
class Skipped:
    name: str
    reason: str
    site: Site | None = field(default=None, repr=False)  # a site found but refused on the real forward


class Adapter(Protocol):
    """An architecture family. `find(model)` returns its sites, or None when the model is not of the
    family. `fallback` adapters are tried only when no other adapter claims the model. Optional flags:
    `partial` (the modules it leaves go to the fallback detectors) and `any_module` (a detector that
    also takes `run=`, a forward on example inputs, `exclude=`, module paths to leave alone, and
    `within=`, the only module paths to look in, with what is inside them)."""

    name: str
    description: str
    fallback: bool

    def find(self, model: nn.Module) -> list[Site] | SiteReport | None: ...


@dataclass
class SiteReport:
    adapter: str
    sites: list[Site]
    skipped: list[Skipped] = field(default_factory=list)


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


def inside(path: str, roots) -> bool:
    """Whether module `path` is one of `roots` or inside one ("" is the model: everything is inside)."""
    return any(path == root or path.startswith(f"{root}.") or not root for root in roots)


def module_at(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model
