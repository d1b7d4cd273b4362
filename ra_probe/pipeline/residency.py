"""Sites of a model whose weights accelerate offloads (to disk, or to the CPU beside a GPU): while a
site's products run, its block's weights are resident on its device and its hooks do not stream
(torch.func cannot transform the streaming), then they go back: one block at a time."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial

import torch

from ra_probe.errors import UserError
from ra_probe.load.offload import offloaded, resident, streamed_bytes
from ra_probe.sites.records import Site

Hold = Callable[[Site], AbstractContextManager]  # a site's offloaded weights resident while it is measured


def holding(model: torch.nn.Module) -> Hold | None:
    """For a model with offloaded weights, what makes a site's block resident (load.offload); else None."""
    return partial(_resident_site, model) if offloaded(model) else None


@contextmanager
def _resident_site(model: torch.nn.Module, site: Site) -> Iterator[None]:
    """Within: the offloaded weights of `site`'s block resident. A branch that computes with offloaded
    weights outside its block has them streamed under torch.func, which cannot be: one line says so."""
    with resident(model, block_paths(site)):
        try:
            yield
        except RuntimeError as exc:
            if "doesn't have storage" not in str(exc):
                raise
            raise UserError(f"site {site.name}: its branch computes with offloaded weights outside its block "
                            f"{site.module_path}; place those on a device in device_map") from None


def block_paths(site: Site) -> list[str]:
    """The modules a site's branch computes with: its block, and the module whose side inputs it takes."""
    return [path for path in dict.fromkeys((site.module_path, site.ctx_module)) if path is not None]


def largest_block(model: torch.nn.Module, sites: list[Site], itemsize: int) -> int:
    """Bytes of the most offloaded weights any site makes resident at once, at `itemsize`."""
    return max((streamed_bytes(model, block_paths(site), itemsize) for site in sites), default=0)


def held(hold: Hold | None, site: Site) -> AbstractContextManager:
    """Within: `site`'s offloaded weights resident, where `hold` says how (nothing to do without)."""
    return nullcontext() if hold is None else hold(site)

