"""bundled/<name>: the trained demo models shipped with ra-probe (load/bundled)."""
from __future__ import annotations

from ra_probe.errors import UserError
from ra_probe.load.loaded import LoadedModel
from ra_probe.load.sources.registry import LoadingOptions, Source
from ra_probe.load.weights import load_weights

PREFIX = "bundled/"


def load(spec: str, options: LoadingOptions) -> LoadedModel:
    """A bundled model with its trained weights (random init, when asked for, is the registry's)."""
    from ra_probe.load.bundled import MODELS
    from ra_probe.load.bundled.fcresnet import FCResNet

    name = spec.removeprefix(PREFIX)
    if name not in MODELS:
        raise UserError(f"unknown bundled model {name!r}; bundled models: {', '.join(MODELS)}")
    model = MODELS[name]
    module = FCResNet(skip=model.skip)
    digest = load_weights(module, model.weights)
    return LoadedModel(module, spec, "bundled", input_shape=(64,), num_classes=10,
                       default_data="bundled/digits", weights_sha256=digest, pretrained=True,
                       builder=lambda: (FCResNet(skip=model.skip), f"FCResNet(skip={model.skip}) (torch's default init)"))


SOURCE = Source("bundled", "bundled/<name>", lambda spec: spec.startswith(PREFIX), load)
