"""What a classifier's rows stand for (ImageNet-1k's classes, CIFAR's, or the names the model gives
them), and class names (an image folder's, a dataset's) mapped onto those rows."""
from __future__ import annotations

import re
from functools import cache

from ra_probe.load.loaded import LoadedModel

CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def normalized(name: str) -> str:
    """A class name as names are compared: lower case, `_` and `-` as spaces ("Golden_Retriever" →
    "golden retriever")."""
    return " ".join(re.sub(r"[_\-]", " ", str(name)).lower().split())


def synonyms(name: str) -> set[str]:
    """The names one label answers to: itself and each of its comma-separated parts ("tench, Tinca
    tinca" → tench, tinca tinca, and the whole)."""
    return {normalized(name), *(normalized(part) for part in str(name).split(",") if part.strip())}


@cache
def _imagenet() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """ImageNet-1k's wnids and descriptions in row order (timm's copy of the class index)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-1k")
    return tuple(info.label_names()), tuple(info.index_to_description(i) for i in range(info.num_classes()))


def own_names(model: LoadedModel) -> list[str] | None:
    """The names the model gives its rows (a transformers config's `id2label`, one per row); None when it
    gives none, or only the placeholders LABEL_0, LABEL_1… a config has by default."""
    id2label = getattr(getattr(model.module, "config", None), "id2label", None) or {}
    if not model.num_classes or len(id2label) != model.num_classes:
        return None
    names = [str(id2label.get(i, id2label.get(str(i), ""))) for i in range(model.num_classes)]
    if all(re.fullmatch(r"LABEL_\d+", name) for name in names) or not all(names):
        return None
    return names


def imagenet_1k(model: LoadedModel) -> bool:
    """Whether the model's 1000 rows are ImageNet-1k's classes, in its order. A timm model: its pretrained
    config (the weights it names, loaded or not) has 1000 classes and a tag of ImageNet-1k training or
    fine-tuning (`…in1k…`); timm's own guess from the count alone would take any 1000-class head. A
    transformers image model with 1000 labels: names that are ImageNet's at ≥ 95 % of the rows (spellings
    vary a little between copies of the class index), or no names at all (a config's LABEL_n)."""
    if model.num_classes != 1000:
        return False
    timm_config = getattr(model.module, "pretrained_cfg", None)
    if isinstance(timm_config, dict):
        return timm_config.get("num_classes") == 1000 and "in1k" in (timm_config.get("tag") or "")
    if model.modality != "image" or getattr(model.module, "config", None) is None:
        return False
    names = own_names(model)
    if names is None:
        return True
    descriptions = _imagenet()[1]
    agree = sum(normalized(own.split(",")[0]) == normalized(known.split(",")[0])
                for own, known in zip(names, descriptions))
    return agree >= 0.95 * len(descriptions)


def cifar(model: LoadedModel) -> int | None:
    """10 or 100 for a CIFAR-10 or CIFAR-100 classifier: as many rows, and CIFAR in the model's name
    (its reference, its config's origin, its timm tag), or CIFAR-10's label names in CIFAR-10's order.
    None otherwise: ten rows alone could be any ten classes."""
    if model.num_classes not in (10, 100):
        return None
    config = getattr(model.module, "config", None)
    timm_config = getattr(model.module, "pretrained_cfg", None) or {}
    text = " ".join(str(part) for part in (model.name, getattr(config, "_name_or_path", ""),
                                           timm_config.get("tag", ""), timm_config.get("hf_hub_id", ""))).lower()
    named = re.search(r"cifar[-_]?(100|10)(?!\d)", text)
    if named and int(named.group(1)) == model.num_classes:
        return model.num_classes
    names = own_names(model)
    if names is not None and [normalized(n) for n in names] == list(CIFAR10):
        return 10
    return None


def _row_synonyms(model: LoadedModel) -> list[set[str]] | None:
    """Per row, the names it answers to: the model's own label names and, for ImageNet-1k, the wnid and
    every synonym of the class's description. None when the rows have no names."""
    names = own_names(model)
    rows = [synonyms(name) for name in names] if names is not None else None
    if imagenet_1k(model):
        wnids, descriptions = _imagenet()
        known = [{wnid.lower(), *synonyms(description)} for wnid, description in zip(wnids, descriptions)]
        rows = known if rows is None else [own | imagenet for own, imagenet in zip(rows, known)]
    return rows


def rows_by_name(names: list[str], model: LoadedModel) -> list[int | None] | None:
    """The classifier row of each class name ("n01440764", "tench", "golden retriever", a label of the
    model's `id2label`): the one row that answers to it, else None (unknown, or several rows answer, as
    ImageNet's two "crane"s). None when the model does not name its rows."""
    rows = _row_synonyms(model)
    if rows is None:
        return None
    out = []
    for name in names:
        wanted = normalized(name)
        exact = [row for row, own in enumerate(rows) if wanted in own]
        out.append(exact[0] if len(exact) == 1 else None)
    return out
