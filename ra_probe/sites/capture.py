"""Capture: one forward pass with hooks that records, for every site, its input x, side
inputs ctx and block output y, and for the model the logits and the classifier's input features."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from itertools import count
from typing import Any

import torch
from torch import nn

from ra_probe.load.offload import block_device
from ra_probe.load.samples import Inputs, first_tensor, run_model
from ra_probe.sites.records import (
    Context,
    Found,
    SiteCall,
    VerifiedSite,
    each_call,
    main_input,
    module_at,
    output_tensor,
)


@dataclass
class SiteRecord:
    x: torch.Tensor
    y: torch.Tensor
    ctx: Context
    order: int = 0  # when the forward produced y, among the hooked calls: the sites' order in the forward


@dataclass
class Captured:
    sites: dict[str, SiteRecord]
    logits: torch.Tensor | None = None
    features: torch.Tensor | None = None  # the classifier's input, flattened per sample (per token for an LM head)
    calls: dict[str, int] = field(default_factory=dict)  # times each site's block was called
    batch: int = 0  # samples in the forward


def find_classifier(model: nn.Module) -> nn.Linear | None:
    """The final linear classifier: timm's `get_classifier()`, else the last `nn.Linear` registered."""
    getter = getattr(model, "get_classifier", None)
    if callable(getter):
        head = getter()
        if isinstance(head, nn.Linear):
            return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def logits_of(output: Any) -> torch.Tensor | None:
    """Logits from a model's output: a tensor, an HF ModelOutput with `.logits`, or the first item."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def _moved(value: Any, device: torch.device | None) -> Any:
    """`value` with its tensors (in tuples, lists, dicts) on `device`: a model split across devices
    hands a block its input from the previous block's device, and its branch runs where it lives."""
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_moved(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _moved(v, device) for k, v in value.items()}
    return value


def _copy(value: Any) -> Any:
    """A tensor read is copied (later in-place ops must not change it); anything else is kept as it is
    and verification says why it cannot be a site's input or output."""
    return value.clone() if isinstance(value, torch.Tensor) else value


def _wanted(sites: Found | Sequence[SiteCall | VerifiedSite]) -> tuple[set[tuple[str, str]], set[str]]:
    """What a capture of `sites` reads: (module, "input" | "output" | "call") pairs, and the sites' blocks."""
    listed = sites.sites if isinstance(sites, Found) else sites
    wanted = {(tap.module, tap.where) for s in listed for tap in (s.input_tap, s.output_tap)}
    wanted |= {(s.ctx_module, "call") for s in listed if s.ctx_module is not None}  # the side inputs
    return wanted, {s.module_path for s in listed}


@torch.no_grad()
def capture(model: nn.Module, inputs: Inputs, sites: Found | Sequence[SiteCall | VerifiedSite], *,
            with_head: bool = True) -> Captured:
    """Run `model(inputs)` once and record each site's (x, ctx, y) under its name at its call: the sites
    found at every call of their block (`each_call`), or the given sites at theirs; and block calls.

    Every hooked call gets a sequence number; a block's call spans the numbers from its start to its
    end, so a tap's `call`-th reading inside that span is the one the site needs, however often the
    block (or the tapped module) is called."""
    ticks = count()
    reads: dict[tuple[str, str], list[tuple[int, Any]]] = defaultdict(list)  # (path, where) → (tick, value)
    spans: dict[str, list[tuple[int, int]]] = defaultdict(list)  # block path → (start, end) of each call
    open_calls: dict[str, list[int]] = defaultdict(list)
    wanted, blocks = _wanted(sites)
    head = find_classifier(model) if with_head else None
    features: list[torch.Tensor] = []

    def pre_hook(path):
        def hook(module, args, kwargs):
            tick = next(ticks)
            if path in blocks:
                open_calls[path].append(tick)
            if (path, "input") in wanted:
                reads[path, "input"].append((tick, _copy(main_input(args, kwargs))))
            if (path, "call") in wanted:  # the main input too, for branches that replay the whole call
                reads[path, "call"].append((tick, {"args": tuple(args[1:]), "kwargs": dict(kwargs),
                                                   **({"input": args[0]} if args else {})}))
        return hook

    def post_hook(path):
        def hook(module, args, kwargs, output):
            tick = next(ticks)
            if (path, "output") in wanted:
                main = output_tensor(output)
                reads[path, "output"].append((tick, _copy(output if main is None else main)))
            if path in blocks:
                spans[path].append((open_calls[path].pop(), tick))
        return hook

    with ExitStack() as stack:
        for path in blocks | {path for path, _ in wanted}:
            module = module_at(model, path)
            for handle in (module.register_forward_pre_hook(pre_hook(path), with_kwargs=True),
                           module.register_forward_hook(post_hook(path), with_kwargs=True)):
                stack.callback(handle.remove)
        if head is not None:
            handle = head.register_forward_hook(lambda m, args, out: features.append((args[0], out)) if not features else None)
            stack.callback(handle.remove)
        output = run_model(model, inputs)

    def read(path: str, where: str, span: tuple[int, int], index: int = 0) -> tuple[int, Any]:
        """The `index`-th reading of (path, where) within one call of a block, and its tick."""
        inside = [(tick, value) for tick, value in reads[path, where] if span[0] <= tick <= span[1]]
        return inside[index] if index < len(inside) else (-1, None)

    calls = {path: len(spans[path]) for path in blocks}
    batch = len(first_tensor(inputs))
    records = {}
    for site in each_call(sites, calls) if isinstance(sites, Found) else sites:
        if site.call >= calls[site.module_path]:
            continue
        span = spans[site.module_path][site.call]
        (_, x), (order, y) = (read(tap.module, tap.where, span, tap.call) for tap in (site.input_tap, site.output_tap))
        if x is None or y is None:
            continue
        ctx = read(site.ctx_module, "call", span)[1] if site.ctx_module is not None else None
        device = block_device(module_at(model, site.module_path))
        x, y = (tap.read(v, batch) if isinstance(v, torch.Tensor) else v for tap, v in ((site.input_tap, x),
                                                                                 (site.output_tap, y)))
        records[site.name] = SiteRecord(*_moved((x, y, ctx or {"args": (), "kwargs": {}}), device), order)
    logits = logits_of(output)
    # the head's input counts as classifier features only when the head's output is the model's output
    # (a model without a classifier still has Linear layers, e.g. inside its branches)
    head_out = features[0][1] if features else None
    is_head = isinstance(head_out, torch.Tensor) and logits is not None and head_out.shape == logits.shape \
        and torch.equal(head_out, logits)
    # per sample, flattened; a language model's head reads each token: (samples, tokens, d) kept as it is
    head_in = (features[0][0] if logits.ndim == 3 else features[0][0].flatten(1)) if is_head else None
    return Captured(records, logits, head_in, calls=calls, batch=batch)
