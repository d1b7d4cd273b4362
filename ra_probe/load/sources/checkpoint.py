"""A checkpoint file (.safetensors, .pt, .pth, .bin) loaded strictly into the architecture `arch` names."""
from __future__ import annotations

from dataclasses import replace

from ra_probe.errors import UserError
from ra_probe.load.loaded import LoadedModel
from ra_probe.load.sources import registry
from ra_probe.load.sources.registry import LoadingOptions, Source
from ra_probe.load.weights import CHECKPOINT_SUFFIXES


def load(spec: str, options: LoadingOptions) -> LoadedModel:
    """The architecture `options.arch` at random init with the checkpoint's weights: the checkpoint is
    the model (its name), its architecture is in `builder`."""
    if options.arch is None:
        raise UserError(f"checkpoint {spec!r} needs --arch to say which architecture it holds")
    if options.weights is not None:
        raise UserError(f"checkpoint {spec!r} holds the weights; --weights cannot be given with it")
    loaded = registry.load(options.arch, replace(options, pretrained=False, weights=spec, arch=None))
    loaded.name = spec
    return loaded


def recognizes(spec: str) -> bool:
    return spec.endswith(CHECKPOINT_SUFFIXES) and "://" not in spec


SOURCE = Source("checkpoint", "a checkpoint file with --arch", recognizes, load)
