"""A local model folder: a Hugging Face one (config.json with a model_type, and its weights), or a timm
one (config.json with an architecture, and model.safetensors)."""
from __future__ import annotations

import json
from pathlib import Path

from ra_probe.errors import UserError, first_line
from ra_probe.load.loaded import LoadedModel, at_random_init
from ra_probe.load.sources.huggingface import load_hf
from ra_probe.load.sources.registry import LoadingOptions, Source
from ra_probe.load.sources.timm_models import load_timm
from ra_probe.load.weights import load_weights


def load(spec: str, options: LoadingOptions) -> LoadedModel:
    folder = Path(spec)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(f"folder {folder} has no config.json (expected a Hugging Face or timm model folder)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {config_file}: {first_line(exc)}") from None
    if "architecture" in config and "model_type" not in config:  # timm layout
        if options.device_map is not None:
            raise UserError(f"device_map splits Hugging Face models (hf/<org>/<name> or a local folder), not {spec}")
        return _timm_folder(folder, config, options)
    return load_hf(str(folder), display=str(folder), options=options)


def _timm_folder(folder: Path, config: dict, options: LoadingOptions) -> LoadedModel:
    """A timm folder's architecture with the folder's weights, or at random init without `pretrained`."""
    loaded = load_timm(config["architecture"], pretrained=False, seed=options.seed,
                       num_classes=config.get("num_classes", 1000))
    loaded.name, loaded.source = str(folder), "folder"
    if options.pretrained:
        weights = folder / "model.safetensors"
        loaded.weights_sha256 = load_weights(loaded.module, weights)
        loaded.weights_path, loaded.pretrained = str(weights), True
    elif options.weights is None:  # given weights replace every tensor anyway
        at_random_init(loaded, options.seed)
    return loaded


SOURCE = Source("folder", "a model folder", lambda spec: Path(spec).is_dir(), load, device_map=True)
