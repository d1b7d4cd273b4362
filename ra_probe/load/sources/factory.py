"""A factory: a function that returns an `nn.Module`, named as file.py:fn or package.module:fn, called
under the seed (whatever it initializes at random is the same every time)."""
from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

from torch import nn

from ra_probe.errors import UserError, first_line
from ra_probe.load.loaded import LoadedModel
from ra_probe.load.preprocessing import module_loaded
from ra_probe.load.reinit import seeded
from ra_probe.load.sources.registry import LoadingOptions, Source

# file.py:fn, or package.module:fn
FORM = re.compile(r"(?:.+\.py|[A-Za-z_][\w.]*):[A-Za-z_]\w*")


def load(spec: str, options: LoadingOptions) -> LoadedModel:
    target, _, fn_name = spec.rpartition(":")
    fn = getattr(_imported(target), fn_name, None)
    if not callable(fn):
        raise UserError(f"{target} has no callable {fn_name!r}")
    try:
        model = seeded(fn, options.seed)
    except Exception as exc:
        raise UserError(f"factory {spec} failed: {first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"factory {spec} returned {type(model).__name__}, not a torch.nn.Module")
    loaded = module_loaded(model, spec, "factory")
    loaded.builder = lambda: (fn(), f"{spec} called again")
    return loaded


def _imported(target: str) -> ModuleType:
    """The module a factory names: a .py file (imported under a name of its own) or an importable module."""
    if not target.endswith(".py"):
        try:
            return importlib.import_module(target)
        except Exception as exc:
            raise UserError(f"cannot import module {target!r}: {first_line(exc)}") from None
    path = Path(target)
    if not path.is_file():
        raise UserError(f"factory file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"ra_probe_factory_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise UserError(f"cannot import {path}: {first_line(exc)}") from None
    return module


SOURCE = Source("factory", "a factory file.py:fn or package.module:fn", lambda spec: bool(FORM.fullmatch(spec)), load)
