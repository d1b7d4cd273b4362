"""The same architecture at a seeded random init: the null model a probe compares a network with.

A model is re-initialized the way its source defines it, never by touching the caller's module: timm
and transformers build a new one from their config, a factory is called again, a bare module is copied
and its layers' `reset_parameters` run. All under a seed, with torch's global RNG put back after."""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ra_probe.errors import first_line

# Builds a fresh module of an architecture at random init and says how: (module, description).
Builder = Callable[[], "tuple[nn.Module, str]"]


@dataclass
class RandomInit:
    """A freshly initialized copy of an architecture (`module`), or why none could be made (None)."""

    module: nn.Module | None
    how: str  # how it was made, or why it could not be
    seed: int


def seeded(build: Callable[[], object], seed: int):
    """`build()` with torch's RNG seeded and the caller's RNG state put back after: the same weights
    for the same seed, every time."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def timm_builder(name: str, **kwargs) -> Builder:
    """A timm model at random init, without `zero_init_last` where the family has it: that init zeroes
    the last norm of every block, and exactly zero branches measure nothing."""
    import timm

    def build() -> tuple[nn.Module, str]:
        args = "".join(f", {key}={value!r}" for key, value in kwargs.items())
        try:
            module = timm.create_model(name, pretrained=False, exportable=True, zero_init_last=False, **kwargs)
            return module, f"timm.create_model({name!r}, pretrained=False, zero_init_last=False{args})"
        except TypeError:  # the family has no zero_init_last
            module = timm.create_model(name, pretrained=False, exportable=True, **kwargs)
            return module, f"timm.create_model({name!r}, pretrained=False{args})"
    return build


def hf_builder(config, model_cls=None) -> Builder:
    """A transformers model built from its config (the library's own `_init_weights`), eager attention."""
    def build() -> tuple[nn.Module, str]:
        import transformers

        cls = model_cls or transformers.AutoModel
        make = cls._from_config if model_cls is not None else cls.from_config
        return make(config, attn_implementation="eager"), f"{cls.__name__} from its config (transformers' init)"
    return build


def module_builder(module: nn.Module) -> Builder:
    """A fresh module of `module`'s architecture: a transformers model from its config, a timm model by
    its architecture name, anything else a copy whose layers run their `reset_parameters`."""
    config = getattr(module, "config", None)
    if hasattr(module, "_from_config") and config is not None:
        return hf_builder(config, type(module))
    architecture = (getattr(module, "pretrained_cfg", None) or {}).get("architecture")
    if architecture:
        classes = getattr(module, "num_classes", None)
        return timm_builder(architecture, **({"num_classes": classes} if classes is not None else {}))
    return lambda: (_reset_copy(module), "a copy of the module with every layer's reset_parameters()")


def _reset_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module` with every layer re-initialized by its own `reset_parameters`. A parameter
    that no layer re-initializes would keep its trained value: refused (ValueError), naming it."""
    fresh = copy.deepcopy(module)
    covered = set()
    for layer in fresh.modules():
        if callable(getattr(layer, "reset_parameters", None)):
            layer.reset_parameters()
            covered.update(id(p) for p in layer.parameters())
    kept = [name for name, p in fresh.named_parameters() if id(p) not in covered]
    if kept:
        raise ValueError(f"no layer re-initializes {kept[0]}" + (f" and {len(kept) - 1} more" if len(kept) > 1 else "")
                         + " (give a model reference or factory so the architecture can be built anew)")
    return fresh


def random_init(builder: Builder | None, like: nn.Module, seed: int) -> RandomInit:
    """The architecture of `like` at random init under `seed`, from `builder` (None: from the module
    itself). A build that fails, gives other parameter shapes, or gives `like`'s own weights back (a
    factory that loads them itself) is replaced by a re-init of a copy, or is reported as impossible."""
    attempts = [builder] if builder is not None else []
    attempts.append(module_builder(like))
    why = ""
    for attempt in attempts:
        try:
            module, how = seeded(attempt, seed)
        except Exception as exc:  # a factory or library build can fail in any way: the reason is reported
            why = first_line(exc)
            continue
        problem = _mismatch(module, like)
        if problem is None:
            return RandomInit(module, how, seed)
        why = problem
    return RandomInit(None, f"the architecture could not be re-initialized: {why}", seed)


def _mismatch(fresh: nn.Module, like: nn.Module) -> str | None:
    """Why `fresh` is not a random init of `like`'s architecture, or None."""
    if not isinstance(fresh, nn.Module):
        return f"the build returned {type(fresh).__name__}, not a module"
    own, new = like.state_dict(), fresh.state_dict()
    if own.keys() != new.keys() or any(own[k].shape != new[k].shape for k in own):
        return "the rebuilt model's parameters differ in names or shapes"
    params = dict(like.named_parameters())
    if params and all(torch.equal(p.detach().cpu(), new[name].cpu()) for name, p in params.items() if name in new):
        return "the rebuilt model has the same weights (it loads them itself)"
    return None
