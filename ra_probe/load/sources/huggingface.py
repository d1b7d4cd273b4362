"""hf/<org>/<name>: a transformers model from the Hugging Face Hub (eager attention), with its trained
weights or built from its config at random init; `device_map` splits it across devices (accelerate)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ra_probe.errors import UserError, first_line
from ra_probe.load.audio_shape import audio_shape
from ra_probe.load.loaded import LoadedModel
from ra_probe.load.offline import hub_offline_if_unreachable, why_not_loaded
from ra_probe.load.offload import keep_while_used, offload_folder, parsed_device_map
from ra_probe.load.preprocessing import hf_preprocessor, image_preprocessing
from ra_probe.load.reinit import hf_builder, seeded
from ra_probe.load.sources.registry import LoadingOptions, Source

PREFIX = "hf/"


def load(spec: str, options: LoadingOptions) -> LoadedModel:
    return load_hf(spec.removeprefix(PREFIX), display=spec, options=options)


def load_hf(repo: str, *, display: str, options: LoadingOptions) -> LoadedModel:
    """A transformers model (eager attention) from the Hub or a folder; without `options.pretrained`,
    built from its config alone at random init under the seed, so no weights are downloaded. With a
    `device_map`, always its trained weights, placed across devices."""
    import transformers

    offline = not Path(repo).is_dir() and hub_offline_if_unreachable()
    try:
        config = transformers.AutoConfig.from_pretrained(repo)
    except Exception as exc:
        raise UserError(f"cannot load the Hugging Face model {display} ({why_not_loaded(offline, exc)})") from None
    archs = getattr(config, "architectures", None) or []
    model_cls = getattr(transformers, archs[0], None) if archs else None
    placement = {} if options.device_map is None else {"device_map": parsed_device_map(options.device_map),
                                                       "offload_folder": offload_folder()}
    try:  # weights the files lack are initialized at random, under the seed
        if options.pretrained or placement:
            module, info = seeded(lambda: (model_cls or transformers.AutoModel).from_pretrained(
                repo, attn_implementation="eager", output_loading_info=True, **placement), options.seed)
        else:
            module = seeded(hf_builder(config, model_cls), options.seed)[0]
            info = {"missing_keys": [name for name, _ in module.named_parameters()]}
    except Exception as exc:
        if placement:
            shutil.rmtree(placement["offload_folder"], ignore_errors=True)
        raise UserError(f"cannot load Hugging Face model {display}: {first_line(exc)}") from None
    if placement:
        keep_while_used(placement["offload_folder"], module)
    modality, input_shape = _modality(module, config)
    num_labels = getattr(config, "num_labels", None) if model_cls is not None and "For" in archs[0] else None
    preprocessor = hf_preprocessor(repo, modality)
    if modality == "audio":
        input_shape = audio_shape(module, config, preprocessor)
    missing = set(info.get("missing_keys") or ())
    trained = any(name not in missing for name, _ in module.named_parameters())
    return LoadedModel(module, display, "hf", input_shape=input_shape, num_classes=num_labels,
                       modality=modality, preprocessor=preprocessor, pretrained=trained,
                       builder=None if placement else hf_builder(config, model_cls),
                       preprocessing=image_preprocessing(preprocessor, modality))


def _modality(module: Any, config: Any) -> tuple[str, tuple[int, ...] | None]:
    """What a transformers model takes (audio, image, text) and, for images, their per-sample shape."""
    image_size = getattr(config, "image_size", None)
    channels = getattr(config, "num_channels", 3)
    if getattr(module, "main_input_name", None) in ("input_features", "input_values"):  # speech (Whisper, wav2vec2)
        return "audio", None
    if image_size is not None:
        size = image_size if isinstance(image_size, (list, tuple)) else (image_size, image_size)
        return "image", (channels, *size)
    if getattr(config, "vocab_size", None):
        return "text", None
    return "image", (channels, 224, 224)


SOURCE = Source("hf", "hf/<org>/<name>", lambda spec: spec.startswith(PREFIX), load, device_map=True)
