"""Sample data: turn a `--data` reference into model inputs and optional labels.
Validated here, once, at the door: deeper stages trust the shapes."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ra_probe.errors import UserError, first_line
from ra_probe.load.loaded import LoadedModel
from ra_probe.load.samples import Samples, take
from ra_probe.load.text import decoder_inputs, takes_decoder_inputs, tokenized

DATA_FORMS = ("bundled/digits, a .npz file, a .txt file (text models), an image folder, "
              "hf-data/<org>/<name>[:config][@split] (a Hugging Face dataset), or synthetic (a smoke test)")


def load_samples(ref: str | None, model: LoadedModel, *, limit: int | None = None, seed: int = 0) -> Samples:
    """Load `ref` (`bundled/digits`, a `.npz` with `x` and optional `y`, a `.txt` file, an image folder, a
    Hugging Face dataset `hf-data/…`, or `synthetic`) for `model`, at most `limit` samples. Without `ref`,
    the model's default data: its own (bundled models), else real data of its domain (load/defaults.py);
    a model of no known domain is refused, never measured on noise in silence."""
    if ref is None:
        return _default(model, limit, seed)
    if ref == "synthetic":
        samples = _synthetic(model, limit or 64, seed)
    elif ref.startswith("bundled/"):
        samples = _bundled(ref)
    elif ref.startswith("hf-data/"):
        from ra_probe.load.hub_data import load_hub_data

        samples = load_hub_data(ref, model, limit=limit, seed=seed)
    elif ref.endswith(".npz"):
        samples = _npz(Path(ref))
    elif ref.endswith(".txt"):
        samples = _text(Path(ref), model, limit)
    elif Path(ref).is_dir():
        from ra_probe.load.images import load_image_folder

        samples = load_image_folder(Path(ref), model, limit=limit, seed=seed)
    else:
        raise UserError(f"unknown data {ref!r}: expected {DATA_FORMS}")
    return _checked(samples, ref, model, limit)


def _default(model: LoadedModel, limit: int | None, seed: int) -> Samples:
    from ra_probe.load.defaults import default_data, domain_unknown
    from ra_probe.load.hub_data import load_hub_data

    if model.default_data is not None:  # a bundled model's own data
        samples = load_samples(model.default_data, model, limit=limit, seed=seed)
        return replace(samples, reason="the data the bundled model was trained on (its held-out split)")
    default = default_data(model)
    if default is None:
        raise UserError(f"no default data: {domain_unknown(model)}; pass --data: {DATA_FORMS}")
    try:
        samples = load_hub_data(default.ref, model, limit=limit, seed=seed, revision=default.revision,
                                labels_required=default.labels_required, windows_of_text=default.windows_of_text)
    except UserError as exc:
        raise UserError(f"{exc} ({model.name}'s default data: {default.why}); pass --data: {DATA_FORMS}") from None
    return _checked(replace(samples, reason=default.why), default.ref, model, limit)


def _checked(samples: Samples, ref: str, model: LoadedModel, limit: int | None) -> Samples:
    """At most `limit` samples, none of them empty or of the wrong shape."""
    if limit is not None:
        samples = replace(samples, inputs=take(samples.inputs, slice(0, limit)),
                          labels=None if samples.labels is None else samples.labels[:limit])
    if len(samples) == 0:
        raise UserError(f"data {ref!r} holds no samples")
    _check_shape(samples, model)
    return samples


def _synthetic(model: LoadedModel, n: int, seed: int) -> Samples:
    generator = torch.Generator().manual_seed(seed)
    if model.modality == "text":
        ids = _tokens(model, n, "max_position_embeddings", generator)
        mask = torch.ones_like(ids)
        return Samples({"input_ids": ids, "attention_mask": mask, **decoder_inputs(model, ids, mask)}, None,
                       "synthetic", f"{n} sequences of {ids.shape[1]} random token ids")
    if model.input_shape is None:
        raise UserError(f"synthetic data needs the model's input shape: pass --input-shape for {model.name}")
    x = torch.randn(n, *model.input_shape, generator=generator)
    if model.modality == "audio":  # log-mel features or a waveform, and the tokens its decoder reads (Whisper's)
        decoder = takes_decoder_inputs(model)
        return Samples({model.module.main_input_name: x,
                        **({"decoder_input_ids": _tokens(model, n, "max_target_positions", generator)}
                           if decoder else {})}, None, "synthetic",
                       f"{n} Gaussian {'log-mel inputs' if model.module.main_input_name == 'input_features' else 'waveforms'}")
    return Samples(x, None, "synthetic", f"{n} Gaussian inputs of shape {tuple(model.input_shape)}")


def _tokens(model: LoadedModel, n: int, positions: str, generator: torch.Generator) -> torch.Tensor:
    """Random token ids, at most 16 per sample and no more than the config's `positions`."""
    vocab = getattr(model.module.config, "vocab_size", 1000)
    length = min(16, getattr(model.module.config, positions, None) or 16)
    return torch.randint(0, vocab, (n, length), generator=generator)


def _bundled(ref: str) -> Samples:
    from ra_probe.load.bundled import DATASETS
    from ra_probe.load.bundled.digits import load_split

    name = ref.removeprefix("bundled/")
    if name not in DATASETS:
        raise UserError(f"unknown bundled data {name!r}; bundled data: {', '.join(DATASETS)}")
    _, _, x_test, y_test = load_split()
    return Samples(torch.from_numpy(x_test), torch.from_numpy(y_test), ref,
                   "held-out scikit-learn digits, labelled, standardized as in training")


def _npz(path: Path) -> Samples:
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except Exception as exc:
        raise UserError(f"cannot read {path} as .npz: {first_line(exc)}") from None
    if "x" not in arrays:
        raise UserError(f"{path} has no array named 'x' (found: {', '.join(arrays) or 'none'})")
    x, y = arrays["x"], arrays.get("y")
    if x.dtype.kind not in "fiub":
        raise UserError(f"{path}: 'x' must be numeric, got dtype {x.dtype}")
    if y is not None and (y.ndim != 1 or len(y) != len(x) or y.dtype.kind not in "iu"):
        raise UserError(f"{path}: 'y' must be integer labels of shape ({len(x)},), got {y.dtype} {y.shape}")
    labels = None if y is None else torch.from_numpy(y.astype(np.int64))
    return Samples(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), labels, str(path))


def _text(path: Path, model: LoadedModel, limit: int | None) -> Samples:
    """One example per non-empty line, through the model's tokenizer, padded to the longest line and
    cut at the model's maximum length (inputs: input_ids, attention_mask...)."""
    if model.modality != "text":
        raise UserError(f"data {path} is text, but {model.name} takes {model.modality} inputs")
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path} as UTF-8 text: {exc}") from None
    return Samples(tokenized(lines[:limit], model, str(path)), None, str(path))


def check_labels(samples: Samples, classes: int | None) -> None:
    """Labels must name rows of the classifier: integers in [0, classes). Checked before any
    measurement, so a bad label costs nothing and writes nothing."""
    if samples.labels is None:
        return
    labels = samples.labels
    bad = labels[(labels < 0) | (labels >= classes)] if classes is not None else labels[labels < 0]
    if len(bad):
        values = ", ".join(str(v) for v in sorted(set(bad.tolist()))[:5])
        rows = f"[0, {classes})" if classes is not None else "≥ 0"
        raise UserError(f"data {samples.name!r} has labels outside the classifier's rows {rows}: {values} "
                        f"({len(bad)} of {len(labels)} samples)")


def _check_shape(samples: Samples, model: LoadedModel) -> None:
    if not isinstance(samples.inputs, torch.Tensor) or model.input_shape is None:
        return
    shape = tuple(samples.inputs.shape[1:])
    if shape != tuple(model.input_shape):
        raise UserError(f"data {samples.name!r} has samples of shape {shape}, but {model.name} takes "
                        f"{tuple(model.input_shape)}")
    if not torch.isfinite(samples.inputs).all():
        raise UserError(f"data {samples.name!r} holds NaN or Inf values")
