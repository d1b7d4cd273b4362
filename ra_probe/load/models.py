"""Model specs into eval-mode modules with what is known of their inputs, through the source registry
(load/sources): the first stage of the flow; it knows nothing of sites or spectra."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from ra_probe.load.loaded import LoadedModel
from ra_probe.load.sources import LoadingOptions, load


def load_model(ref: str, options: LoadingOptions | None = None, **changes: Any) -> LoadedModel:
    """Load `ref`: `bundled/<name>`, `timm/<name>`, `hf/<org>/<name>`, a local HF or timm folder, a
    checkpoint file with `arch`, a factory `file.py:fn` / `package.module:fn`, or a spec of a source
    registered with `ra_probe.register_source` or installed through the `ra_probe.sources` entry points.
    `options` (LoadingOptions), with `changes` to its fields (pretrained, weights, arch, input_shape,
    device_map, seed). Eval mode, parameters frozen. Raises UserError for anything the user can fix."""
    return load(ref, replace(options or LoadingOptions(), **changes))
