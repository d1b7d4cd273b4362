"""Images as sample data: image folders (`root/<class>/*.png` gives labelled samples, `root/*.png`
unlabelled ones) and encoded images from elsewhere (a dataset's bytes). Images are read with PIL,
converted to the model's channel mode (so mixed sizes and modes are fine) and preprocessed with the
model's own data config (timm) or image processor (HF)."""
from __future__ import annotations

import io
import random
from pathlib import Path

import torch

from ra_probe.errors import UserError, first_line
from ra_probe.load.classes import rows_by_name
from ra_probe.load.loaded import LoadedModel
from ra_probe.load.samples import Samples


def image_files(folder: Path) -> list[Path]:
    """Files of `folder` whose suffix PIL knows, sorted; hidden files ignored."""
    from PIL import Image

    known = set(Image.registered_extensions())
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in known)


def _class_index(names: list[str], model: LoadedModel) -> dict[str, int]:
    """Folder name → the classifier row it stands for: integer names are the index itself, names the
    classifier knows (its label names, ImageNet's wnids and class names) map to their rows, otherwise
    sorted order (0, 1, …)."""
    if all(name.isdigit() for name in names):
        return {name: int(name) for name in names}
    rows = rows_by_name(names, model)
    if rows is not None and None not in rows:
        return dict(zip(names, rows))
    return {name: index for index, name in enumerate(names)}


def load_image_folder(folder: Path, model: LoadedModel, *, limit: int | None, seed: int) -> Samples:
    """At most `limit` images of `folder`, a seeded random subset (so every class is represented),
    as (N, C, H, W) inputs with labels from the class sub-folders, if any."""
    if model.input_shape is None or len(model.input_shape) != 3:
        raise UserError(f"image folder {folder} needs an image model, but {model.name} takes inputs of shape "
                        f"{model.input_shape}")
    try:
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        files = [(p, None) for p in image_files(folder)]
        labelled = [(p, name) for name in classes for p in image_files(folder / name)]
    except OSError as exc:
        raise UserError(f"cannot read image folder {folder}: {exc.strerror or exc}") from None
    if files and labelled:
        raise UserError(f"image folder {folder} mixes images at its top level with class sub-folders")
    files = files or labelled
    if not files:
        raise UserError(f"image folder {folder} holds no images (expected {folder}/<class>/*.png or {folder}/*.png)")
    random.Random(seed).shuffle(files)
    files = files[:limit] if limit is not None else files
    pixels = preprocess([_opened(path, f"image {path}") for path, _ in files], model)
    labels = None
    if labelled:
        index = _class_index(classes, model)
        labels = torch.tensor([index[name] for _, name in files])
    return Samples(pixels, labels, str(folder))


def encoded_image(data: bytes, what: str):
    """An image from its encoded bytes (PNG, JPEG…, as datasets store them); `what` names it in errors."""
    return _opened(io.BytesIO(data), what)


def _opened(source, what: str):
    """An image read into memory from a path or a file object (PIL opens lazily)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as image:
            image.load()
            return image
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise UserError(f"cannot read {what}: {first_line(exc)}") from None


def preprocess(images: list, model: LoadedModel) -> torch.Tensor:
    """PIL images of any size and mode as the model's (N, C, H, W) inputs: converted to its channel
    mode, then its own preprocessing."""
    channels = model.input_shape[0] if model.input_shape and len(model.input_shape) == 3 else None
    if channels not in (1, 3):
        raise UserError(f"{model.name} takes inputs of shape {model.input_shape}; images give 1 (L) or 3 (RGB) "
                        "channels")
    images = [image.convert("L" if channels == 1 else "RGB") for image in images]
    if model.preprocessor is not None:  # a transformers image processor
        return model.preprocessor(images=images, return_tensors="pt")["pixel_values"].float()
    transform = _timm_transform(model)
    return torch.stack([transform(image) for image in images])


def _timm_transform(model: LoadedModel):
    """timm's eval transform for the model's data config (resize, center crop, normalize); models
    without one get timm's defaults at their input size."""
    from timm.data import create_transform, resolve_data_config

    config = dict(model.data_config) or resolve_data_config({"input_size": tuple(model.input_shape)})
    config["input_size"] = tuple(model.input_shape)
    if model.input_shape[0] == 1:  # grayscale: one mean and std
        config["mean"], config["std"] = config["mean"][:1], config["std"][:1]
    return create_transform(**config, is_training=False)
