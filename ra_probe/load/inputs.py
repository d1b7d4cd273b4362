"""What the library takes as a model and as data, turned into what a probe runs on: a model reference,
an `nn.Module` or a loaded model into a `LoadedModel`; a tensor, an (x, y) pair, a dict of tensors, a
DataLoader or a data reference into `Samples`."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ra_probe.errors import UserError
from ra_probe.load.data import load_samples
from ra_probe.load.loaded import LoadedModel
from ra_probe.load.models import load_model
from ra_probe.load.preprocessing import module_loaded
from ra_probe.load.samples import Samples, first_tensor, take
from ra_probe.load.sources import LoadingOptions

Model = nn.Module | str | LoadedModel


def as_loaded(model: Model, seed: int = 0, **loading: Any) -> LoadedModel:
    """A model reference (what the CLI takes), an `nn.Module` or an already loaded model, loaded (what
    is initialized at random, under `seed`). `loading`: fields of `LoadingOptions` (pretrained, weights,
    arch, input_shape, device_map; the caller has checked them)."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, str):
        return load_model(model, LoadingOptions(**loading, seed=seed))
    if isinstance(model, nn.Module):
        return module_loaded(model, type(model).__name__, "module", loading.get("input_shape"))
    raise UserError(f"model must be an nn.Module or a model reference string, got {type(model).__name__}")


def as_samples(data: Any, loaded: LoadedModel, *, limit: int, seed: int = 0) -> Samples:
    """Samples from a tensor (N, …), an (x, y) pair, a dict of tensors (a tokenizer's output; "labels"
    taken as labels), a DataLoader or any iterable of such batches, a `--data` reference string, or None
    (the model's own data); at most `limit` samples, `seed` drawing those a reference draws."""
    if isinstance(data, Samples):
        return data
    if data is None or isinstance(data, (str, Path)):
        return load_samples(None if data is None else str(data), loaded, limit=limit, seed=seed)
    if isinstance(data, Mapping):
        return _checked(*_inputs_and_labels(data), limit)
    if isinstance(data, torch.Tensor) or (isinstance(data, (tuple, list)) and len(data) == 2
                                          and isinstance(data[0], torch.Tensor)):
        x, y = (data, None) if isinstance(data, torch.Tensor) else data
        return _checked(x, y, limit)
    if isinstance(data, Iterable):
        xs, ys = [], []
        for batch in data:
            if isinstance(batch, Mapping):
                x, y = _inputs_and_labels(batch)
            else:
                x, y = (batch, None) if isinstance(batch, torch.Tensor) else (batch[0], batch[1])
            xs.append(x)
            ys.append(y)
            if sum(len(first_tensor(t)) for t in xs) >= limit:
                break
        if not xs:
            raise UserError("data holds no batches")
        labels = None if any(y is None for y in ys) else torch.cat([torch.as_tensor(y) for y in ys])
        return _checked(_joined(xs), labels, limit)
    raise UserError(f"data must be a tensor, an (x, y) pair, a dict of tensors, a DataLoader or a data reference, "
                    f"got {type(data).__name__}")


def _inputs_and_labels(batch: Mapping) -> tuple[dict[str, torch.Tensor], Any]:
    """A dict batch as model inputs (keyword arguments) and its "labels", if any."""
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    bad = [key for key, value in inputs.items() if not isinstance(value, torch.Tensor) or value.ndim == 0]
    if bad or not inputs:
        raise UserError("a dict of data must map input names to batched tensors"
                        + (f"; not so: {', '.join(bad)}" if bad else "; it is empty"))
    if len({len(value) for value in inputs.values()}) != 1:
        raise UserError(f"the tensors of a dict of data must have the same number of samples, got "
                        f"{ {key: len(value) for key, value in inputs.items()} }")
    return inputs, batch.get("labels")


def _joined(xs: list) -> Any:
    """Batches joined along the samples. Token batches padded to different lengths are padded on the
    right to the longest, with a zero attention mask there (the probe drops padding anyway)."""
    if not isinstance(xs[0], dict):
        return torch.cat(xs)
    if any(x.keys() != xs[0].keys() for x in xs):
        raise UserError("the dict batches of data must all have the same keys")
    longest = max(x["attention_mask"].shape[1] for x in xs) if "attention_mask" in xs[0] else None

    def padded(x: dict[str, torch.Tensor], key: str) -> torch.Tensor:
        value = x[key]
        if longest is None or value.shape[:2] != x["attention_mask"].shape or value.shape[1] == longest:
            return value
        return torch.nn.functional.pad(value, [0, 0] * (value.ndim - 2) + [0, longest - value.shape[1]])
    try:
        return {key: torch.cat([padded(x, key) for x in xs]) for key in xs[0]}
    except RuntimeError as exc:
        raise UserError(f"cannot join the dict batches of data: {str(exc).splitlines()[0]}") from None


def _checked(x: Any, y: Any, limit: int) -> Samples:
    x = take(x, slice(limit))
    n = len(first_tensor(x))
    labels = None if y is None else torch.as_tensor(y)[:limit].long()
    if n == 0:
        raise UserError("data holds no samples")
    if labels is not None and labels.shape != (n,):
        raise UserError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    inputs = x.detach().cpu() if isinstance(x, torch.Tensor) else {k: v.detach().cpu() for k, v in x.items()}
    return Samples(inputs, labels, "tensor")
