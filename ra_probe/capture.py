"""Capture (spec §1): one forward pass with hooks that records, for every site, its input x, side
inputs ctx and block output y, and for the model the logits and the classifier's input features."""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ra_probe.load.data import Inputs, run_model
from ra_probe.sites import Context, Site, module_at


@dataclass
class SiteRecord:
    x: torch.Tensor
    y: torch.Tensor
    ctx: Context


@dataclass
class Captured:
    sites: dict[str, SiteRecord]
    logits: torch.Tensor | None = None
    features: torch.Tensor | None = None  # the classifier's input, flattened per sample
    extra: dict[str, Any] = field(default_factory=dict)


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


def _first_tensor_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    return next(v for v in kwargs.values() if isinstance(v, torch.Tensor))


def _output_tensor(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


@torch.no_grad()
def capture(model: nn.Module, inputs: Inputs, sites: list[Site], *, with_head: bool = True) -> Captured:
    """Run `model(inputs)` once and record each site's (x, ctx, y). A module called more than once in
    one forward keeps its first call."""
    taps: dict[tuple[str, str], torch.Tensor] = {}
    calls: dict[str, tuple[tuple, dict]] = {}
    wanted_inputs = {s.input_tap.module for s in sites if s.input_tap.where == "input"}
    wanted_inputs |= {s.output_tap.module for s in sites if s.output_tap.where == "input"}
    wanted_outputs = {s.input_tap.module for s in sites if s.input_tap.where == "output"}
    wanted_outputs |= {s.output_tap.module for s in sites if s.output_tap.where == "output"}
    wanted_ctx = {s.ctx_module for s in sites if s.ctx_module is not None}
    head = find_classifier(model) if with_head else None
    features: list[torch.Tensor] = []

    def pre_hook(path):
        def hook(module, args, kwargs):
            if path in wanted_inputs:
                taps.setdefault((path, "input"), _first_tensor_arg(args, kwargs).clone())
            if path in wanted_ctx and path not in calls:
                calls[path] = (tuple(args[1:]), dict(kwargs))
        return hook

    def post_hook(path):
        def hook(module, args, kwargs, output):
            taps.setdefault((path, "output"), _output_tensor(output).clone())
        return hook

    with ExitStack() as stack:
        for path in wanted_inputs | wanted_ctx:
            handle = module_at(model, path).register_forward_pre_hook(pre_hook(path), with_kwargs=True)
            stack.callback(handle.remove)
        for path in wanted_outputs:
            handle = module_at(model, path).register_forward_hook(post_hook(path), with_kwargs=True)
            stack.callback(handle.remove)
        if head is not None:
            handle = head.register_forward_hook(lambda m, args, out: features.append((args[0], out)) if not features else None)
            stack.callback(handle.remove)
        output = run_model(model, inputs)

    records = {}
    for site in sites:
        x = taps.get((site.input_tap.module, site.input_tap.where))
        y = taps.get((site.output_tap.module, site.output_tap.where))
        if x is None or y is None:
            continue
        args, kwargs = calls.get(site.ctx_module, ((), {}))
        records[site.name] = SiteRecord(site.input_tap.read(x), site.output_tap.read(y), {"args": args, "kwargs": kwargs})
    logits = logits_of(output)
    # the head's input counts as classifier features only when the head's output is the model's output
    # (a model without a classifier still has Linear layers, e.g. inside its branches)
    head_out = features[0][1] if features else None
    is_head = isinstance(head_out, torch.Tensor) and logits is not None and head_out.shape == logits.shape \
        and torch.equal(head_out, logits)
    return Captured(records, logits, features[0][0].flatten(1) if is_head else None)
