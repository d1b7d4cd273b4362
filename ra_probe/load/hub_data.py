"""Hugging Face datasets as sample data: `hf-data/<org>/<name>[:config][@split]`. One shard of the Hub's
parquet conversion of the dataset (branch refs/convert/parquet, `<config>/<split>/0000.parquet`) is
downloaded into the Hub's own cache (so it is read offline once cached), never the whole set; of it only
the label column is read, then the rows of a seeded, class-balanced subset. Images go through the model's
own preprocessing, text through its tokenizer; class names are mapped onto the classifier's rows."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ra_probe.errors import UserError, first_line
from ra_probe.load.classes import rows_by_name
from ra_probe.load.loaded import LoadedModel
from ra_probe.load.offline import hub_offline_if_unreachable
from ra_probe.load.samples import Samples

PREFIX = "hf-data/"
PARQUET_BRANCH = "refs/convert/parquet"
SPLITS = ("validation", "test", "train")  # tried in this order when the reference names none
TEXT_COLUMNS = ("text", "sentence", "content")  # preferred, in this order, among a dataset's text columns
LABEL_COLUMNS = ("label", "labels", "fine_label")


@dataclass(frozen=True)
class HubData:
    """A dataset reference: `hf-data/<repo>[:config][@split]`."""

    repo: str
    config: str | None
    split: str | None

    @classmethod
    def parse(cls, ref: str) -> HubData:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        rest, _, split = ref.removeprefix(PREFIX).partition("@")
        repo, _, config = rest.partition(":")
        try:
            validate_repo_id(repo)
        except HFValidationError:
            raise UserError(f"data {ref!r}: expected hf-data/<org>/<name>[:config][@split]") from None
        return cls(repo, config or None, split or None)


@dataclass(frozen=True)
class Shard:
    """One parquet file of a dataset's conversion, in the local cache."""

    data: HubData
    config: str
    split: str
    path: Path
    revision: str  # the commit of the conversion it was read at

    def describe(self) -> str:
        return f"{self.data.repo} {self.config} {self.split}"


def load_hub_data(ref: str, model: LoadedModel, *, limit: int | None, seed: int, revision: str | None = None,
                  labels_required: bool = True, windows_of_text: bool = False) -> Samples:
    """Samples of the dataset `ref` for `model`: at most `limit` (all the shard's rows without), drawn
    under `seed`, as many of each class as can be. `revision` pins the conversion's commit.
    `labels_required`: a classifier whose rows the dataset's class names cannot be mapped onto is refused
    (else the samples are unlabelled, and their description says why). `windows_of_text`: running text
    cut into windows of equal length (language models) instead of one example a row."""
    import pyarrow.parquet as pq

    shard = _shard(HubData.parse(ref), revision)
    try:
        parquet = pq.ParquetFile(shard.path)
    except Exception as exc:  # a truncated or foreign file raises many types
        raise UserError(f"cannot read {shard.path} as parquet: {first_line(exc)}") from None
    features = _features(parquet)
    column, kind = _input_column(parquet, features, model, ref)
    label_column = _label_column(features)
    n = limit or parquet.metadata.num_rows
    source = {"dataset": shard.data.repo, "config": shard.config, "split": shard.split, "revision": shard.revision,
              "file": f"{shard.config}/{shard.split}/{shard.path.name}", "column": column, "label_column": None}
    if windows_of_text:
        from ra_probe.load.text import windows

        texts = parquet.read(columns=[column]).column(0).to_pylist()
        inputs = windows([t for t in texts if t], model, n, seed, shard.describe())
        count = len(inputs["input_ids"])
        return Samples(inputs, None, ref, f"{shard.describe()}, {count} windows of {inputs['input_ids'].shape[1]} "
                                          "tokens of running text", source=source)
    rows, note, ids = None, None, None
    if label_column is not None:
        rows, note = _label_rows(features[label_column]["names"], model, ref, labels_required)
    if rows is not None:  # -1: no label (a test split's hidden ones)
        ids = parquet.read(columns=[label_column]).column(0).fill_null(-1).to_numpy(zero_copy_only=False)
        if not (ids >= 0).any():
            rows, note = None, f"its {label_column} column is empty (-1): the split's labels are hidden"
    if rows is not None:
        chosen = _balanced(ids, n, seed)
        labels = torch.tensor([rows[i] for i in ids[chosen]])
        source["label_column"] = label_column
    else:
        chosen = np.random.default_rng(seed).permutation(parquet.metadata.num_rows)[:n]
        labels = None
    values = _rows(parquet, column, chosen)
    if kind == "image":
        from ra_probe.load.images import encoded_image, preprocess

        inputs = preprocess([encoded_image(_image_bytes(v, shard.path), f"image {i} of {ref}")
                             for i, v in zip(chosen, values)], model)
        what = "images"
    else:
        from ra_probe.load.text import tokenized

        inputs = tokenized([str(v) for v in values], model, ref)
        what = "texts"
    description = f"{shard.describe()}, {len(values)} {what}"
    if labels is not None:
        description += f" in {len(set(labels.tolist()))} classes"
    if note:
        description += f" ({note})"
    return Samples(inputs, labels, ref, description, source=source)


def _shard(data: HubData, revision: str | None) -> Shard:
    """The first parquet shard of the reference's config and split, downloaded into (or found in) the
    Hub's cache. Without a config, "default"; without a split, the first of SPLITS the dataset has."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import (  # where huggingface-hub 0.24 has them too
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = hub_offline_if_unreachable()
    config = data.config or "default"
    where = f"{PREFIX}{data.repo}"
    uncached = []
    for split in (data.split,) if data.split else SPLITS:
        try:
            path = Path(hf_hub_download(data.repo, f"{config}/{split}/0000.parquet", repo_type="dataset",
                                        revision=revision or PARQUET_BRANCH, local_files_only=offline))
        except LocalEntryNotFoundError:  # offline, or the Hub did not answer, and not in the cache
            uncached.append(split)
            continue
        except EntryNotFoundError:
            continue
        except RepositoryNotFoundError:
            raise UserError(f"no dataset {data.repo} on the Hugging Face Hub (or it is private or gated: log in with "
                            "`hf auth login`)") from None
        except RevisionNotFoundError:
            raise UserError(f"{where} has no parquet conversion on the Hub ({revision or PARQUET_BRANCH})") from None
        except Exception as exc:  # network and HTTP errors of many types
            raise UserError(f"cannot download {where}: {first_line(exc)}") from None
        return Shard(data, config, split, path, path.parents[2].name)  # snapshots/<commit>/<config>/<split>/
    if uncached:
        raise UserError(f"{where} ({config}, {'/'.join(uncached)}) is not in the local cache and the Hugging Face "
                        "Hub cannot be reached")
    tried = f"split {data.split}" if data.split else f"a split {', '.join(SPLITS)}"
    hint = "" if data.config else "; name its config as hf-data/<org>/<name>:<config>"
    raise UserError(f"{where} has no {tried} in config {config!r} of its parquet conversion{hint}")


def _features(parquet) -> dict[str, dict[str, Any]]:
    """The dataset's features (ClassLabel names, Image columns…) from the parquet schema's "huggingface"
    metadata, as `datasets` writes it; {} when the file has none."""
    metadata = parquet.schema_arrow.metadata or {}
    try:
        info = json.loads(metadata.get(b"huggingface", b"{}"))
    except ValueError:
        return {}
    features = info.get("info", {}).get("features") or info.get("features") or {}
    return features if isinstance(features, dict) else {}


def _input_column(parquet, features: dict[str, dict], model: LoadedModel, ref: str) -> tuple[str, str]:
    """The column the model reads and its kind: an image column (`{bytes, path}`) for an image model, a
    text column for a text model."""
    import pyarrow as pa

    schema = parquet.schema_arrow
    takes_images = model.modality == "image" or len(model.input_shape or ()) == 3  # a factory's (C, H, W)
    if takes_images:
        images = [name for name in schema.names if features.get(name, {}).get("_type") == "Image"
                  or (pa.types.is_struct(schema.field(name).type) and schema.field(name).type.get_field_index("bytes") >= 0)]
        if images:
            return images[0], "image"
    elif model.modality == "text":
        texts = [name for name in schema.names if pa.types.is_string(schema.field(name).type)
                 or pa.types.is_large_string(schema.field(name).type)]
        texts.sort(key=lambda name: TEXT_COLUMNS.index(name) if name in TEXT_COLUMNS else len(TEXT_COLUMNS))
        if texts:
            return texts[0], "text"
    if not takes_images and model.modality != "text":
        raise UserError(f"{model.name} takes {model.modality} inputs; datasets give it images or text")
    raise UserError(f"data {ref!r} has no {'image' if takes_images else 'text'} column for {model.name} (columns: "
                    f"{', '.join(schema.names)})")


def _label_column(features: dict[str, dict]) -> str | None:
    """The ClassLabel column: "label", "labels" or "fine_label" when there are several, else the only one."""
    labels = [name for name, feature in features.items() if feature.get("_type") == "ClassLabel"
              and isinstance(feature.get("names"), list)]
    preferred = [name for name in LABEL_COLUMNS if name in labels]
    return (preferred or labels or [None])[0]


def _label_rows(names: list[str], model: LoadedModel, ref: str, required: bool) -> tuple[list[int] | None, str | None]:
    """The classifier row of each of the dataset's class ids, by name; or None and why, where the
    samples are to be unlabelled: the model has no classifier, or (`required` false) its rows cannot be
    told. With `required`, rows that cannot be told are refused."""
    classes = model.num_classes
    if not classes:
        return None, "its labels unused: the model has no classifier head"
    found = rows_by_name(names, model)
    if found is not None and None not in found:
        return found, None
    if found is None and len(names) == classes:
        # the classifier does not name its rows: a model fine-tuned on this dataset has its class ids as rows
        return (list(range(classes)), f"labels as rows in the dataset's order: {model.name} does not name its "
                                      "classes") if required else (None, "its labels unused: the classifier does "
                                                                         "not name its classes")
    unknown = [name for name, row in zip(names, found or [None] * len(names)) if row is None]
    why = (f"{len(unknown)} of its {len(names)} class names ({', '.join(unknown[:3])}{'…' if len(unknown) > 3 else ''}) "
           f"are not rows of {model.name}'s {classes}-class classifier")
    if required:
        raise UserError(f"data {ref!r}: {why}")
    return None, f"its labels unused: {why}"


def _balanced(ids: np.ndarray, n: int, seed: int) -> np.ndarray:
    """`n` labelled row indices, as many of each class as can be: each class's rows shuffled under `seed`, then
    taken one class after another (classes in a seeded order), so any first rows are balanced too."""
    rng = np.random.default_rng(seed)
    classes = rng.permutation(np.unique(ids[ids >= 0]))  # unlabelled rows (-1) are not taken
    queues = [rng.permutation(np.flatnonzero(ids == c)) for c in classes]
    order = [queue[i] for i in range(max(map(len, queues))) for queue in queues if i < len(queue)]
    return np.array(order[:n], dtype=np.int64)


def _rows(parquet, column: str, rows: np.ndarray) -> list:
    """The values of `column` at `rows` (in that order), reading only the row groups that hold them."""
    sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
    group_of = np.searchsorted(np.cumsum(sizes), rows, side="right")
    groups = sorted(set(group_of.tolist()))
    # where each group's rows start, in the file and in the table of the groups read
    in_file = np.concatenate([[0], np.cumsum(sizes)])
    in_table = dict(zip(groups, np.concatenate([[0], np.cumsum([sizes[g] for g in groups])])))
    local = [int(in_table[g] + row - in_file[g]) for row, g in zip(rows.tolist(), group_of.tolist())]
    return parquet.read_row_groups(groups, columns=[column]).column(0).take(local).to_pylist()


def _image_bytes(value: Any, path: Path) -> bytes:
    if isinstance(value, dict) and value.get("bytes"):
        return value["bytes"]
    raise UserError(f"{path}: an image without its bytes (a path alone, {value.get('path') if isinstance(value, dict) else value!r}, "
                    "cannot be read from the Hub's parquet files)")
