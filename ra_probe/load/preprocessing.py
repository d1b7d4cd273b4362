"""What a model takes and how its inputs are prepared: a timm model's data config, a transformers model's
image processor, tokenizer or feature extractor, a bare module's input shape (`module_loaded`)."""
from __future__ import annotations

from typing import Any

from torch import nn

from ra_probe.load.loaded import LoadedModel


def timm_loaded(module: nn.Module, name: str, source: str) -> LoadedModel:
    """A timm model as a LoadedModel, preprocessed by its own data config (`pretrained_cfg`)."""
    import timm

    config = timm.data.resolve_data_config({}, model=module)
    return LoadedModel(module, name, source, input_shape=tuple(config["input_size"]),
                       num_classes=getattr(module, "num_classes", None) or None, modality="image",
                       data_config=config,
                       preprocessing=f"timm data config of the model (mean {_rounded(config['mean'])}, "
                                     f"std {_rounded(config['std'])})")


def _rounded(values) -> str:
    return "/".join(f"{v:.3g}" for v in values)


def image_preprocessing(preprocessor: Any, modality: str) -> str | None:
    """How a model's images are normalized, in words (None when it does not take images)."""
    if modality != "image":
        return None
    if preprocessor is None:
        return "ImageNet's mean/std (the model has no data config or image processor of its own)"
    return f"the model's image processor ({type(preprocessor).__name__})"


def hf_preprocessor(repo: str, modality: str) -> Any:
    """The tokenizer, feature extractor or image processor of a Hugging Face model (None when it has none)."""
    import transformers

    auto = {"text": transformers.AutoTokenizer, "audio": transformers.AutoFeatureExtractor}.get(
        modality, transformers.AutoImageProcessor)
    try:
        return auto.from_pretrained(repo)
    except Exception:  # a model folder without a tokenizer/processor: .npz and synthetic data still work
        return None


def module_loaded(model: nn.Module, name: str, source: str, input_shape: tuple[int, ...] | None = None) -> LoadedModel:
    """A module built elsewhere (a factory, a notebook) as a LoadedModel. A timm model keeps its own data
    config and a transformers model its image processor where one can be found; others take vectors of
    their first Linear's width, or images normalized with ImageNet's mean/std (said in `preprocessing`)."""
    if (getattr(model, "pretrained_cfg", None) or {}).get("mean") is not None:
        loaded = timm_loaded(model, name, source)
        if input_shape is not None:
            loaded.input_shape = tuple(input_shape)
        return loaded
    config = getattr(model, "config", None)
    image_size = getattr(config, "image_size", None)
    shape = input_shape or getattr(model, "input_shape", None) or _first_linear_input(model)
    loaded = LoadedModel(model, name, source, input_shape=tuple(shape) if shape else None,
                         num_classes=getattr(model, "num_classes", None) or None)
    if isinstance(image_size, int) and hasattr(model, "_from_config"):  # a transformers vision model
        origin = getattr(config, "_name_or_path", "")
        loaded.modality = "image"
        loaded.input_shape = loaded.input_shape or (getattr(config, "num_channels", 3), image_size, image_size)
        loaded.preprocessor = hf_preprocessor(origin, "image") if origin else None
    if loaded.input_shape is not None and len(loaded.input_shape) == 3:
        loaded.preprocessing = image_preprocessing(loaded.preprocessor, "image")
    return loaded


def _first_linear_input(model: nn.Module) -> tuple[int, ...] | None:
    """A model whose first parametric layer is a Linear takes vectors of its in_features."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            return (module.in_features,)
        if any(True for _ in module.parameters(recurse=False)):
            return None
    return None
