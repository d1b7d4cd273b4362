"""Building blocks the family adapters share: a branch made of a block's children applied in order,
a call that forwards a module's captured side inputs, and the Site records of the common layouts
(one site per block; two sites per transformer block)."""
from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import replace

import torch
from torch import nn

from ra_probe.sites.detect.common import is_cache, without_cache
from ra_probe.sites.records import Branch, Context, Site, Tap


class FamilyAdapter:
    """An adapter made of two functions: `claims(model)` says whether the model is of the family,
    `sites_of(path, module)` returns the sites of one of its blocks (None or [] for other modules)."""

    fallback = False
    partial = True  # blocks of classes it does not know go to the generic detector

    def __init__(self, name: str, description: str, claims: Callable[[nn.Module], bool],
                 sites_of: Callable[[str, nn.Module], list[Site] | None]):
        self.name, self.description, self.claims, self.sites_of = name, description, claims, sites_of

    def find(self, model: nn.Module) -> list[Site] | None:
        if not self.claims(model):
            return None
        return [site for path, module in model.named_modules() for site in self.sites_of(path, module) or ()]


def chain(block: nn.Module, names: Iterable[str]) -> Branch:
    """F(x) = child_n(…child_1(x)): the named children of `block` in order; absent (None) ones are
    skipped, so one list covers a family's optional parts (SE, anti-aliasing, LayerScale...)."""
    parts = [getattr(block, name) for name in names if getattr(block, name, None) is not None]

    def branch(x: torch.Tensor, ctx: Context) -> torch.Tensor:
        for part in parts:
            x = part(x)
        return x
    return branch


def call_with(module: nn.Module, x: torch.Tensor, ctx: Context):
    """`module(x, *side inputs)`: the call captured in `ctx` with its main input replaced by `x` (a
    captured keyword for the first parameter, as in `attn(hidden_states=h, ...)`, is dropped) and
    without a key/value cache (a replay would append to it, and attend to its stale keys as constants)."""
    first = next(iter(inspect.signature(module.forward).parameters))
    kwargs = {key: value for key, value in without_cache(ctx.get("kwargs", {})).items() if key != first}
    args = (None if is_cache(value) else value for value in ctx.get("args", ()))  # GPT-2 passes it by position
    return module(x, *args, **kwargs)


def first_output(output) -> torch.Tensor:
    """Attention modules often return (output, weights)."""
    return output if isinstance(output, torch.Tensor) else output[0]


def side_inputs(block: nn.Module, ctx: Context) -> dict:
    """The captured side inputs of `block`'s call by parameter name (the main input left out)."""
    bound = inspect.signature(block.forward).bind_partial(None, *ctx.get("args", ()), **ctx.get("kwargs", {}))
    return {name: value for name, value in list(bound.arguments.items())[1:]}


def skip_kind(skip: nn.Module | Callable | None) -> str:
    """identity (skip is x), projection (skip has parameters: a 1×1 conv, avgpool+conv), scaled (any
    other parameter-free map of x)."""
    if skip is None or isinstance(skip, nn.Identity):
        return "identity"
    if isinstance(skip, nn.Module) and any(True for _ in skip.parameters()):
        return "projection"
    return "scaled"


def block_site(path: str, branch: Branch, *, skip: nn.Module | None = None, post: nn.Module | None = None,
               post_name: str | None = None, ctx_module: str | None = None) -> Site:
    """One site whose input and output are those of the block at `path`."""
    skip = None if isinstance(skip, nn.Identity) else skip
    return Site(name=path, module_path=path, branch=branch, input_tap=Tap(path, "input"),
                output_tap=Tap(path, "output"), kind=skip_kind(skip), skip=skip, post=post,
                post_name=post_name, ctx_module=ctx_module)


def transformer_sites(path: str, attn: Branch, mlp: Branch, middle: Tap, *, ctx_module: str | None = None,
                      entry: Tap | None = None, exit: Tap | None = None) -> list[Site]:
    """The two identity sites of a transformer block, x₁ = x + attn(x) and y = x₁ + mlp(x₁). `middle`
    reads x₁ (the input of the module that starts the MLP branch: norm2 in pre-norm blocks); `entry`
    and `exit` default to the block's input and output."""
    entry = entry or Tap(path, "input")
    exit = exit or Tap(path, "output")
    return [Site(name=f"{path}.attn", module_path=path, branch=attn, input_tap=entry, output_tap=middle,
                 ctx_module=ctx_module),
            Site(name=f"{path}.mlp", module_path=path, branch=mlp, input_tap=middle, output_tap=exit)]


def block_update_site(path: str, layer: nn.Module) -> Site:
    """The whole transformer block as one identity site, y = x + F(x) with F(x) = layer(x) − x: the
    block's residual update, its Jacobian taken with respect to the block's input (as Transformer Block
    Coupling defines it). The layer replays its captured call (mask, rotary embeddings...)."""
    def update(x, ctx):
        return first_output(call_with(layer, x, ctx)) - x
    return Site(name=path, module_path=path, branch=update, input_tap=Tap(path, "input"),
                output_tap=Tap(path, "output"), ctx_module=path, level="block")


def both_levels(path: str, layer: nn.Module, sublayers: list[Site], default: str) -> list[Site]:
    """A transformer block's sites at both granularities, its attention and MLP sites and the whole
    block's (`block_update_site`), with the family's `default` level; the probe keeps one of them."""
    sites = [replace(site, level="sublayer") for site in sublayers] + [block_update_site(path, layer)]
    return [replace(site, default_level=default) for site in sites]


def module_name(module: nn.Module | None) -> str | None:
    """How a post-op is shown: its class name in lower case (relu, layernorm...)."""
    return None if module is None else type(module).__name__.lower()


def is_instance_of(module_path: str, *names: str) -> Callable[[nn.Module], bool]:
    """`claims` for a family whose model classes live in `module_path` (imported lazily, so a missing
    optional library only means the family is never claimed)."""
    def claims(model: nn.Module) -> bool:
        try:
            library = __import__(module_path, fromlist=list(names))
        except ImportError:
            return False
        return isinstance(model, tuple(getattr(library, name) for name in names if hasattr(library, name)))
    return claims


def has_layout(module: nn.Module, *paths: str) -> bool:
    """Whether `module` has every dotted attribute path (how Hugging Face layers of one design are
    recognized across model types: BERT, RoBERTa, ELECTRA... share `attention.output.LayerNorm`)."""
    for path in paths:
        target = module
        for part in path.split("."):
            target = getattr(target, part, None)
            if not isinstance(target, nn.Module):
                return False
    return True


def hf_layout(*paths: str) -> Callable[[nn.Module], bool]:
    """`claims` for a transformers model (it has a `config`) holding a layer with the given layout."""
    def claims(model: nn.Module) -> bool:
        return hasattr(model, "config") and any(has_layout(m, *paths) for m in model.modules())
    return claims


def pre_norm_sites(path: str, layer: nn.Module, norm1: str, attn: str, norm2: str, mlp: str,
                   default: str = "block") -> list[Site]:
    """The two sites of a pre-norm decoder layer named by its children, `x₁ = x + attn(norm1(x))` and
    `y = x₁ + mlp(norm2(x₁))` (the attention's side inputs come from its captured call), and the whole
    layer's site (`both_levels`)."""
    norm_1, attention, norm_2, feed_forward = (getattr(layer, name) for name in (norm1, attn, norm2, mlp))

    def attn_branch(x, ctx):
        return first_output(call_with(attention, norm_1(x), ctx))

    def mlp_branch(x, ctx):
        return feed_forward(norm_2(x))
    return both_levels(path, layer, transformer_sites(path, attn_branch, mlp_branch, Tap(f"{path}.{norm2}", "input"),
                                                      ctx_module=f"{path}.{attn}"), default)
