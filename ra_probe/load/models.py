"""Model sources: turn a model reference string into an eval-mode `nn.Module` with what is
known about its inputs. This is the first stage of the flow; it knows nothing of sites or spectra."""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import math
import shutil
import sys
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ra_probe.errors import UserError, first_line
from ra_probe.load.reinit import Builder, hf_builder, random_init, seeded, timm_builder

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


@dataclass
class LoadedModel:
    """A model ready to probe. `input_shape` is per sample (None when unknown); `modality` is
    "vector", "image", "text" or "audio" (log-mel features or raw waveforms); `default_data` names the model's
    own data (bundled models), used when the user gives none; others get real data of their domain
    (load/defaults.py)."""

    module: nn.Module
    name: str
    source: str
    input_shape: tuple[int, ...] | None = None
    num_classes: int | None = None
    modality: str = "vector"
    default_data: str | None = None
    data_config: dict[str, Any] = field(default_factory=dict)
    preprocessor: Any = None  # HF tokenizer or image processor
    weights_sha256: str | None = None
    pretrained: bool | None = None  # weights from training (a download, a checkpoint, a saved folder)
    weights_path: str | None = None  # the user's checkpoint loaded into the architecture (bundled: named, not pathed)
    builder: Builder | None = None  # the architecture anew at random init (None: derived from the module)
    preprocessing: str | None = None  # how images are normalized for it, when it takes images


def load_model(ref: str, *, pretrained: bool = True, weights: str | None = None,
               arch: str | None = None, input_shape: tuple[int, ...] | None = None,
               device_map: str | dict[str, Any] | None = None, seed: int = 0) -> LoadedModel:
    """Load `ref`: `bundled/<name>`, `timm/<name>`, `hf/<org>/<name>`, a local HF or timm folder, a
    checkpoint file with `arch`, or a factory `file.py:fn` / `package.module:fn`. Eval mode, parameters
    frozen. `device_map` ("auto", "balanced", a {module: device} map or its JSON text) splits a Hugging
    Face model across devices with accelerate. Whatever is initialized at random (`pretrained=False`, a
    factory's layers) is drawn under `seed`, so the same call gives the same weights. Raises UserError
    for anything the user can fix."""
    if device_map is not None:
        if ref.startswith(("bundled/", "timm/")) or ref.endswith(CHECKPOINT_SUFFIXES) or ":" in ref \
                or (Path(ref).is_dir() and not _is_hf_folder(Path(ref))):
            raise UserError(f"device_map splits Hugging Face models (hf/<org>/<name> or a local folder), not {ref}")
        if weights is not None:
            raise UserError("device_map loads the folder's own weights; weights cannot be given with it")
        loaded = _load_hf(ref.removeprefix("hf/"), display=ref, device_map=_device_map(device_map), seed=seed)
    elif ref.startswith("bundled/"):
        loaded = _load_bundled(ref.removeprefix("bundled/"))
    elif ref.startswith("timm/"):
        loaded = _load_timm(ref.removeprefix("timm/"), pretrained=pretrained, seed=seed)
    elif ref.startswith("hf/"):
        loaded = _load_hf(ref.removeprefix("hf/"), display=ref, seed=seed, pretrained=pretrained)
    elif Path(ref).is_dir():
        loaded = _load_folder(Path(ref), seed, pretrained)
    elif ref.endswith(CHECKPOINT_SUFFIXES):
        if arch is None:
            raise UserError(f"checkpoint {ref!r} needs --arch to say which architecture it holds")
        if weights is not None:
            raise UserError(f"checkpoint {ref!r} holds the weights; --weights cannot be given with it")
        loaded = load_model(arch, pretrained=False, input_shape=input_shape, seed=seed)
        loaded.name = ref  # the checkpoint is the model; its architecture is in `builder`
        weights = ref
    elif ":" in ref:
        loaded = _load_factory(ref, seed)
    else:
        raise UserError(f"unknown model {ref!r}: expected bundled/<name>, timm/<name>, hf/<org>/<name>, "
                        "a folder, a checkpoint file with --arch, or a factory file.py:fn")
    if not pretrained and loaded.pretrained and weights is None:
        _at_random_init(loaded, seed)
    if weights is not None:
        loaded.weights_sha256 = load_weights(loaded.module, weights)
        loaded.weights_path, loaded.pretrained = str(weights), True
    if input_shape is not None:
        loaded.input_shape = tuple(input_shape)
    freeze(loaded.module)
    return loaded


def _at_random_init(loaded: LoadedModel, seed: int) -> None:
    """`loaded`'s architecture built anew at random init under `seed`, in place of the trained weights its
    source gave (a bundled model, a Hugging Face model or folder asked for without its weights)."""
    fresh = random_init(loaded.builder, loaded.module, seed)
    if fresh.module is None:
        raise UserError(f"{loaded.name} cannot be built at random init: {fresh.how}")
    loaded.module, loaded.pretrained, loaded.weights_sha256, loaded.weights_path = fresh.module, False, None, None


def freeze(module: nn.Module) -> None:
    """Eval mode (BatchNorm frozen, dropout off) and no parameter gradients: a probe never trains."""
    module.eval()
    module.requires_grad_(False)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a torch file (plain, or under "state_dict"/"model")."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or truncated files raise many different types
        raise UserError(f"cannot read weights {path}: {first_line(exc)}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} does not hold a state dict of tensors")
    return state


def load_weights(module: nn.Module, path: str | Path) -> str:
    """Load a state dict strictly; a checkpoint that does not fit is a UserError. Returns its sha256."""
    state = read_state_dict(path)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        own = module.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        misshaped = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
        detail = "; ".join(f"{label} {len(keys)} (e.g. {keys[0]})" for label, keys in
                           (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if keys)
        raise UserError(f"weights {path} do not fit the architecture: {detail or first_line(exc)}") from None
    return sha256_of(Path(path))



def _load_bundled(name: str) -> LoadedModel:
    from ra_probe.load.bundled import MODELS
    from ra_probe.load.bundled.fcresnet import FCResNet

    if name not in MODELS:
        raise UserError(f"unknown bundled model {name!r}; bundled models: {', '.join(MODELS)}")
    spec = MODELS[name]
    module = FCResNet(skip=spec.skip)
    digest = load_weights(module, spec.weights)
    return LoadedModel(module, f"bundled/{name}", "bundled", input_shape=(64,), num_classes=10,
                       default_data="bundled/digits", weights_sha256=digest, pretrained=True,
                       builder=lambda: (FCResNet(skip=spec.skip), f"FCResNet(skip={spec.skip}) (torch's default init)"))


def hub_offline_if_unreachable() -> bool:
    """When the Hub cannot be reached, switch huggingface-hub to offline mode so that cached weights
    still load and missing ones fail at once instead of after minutes of retries. True if offline."""
    import socket
    from urllib.parse import urlparse

    import huggingface_hub.constants as hub

    if hub.HF_HUB_OFFLINE:
        return True
    try:
        socket.getaddrinfo(urlparse(hub.ENDPOINT).hostname, 443)
    except OSError:
        hub.HF_HUB_OFFLINE = True
        return True
    return False


def _load_timm(name: str, *, pretrained: bool, seed: int = 0, **kwargs: Any) -> LoadedModel:
    import timm

    if not timm.is_model(name):
        raise UserError(f"unknown timm model {name!r} (see timm.list_models())")
    offline = pretrained and hub_offline_if_unreachable()
    try:
        # exportable=True: non-fused attention, which forward-mode AD needs
        module = seeded(lambda: timm.create_model(name, pretrained=pretrained, exportable=True, **kwargs), seed)
    except Exception as exc:
        if pretrained:
            why = "no network and not in the local cache" if offline else first_line(exc)
            raise UserError(f"cannot download pretrained weights for timm/{name} ({why}); "
                            "use --no-pretrained for random init") from None
        raise UserError(f"cannot build timm/{name}: {first_line(exc)}") from None
    loaded = timm_loaded(module, f"timm/{name}", "timm")
    loaded.pretrained, loaded.builder = pretrained, timm_builder(name, **kwargs)
    return loaded


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


def _load_folder(folder: Path, seed: int, pretrained: bool = True) -> LoadedModel:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(f"folder {folder} has no config.json (expected a Hugging Face or timm model folder)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {config_file}: {first_line(exc)}") from None
    if "architecture" in config and "model_type" not in config:  # timm layout
        weights = folder / "model.safetensors"
        loaded = _load_timm(config["architecture"], pretrained=False, seed=seed,
                            num_classes=config.get("num_classes", 1000))
        loaded.weights_sha256 = load_weights(loaded.module, weights)
        loaded.name, loaded.source, loaded.weights_path, loaded.pretrained = str(folder), "folder", str(weights), True
        return loaded
    return _load_hf(str(folder), display=str(folder), seed=seed, pretrained=pretrained)


def _is_hf_folder(folder: Path) -> bool:
    try:
        return "model_type" in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False


def _device_map(value: str | dict[str, Any]) -> str | dict[str, Any]:
    """A device map as `from_pretrained` takes it: a strategy name, or a {module: device} map (given as
    a dict or as JSON text); accelerate must be installed."""
    from importlib.util import find_spec

    if find_spec("accelerate") is None:
        raise UserError("device_map needs accelerate: pip install 'ra-probe[big]'")
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise UserError(f"device_map is not a JSON map of module to device: {first_line(exc)}") from None
    if isinstance(value, dict):
        if not all(isinstance(k, str) and isinstance(v, (str, int, torch.device)) for k, v in value.items()):
            raise UserError("device_map must map module names to devices (\"cpu\", 0, \"cuda:1\"…)")
        return value
    if value not in ("auto", "balanced", "balanced_low_0", "sequential"):
        raise UserError(f"device_map must be auto, balanced, balanced_low_0, sequential or a JSON map, got {value!r}")
    return value


def _offload_folder() -> str:
    """A new temporary folder for the weights accelerate writes when it offloads to disk ones it cannot
    read from the model's own safetensors files (other formats, converted weights); under $TMPDIR."""
    return tempfile.mkdtemp(prefix="ra-probe-offload-")


def _keep_while_used(folder: str, module: nn.Module) -> None:
    """`folder` removed at once when nothing was written to it, else when `module` is collected (or
    at exit): its hooks read offloaded weights from it."""
    if not any(Path(folder).iterdir()):
        Path(folder).rmdir()
    else:
        weakref.finalize(module, shutil.rmtree, folder, ignore_errors=True)


def _load_hf(repo: str, *, display: str, device_map: str | dict[str, Any] | None = None,
             seed: int = 0, pretrained: bool = True) -> LoadedModel:
    """A transformers model (eager attention) from the Hub or a folder; without `pretrained`, built from
    its config alone at random init under `seed`, so no weights are downloaded."""
    import transformers

    offline = not Path(repo).is_dir() and hub_offline_if_unreachable()
    try:
        config = transformers.AutoConfig.from_pretrained(repo)
    except Exception as exc:
        why = "no network and not in the local cache" if offline else first_line(exc)
        raise UserError(f"cannot load the Hugging Face model {display} ({why})") from None
    archs = getattr(config, "architectures", None) or []
    model_cls = getattr(transformers, archs[0], None) if archs else None
    placement = {} if device_map is None else {"device_map": device_map, "offload_folder": _offload_folder()}
    try:  # weights the files lack are initialized at random, under the seed
        if pretrained:
            module, info = seeded(lambda: (model_cls or transformers.AutoModel).from_pretrained(
                repo, attn_implementation="eager", output_loading_info=True, **placement), seed)
        else:
            module = seeded(hf_builder(config, model_cls), seed)[0]
            info = {"missing_keys": [name for name, _ in module.named_parameters()]}
    except Exception as exc:
        if placement:
            shutil.rmtree(placement["offload_folder"], ignore_errors=True)
        raise UserError(f"cannot load Hugging Face model {display}: {first_line(exc)}") from None
    if placement:
        _keep_while_used(placement["offload_folder"], module)
    image_size = getattr(config, "image_size", None)
    channels = getattr(config, "num_channels", 3)
    if getattr(module, "main_input_name", None) in ("input_features", "input_values"):  # speech (Whisper, wav2vec2)
        modality, input_shape = "audio", None
    elif image_size is not None:
        size = image_size if isinstance(image_size, (list, tuple)) else (image_size, image_size)
        modality, input_shape = "image", (channels, *size)
    elif getattr(config, "vocab_size", None):
        modality, input_shape = "text", None
    else:
        modality, input_shape = "image", (channels, 224, 224)
    num_labels = getattr(config, "num_labels", None) if model_cls is not None and "For" in archs[0] else None
    preprocessor = _hf_preprocessor(repo, modality)
    if modality == "audio":
        input_shape = _audio_shape(module, config, preprocessor)
    missing = set(info.get("missing_keys") or ())
    trained = any(name not in missing for name, _ in module.named_parameters())
    return LoadedModel(module, display, "hf", input_shape=input_shape, num_classes=num_labels,
                       modality=modality, preprocessor=preprocessor, pretrained=trained,
                       builder=None if device_map is not None else hf_builder(config, model_cls),
                       preprocessing=_image_preprocessing(preprocessor, modality))


# frames of a raw-waveform encoder's synthetic input: one second of wav2vec2's 20 ms frames
WAVEFORM_FRAMES = 50


def _audio_shape(module: nn.Module, config: Any, extractor: Any) -> tuple[int, ...] | None:
    """The per-sample shape of a speech model's input; None when the config does not say.
    Log-mel features (Whisper's): (mel bins, frames), as many frames as its positions times the stride of
    the convolutions in front of them. A raw waveform (wav2vec2, HuBERT, WavLM...): (samples,), one second
    at the feature extractor's sampling rate (16 kHz without one), cut to the samples whose convolutional
    feature encoder gives `WAVEFORM_FRAMES` frames when a second gives more (a small encoder's stride)."""
    kernels, strides = getattr(config, "conv_kernel", None), getattr(config, "conv_stride", None)
    if kernels and strides:
        second = getattr(extractor, "sampling_rate", None) or 16000
        length = 1  # samples for one frame, then for WAVEFORM_FRAMES: each conv's (L - 1) * stride + kernel
        for kernel, stride in reversed(list(zip(kernels, strides))):
            length = (length - 1) * stride + kernel
        return (min(second, length + (WAVEFORM_FRAMES - 1) * math.prod(strides)),)
    bins, positions = getattr(config, "num_mel_bins", None), getattr(config, "max_source_positions", None)
    if not (isinstance(bins, int) and isinstance(positions, int)):
        return None
    stride = 1
    for conv in (m for m in module.modules() if isinstance(m, nn.Conv1d)):
        stride *= conv.stride[0]
    return bins, positions * stride


def _image_preprocessing(preprocessor: Any, modality: str) -> str | None:
    if modality != "image":
        return None
    if preprocessor is None:
        return "ImageNet's mean/std (the model has no data config or image processor of its own)"
    return f"the model's image processor ({type(preprocessor).__name__})"


def _hf_preprocessor(repo: str, modality: str) -> Any:
    import transformers

    auto = {"text": transformers.AutoTokenizer, "audio": transformers.AutoFeatureExtractor}.get(
        modality, transformers.AutoImageProcessor)
    try:
        return auto.from_pretrained(repo)
    except Exception:  # a model folder without a tokenizer/processor: .npz and synthetic data still work
        return None


def _load_factory(ref: str, seed: int) -> LoadedModel:
    target, _, fn_name = ref.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise UserError(f"factory file not found: {path}")
        spec = importlib.util.spec_from_file_location(f"ra_probe_factory_{path.stem}", path)
        module_obj = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module_obj
        try:
            spec.loader.exec_module(module_obj)
        except Exception as exc:
            raise UserError(f"cannot import {path}: {first_line(exc)}") from None
    else:
        try:
            module_obj = importlib.import_module(target)
        except Exception as exc:
            raise UserError(f"cannot import module {target!r}: {first_line(exc)}") from None
    fn = getattr(module_obj, fn_name, None)
    if not callable(fn):
        raise UserError(f"{target} has no callable {fn_name!r}")
    try:
        model = seeded(fn, seed)
    except Exception as exc:
        raise UserError(f"factory {ref} failed: {first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"factory {ref} returned {type(model).__name__}, not a torch.nn.Module")
    loaded = module_loaded(model, ref, "factory")
    loaded.builder = lambda: (fn(), f"{ref} called again")
    return loaded


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
        loaded.preprocessor = _hf_preprocessor(origin, "image") if origin else None
    if loaded.input_shape is not None and len(loaded.input_shape) == 3:
        loaded.preprocessing = _image_preprocessing(loaded.preprocessor, "image")
    return loaded


def _first_linear_input(model: nn.Module) -> tuple[int, ...] | None:
    """A model whose first parametric layer is a Linear takes vectors of its in_features."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            return (module.in_features,)
        if any(True for _ in module.parameters(recurse=False)):
            return None
    return None
