"""timm/<name>: a timm model, with its pretrained weights from the Hub or at random init."""
from __future__ import annotations

from typing import Any

from ra_probe.errors import UserError, first_line
from ra_probe.load.loaded import LoadedModel
from ra_probe.load.offline import hub_offline_if_unreachable, why_not_loaded
from ra_probe.load.preprocessing import timm_loaded
from ra_probe.load.reinit import seeded, timm_builder
from ra_probe.load.sources.registry import LoadingOptions, Source

PREFIX = "timm/"


def load(spec: str, options: LoadingOptions) -> LoadedModel:
    return load_timm(spec.removeprefix(PREFIX), pretrained=options.pretrained, seed=options.seed)


def load_timm(name: str, *, pretrained: bool, seed: int = 0, **kwargs: Any) -> LoadedModel:
    """timm's `name` (exportable: non-fused attention, which forward-mode AD needs), built under `seed`;
    `kwargs` go to `timm.create_model`."""
    import timm

    if not timm.is_model(name):
        raise UserError(f"unknown timm model {name!r} (see timm.list_models())")
    offline = pretrained and hub_offline_if_unreachable()
    try:
        module = seeded(lambda: timm.create_model(name, pretrained=pretrained, exportable=True, **kwargs), seed)
    except Exception as exc:
        if pretrained:
            raise UserError(f"cannot download pretrained weights for timm/{name} ({why_not_loaded(offline, exc)}); "
                            "use --no-pretrained for random init") from None
        raise UserError(f"cannot build timm/{name}: {first_line(exc)}") from None
    loaded = timm_loaded(module, f"timm/{name}", "timm")
    loaded.pretrained, loaded.builder = pretrained, timm_builder(name, **kwargs)
    return loaded


SOURCE = Source("timm", "timm/<name>", lambda spec: spec.startswith(PREFIX), load)
