"""What both strategies of the generic detector share (the family adapters use them too): the names of
the sites found in one module, the modules a post-op may be besides parameter-free ones (norms), and
a captured call's arguments without a key/value cache."""
from __future__ import annotations

from collections import Counter
from dataclasses import replace

from torch import nn

from ra_probe.sites.records import Site

NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, getattr(nn, "RMSNorm", nn.LayerNorm))


def name_sites(path: str, sites: list[Site]) -> list[Site]:
    """Names of the sites a detector found in one module, each named by its branch's main child: one
    site takes the module's path; several take path.<child>, numbered @1, @2... where branches share
    that child (weights applied several times in one forward)."""
    uses, seen, out = Counter(s.name for s in sites), Counter(), []
    for site in sites:
        seen[site.name] += 1
        suffix = f"@{seen[site.name]}" if uses[site.name] > 1 else ""
        name = (path or "model") if len(sites) == 1 else ".".join(filter(None, (path, site.name))) + suffix
        out.append(replace(site, name=name))
    return out


# a key/value cache grows at every call: a branch, a pure function of x, is recomputed without it
CACHE_ARGUMENTS = {"past_key_values", "past_key_value", "layer_past", "use_cache", "cache_position", "cache"}


def is_cache(value) -> bool:
    """A transformers key/value cache object, whatever the keyword it is passed under."""
    return any(cls.__name__ == "Cache" for cls in type(value).__mro__)


def without_cache(kwargs: dict) -> dict:
    """Captured keyword arguments without a key/value cache (replayed, it would grow at every call)."""
    return {key: value for key, value in kwargs.items() if key not in CACHE_ARGUMENTS and not is_cache(value)}
