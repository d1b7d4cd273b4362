"""Result cache: one entry per measured (group of sites, chunk of samples), so a re-run, or
a run interrupted by Ctrl-C, resumes without recomputing what was already measured.

An entry's key hashes everything its result depends on, behaviour rather than names: the group's
captured site inputs and outputs (a model whose code changed computes other values, so it misses
even with the same name and weights), the tool's version and source code, the versions of the
libraries that compute the model (torch, timm, transformers), the adapter and its code, the model's
name, class and weights, and the settings that change measurements. Thresholds, τ and the sample
count are applied after measuring and are not part of it. Entries are written to a
temporary file and renamed into place: an interrupted write never leaves a corrupt entry, and an
unreadable entry is a miss, never an error."""
from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import torch

from ra_probe.files import atomic_write
from ra_probe.load.offload import offloading
from ra_probe.pipeline.options import cache_key_settings
from ra_probe.version import __version__

T = TypeVar("T")


def default_dir() -> Path:
    """`$RA_PROBE_CACHE`, else `$XDG_CACHE_HOME/ra-probe`, else `~/.cache/ra-probe`."""
    if os.environ.get("RA_PROBE_CACHE"):
        return Path(os.environ["RA_PROBE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ra-probe"


@functools.cache
def code_digest() -> str:
    """sha256 of the source of ra-probe and its built-in adapters: entries measured by other code
    (an upgrade, or an edit during development) are never served."""
    root = Path(__file__).resolve().parents[1]  # the package's folder (its adapters in plugins/ included)
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def library_versions() -> dict[str, str | None]:
    """Versions of the libraries whose code computes the model: an upgrade may change its numbers."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None
    return {name: installed(name) for name in ("torch", "timm", "transformers")}


@functools.cache
def adapter_digest(name: str) -> str | None:
    """sha256 of the source of the module that defines adapter `name` (third-party adapters too)."""
    import inspect
    import sys

    from ra_probe.sites.registry import registered_adapters

    for adapter in registered_adapters():
        if adapter.name == name:
            try:
                return hashlib.sha256(inspect.getsource(sys.modules[type(adapter).__module__]).encode()).hexdigest()
            except (OSError, TypeError, KeyError):
                return None
    return None


def tensor_digest(*tensors: torch.Tensor | Mapping[str, torch.Tensor] | None) -> str:
    """sha256 over dtypes, shapes and bytes of tensors (or maps of tensors, keys included; a map's
    tensors are looked up one at a time, in the order of their keys)."""
    digest = hashlib.sha256()
    for item in tensors:
        items = ((key, item[key]) for key in sorted(item)) if isinstance(item, Mapping) else [("", item)]
        for key, tensor in items:
            if tensor is None:
                continue
            digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class ResultCache:
    """A folder of entries `<key[:2]>/<key>.pt`. `hits` and `misses` count lookups of this instance."""

    def __init__(self, folder: Path | str | None = None):
        self.folder = Path(folder) if folder is not None else default_dir()
        self.hits = self.misses = 0

    def for_run(self, module: torch.nn.Module, name: str, settings, adapter: str = "") -> RunCache:
        """The entries of one run: keyed by tool and library versions, the adapter, the model's identity
        and weights, and the settings."""
        # the settings that change what is measured (the table's `in_cache_key`); those applied after
        # measuring (thresholds, τ, the sample count) or captured by the chunk's content are not part of it
        kept = {name: value for name, value in settings.as_dict().items() if name in cache_key_settings()}
        kept["device"] = settings.resolved_device().type
        identity = {"version": __version__, "code": code_digest(), "libraries": library_versions(),
                    "adapter": adapter, "adapter_code": adapter_digest(adapter), "model": name,
                    "class": type(module).__qualname__, "weights": tensor_digest(offloading(module).state_dict()),
                    "settings": kept}
        return RunCache(self, hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest())

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.pt"

    def get_or_compute(self, key: str, compute: Callable[[], T], kind: type[T]) -> T:
        """The stored `kind` dataclass for `key`, else `compute()`, stored before it is returned."""
        stored = self._load(key, kind)
        if stored is not None:
            self.hits += 1
            return stored
        self.misses += 1
        result = compute()
        self._store(key, result)
        return result

    def _load(self, key: str, kind: type[T]) -> T | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:  # weights_only: an entry is plain data (tensors, dicts, tuples, strings), never code
            data = torch.load(path, map_location="cpu", weights_only=True)
            return kind(**{f.name: data[f.name] for f in fields(kind)})
        except Exception:  # a damaged or outdated entry is recomputed and replaced
            return None

    def _store(self, key: str, result: Any) -> None:
        try:
            atomic_write(self.path(key), lambda f: torch.save({f_.name: getattr(result, f_.name)
                                                               for f_ in fields(result)}, f))
        except OSError:  # a read-only or full cache disk slows runs down; it never fails them
            pass


@dataclass(frozen=True)
class RunCache:
    """A `ResultCache` bound to one run: entries keyed further by site names and chunk inputs."""

    cache: ResultCache
    run_key: str

    def get_or_compute(self, sites: list[str], values: list[torch.Tensor], compute: Callable[[], T],
                       kind: type[T]) -> T:
        """The entry of a group of `sites` measured on captured `values` (its sites' inputs and outputs)."""
        key = hashlib.sha256(json.dumps([self.run_key, sites, tensor_digest(*values)]).encode()).hexdigest()
        return self.cache.get_or_compute(key, compute, kind)
