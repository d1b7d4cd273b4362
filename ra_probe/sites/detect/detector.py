"""The generic detector, the fallback for models no family adapter claims (and for the blocks a
family adapter leaves or whose layout it does not know): every module's own forward traced with
torch.fx (`graph`), and the modules it cannot trace, or whose graph holds only for argument values
their calls do not pass, watched on a real forward (`runtime`)."""
from __future__ import annotations

import inspect
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn

from ra_probe.sites.detect import runtime
from ra_probe.sites.detect.common import without_cache
from ra_probe.sites.detect.graph import Untraceable, sites_in
from ra_probe.sites.records import Found, Skipped, inside
from ra_probe.sites.registry import in_module_order


def _called_otherwise(model: nn.Module, run, fixed: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The modules whose graph fixed arguments that the real forward (`run()`) passes otherwise (a
    decoder layer traced without the causal mask it is given), each with the first such argument. A
    key/value cache counts as left out: branches are recomputed without it anyway."""
    differ: dict[str, str] = {}

    def watch(path: str):
        def hook(module, args, kwargs):
            bound = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
            name = next((n for n, default in fixed[path].items() if not _left_at(n, bound.get(n, default), default)),
                        None)
            if name is not None:
                differ.setdefault(path, name)
        return hook
    with ExitStack() as stack:
        for path in fixed:
            stack.callback(model.get_submodule(path).register_forward_pre_hook(watch(path), with_kwargs=True).remove)
        with torch.no_grad():
            run()
    return differ


def _left_at(name: str, value: Any, default: Any) -> bool:
    """Whether a call leaves argument `name` at the `default` its graph was traced with."""
    if value is default or not without_cache({name: value}):
        return True
    return isinstance(default, (bool, int, float, str)) and type(value) is type(default) and value == default


class GenericDetector:
    """Every module's own forward, traced with torch.fx; the modules it cannot trace, or whose graph
    holds only for argument values their calls do not pass, are watched on a real forward (`runtime`)
    when the caller gives one (`run`), else reported as not looked at."""

    name = "generic"
    description = ("fallback: adds of x and a parametric branch of x in any module's forward, found with torch.fx "
                   "or, where it cannot trace, on a real forward (tensor provenance)")
    fallback = True
    any_module = True  # also given the modules a family adapter leaves

    def find(self, model: nn.Module, run=None, exclude=(), within=None) -> Found:
        found, untraceable, fixed = {}, {}, {}
        for path, module in model.named_modules():
            if inside(path, exclude) or (within is not None and not inside(path, within)):
                continue
            try:
                *found[path], fixed[path] = sites_in(path, module)
            except Untraceable as why:
                untraceable[path] = str(why)
        if run is not None and any(fixed.values()):
            for path, name in _called_otherwise(model, run, {p: f for p, f in fixed.items() if f}).items():
                del found[path]
                untraceable[path] = f"traced by torch.fx only with {name} left at its default, which its call sets"
        sites = [s for found_sites, _ in found.values() for s in found_sites]
        skipped = [s for _, found_skipped in found.values() for s in found_skipped]
        if untraceable and run is not None:
            frames: dict[str, runtime._Frame] = {}
            for frame in runtime.record(model, run, set(untraceable)):
                frames.setdefault(frame.path, frame)  # a block called again: each_call repeats its sites
            for frame in frames.values():
                frame_sites, frame_skipped = runtime.sites_of(frame)
                sites.extend(frame_sites)
                skipped.extend(frame_skipped)
        elif untraceable:
            skipped.extend(Skipped(path or "model", f"forward not traceable by torch.fx, its residual adds "
                                                    f"not looked for ({why})") for path, why in untraceable.items())
        return Found(self.name, tuple(in_module_order(model, sites)), tuple(skipped))

