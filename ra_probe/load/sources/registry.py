"""The source registry: what turns a model spec ("timm/resnet50", "bundled/fc-digits", a folder, a
checkpoint file, "pkg.mod:fn") into a loaded model. Each source says which specs it recognizes and how
it loads them; `load` asks the sources in turn. The built-in sources are registered in code
(`ra_probe.load.sources`); others with `register_source`, in this process, or installed through the
entry-point group `ra_probe.sources`, read only when no other source recognizes a spec."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from torch import nn

from ra_probe.errors import UserError, first_line
from ra_probe.load.loaded import LoadedModel, at_random_init, freeze
from ra_probe.load.preprocessing import module_loaded
from ra_probe.load.weights import load_weights

ENTRY_POINT_GROUP = "ra_probe.sources"


@dataclass(frozen=True)
class LoadingOptions:
    """How a model is loaded, whatever its source. `pretrained`: its trained weights (False: the
    architecture at random init, drawn under `seed`); `weights`: a state dict file loaded strictly into it;
    `arch`: the architecture a checkpoint file holds, as a model spec; `input_shape`: per sample, where the
    source cannot tell; `device_map`: "auto", "balanced"..., or a {module: device} map (or its JSON text)
    that splits the model across devices, offloading what does not fit (sources that can, Hugging Face's)."""

    pretrained: bool = True
    weights: str | Path | None = None
    arch: str | None = None
    input_shape: tuple[int, ...] | None = None
    device_map: str | dict[str, Any] | None = None
    seed: int = 0


@dataclass(frozen=True)
class Source:
    """A model source. `recognizes(spec)`: whether the spec is one of its models (cheap: no import of a
    heavy library, no download); `load(spec, options)`: the model, an `nn.Module` (what it takes is read
    from it as for a module given to `probe`) or a `LoadedModel` (its module, name and what is known of
    its inputs), raising `ra_probe.errors.UserError` for anything the user can fix.
    What `load` need not do: load `options.weights`, freeze the module, set `options.input_shape`, and
    give random init for `pretrained=False` (a module, or a LoadedModel whose `pretrained` is True, is
    re-initialized from its `builder`, or from the module itself). `forms`: its specs in words, for messages ("timm/<name>");
    `device_map`: whether it places a model across devices itself."""

    name: str
    forms: str
    recognizes: Callable[[str], bool]
    load: Callable[[str, LoadingOptions], LoadedModel | nn.Module]
    device_map: bool = False


BUILT_IN: list[Source] = []  # filled by ra_probe.load.sources, in the order they are asked
_REGISTERED: list[Source] = []  # added with register_source, in this process


def register_source(source: Source) -> Source:
    """Add a model source for this process: asked before the built-in ones, so it may claim specs they
    would take. A source of the same name replaces the earlier one. Returns the source."""
    missing = _missing(source)
    if missing:
        raise TypeError(f"a source needs name, forms, recognizes(spec) and load(spec, options); {source!r} "
                        f"has no {missing}")
    _REGISTERED[:] = [s for s in _REGISTERED if s.name != source.name] + [source]
    return source


def _missing(source: Any) -> str | None:
    """The first attribute a source needs that `source` lacks (None: it has them all)."""
    return next((name for name in ("name", "forms", "recognizes", "load") if not hasattr(source, name)), None)


def installed_sources() -> list[Source]:
    """The sources installed through the entry-point group (each entry point names a `Source`); one
    that cannot be imported, or is no source, is a one-line UserError naming its entry point."""
    sources = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            source = ep.load()
        except Exception as exc:  # a third party's import can fail in any way
            raise UserError(f"the installed model source {ep.name} ({ep.value}) cannot be imported: "
                            f"{first_line(exc)}") from None
        if _missing(source):
            raise UserError(f"the installed model source {ep.name} ({ep.value}) is not a ra_probe.Source")
        sources.append(source)
    return sources


def find_source(spec: str) -> Source:
    """The first source that recognizes `spec`: registered ones, the built-in ones, then the installed
    ones (only then are their entry points read). None recognizes it: a UserError listing them all."""
    for source in (*_REGISTERED, *BUILT_IN):
        if source.recognizes(spec):
            return source
    installed = installed_sources()
    for source in installed:
        if source.recognizes(spec):
            return source
    every = [*_REGISTERED, *BUILT_IN, *installed]
    raise UserError(f"unknown model {spec!r}: expected {', '.join(s.forms for s in every)} "
                    f"(sources: {', '.join(s.name for s in every)})")


def load(spec: str, options: LoadingOptions = LoadingOptions()) -> LoadedModel:
    """`spec` loaded by the source that recognizes it, with `options`: eval mode, parameters frozen."""
    source = find_source(spec)
    if options.device_map is not None:
        if not source.device_map:
            raise UserError(f"device_map splits Hugging Face models (hf/<org>/<name> or a local folder), not {spec}")
        if options.weights is not None:
            raise UserError("device_map loads the folder's own weights; weights cannot be given with it")
    loaded = source.load(spec, options)
    module = isinstance(loaded, nn.Module)  # what it was trained on, if at all, is not known
    if module:
        loaded = module_loaded(loaded, spec, source.name, options.input_shape)
    if options.weights is not None:
        loaded.weights_sha256 = load_weights(loaded.module, options.weights)
        loaded.weights_path, loaded.pretrained = str(options.weights), True
    elif not options.pretrained and (module or loaded.pretrained) and loaded.weights_path is None:
        at_random_init(loaded, options.seed)  # a source that gives only trained weights (bundled)
    if options.input_shape is not None:
        loaded.input_shape = tuple(options.input_shape)
    freeze(loaded.module)
    return loaded
