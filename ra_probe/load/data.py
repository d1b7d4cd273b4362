"""Sample data: turn a `--data` reference into model inputs and optional labels.
Validated here, once, at the door: deeper stages trust the shapes."""
from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import torch

from ra_probe.errors import UserError, first_line
from ra_probe.load.models import LoadedModel
from ra_probe.load.samples import Samples, take


def load_samples(ref: str | None, model: LoadedModel, *, limit: int | None = None, seed: int = 0) -> Samples:
    """Load `ref` (`bundled/digits`, a `.npz` with `x` and optional `y`, an image folder, or `synthetic`)
    for `model`, at most `limit` samples."""
    ref = ref or model.default_data or "synthetic"
    if ref == "synthetic":
        samples = _synthetic(model, limit or 64, seed)
    elif ref.startswith("bundled/"):
        samples = _bundled(ref)
    elif ref.endswith(".npz"):
        samples = _npz(Path(ref))
    elif ref.endswith(".txt"):
        samples = _text(Path(ref), model, limit)
    elif Path(ref).is_dir():
        from ra_probe.load.images import load_image_folder

        samples = load_image_folder(Path(ref), model, limit=limit, seed=seed)
    else:
        raise UserError(f"unknown data {ref!r}: expected bundled/digits, a .npz file, a .txt file (text models), "
                        "an image folder, or synthetic")
    if limit is not None:
        samples = Samples(take(samples.inputs, slice(0, limit)),
                          None if samples.labels is None else samples.labels[:limit], samples.name)
    if len(samples) == 0:
        raise UserError(f"data {ref!r} holds no samples")
    _check_shape(samples, model)
    return samples


def _synthetic(model: LoadedModel, n: int, seed: int) -> Samples:
    generator = torch.Generator().manual_seed(seed)
    if model.modality == "text":
        ids = _tokens(model, n, "max_position_embeddings", generator)
        mask = torch.ones_like(ids)
        return Samples({"input_ids": ids, "attention_mask": mask, **_decoder_inputs(model, ids, mask)}, None,
                       "synthetic")
    if model.input_shape is None:
        raise UserError(f"synthetic data needs the model's input shape: pass --input-shape for {model.name}")
    x = torch.randn(n, *model.input_shape, generator=generator)
    if model.modality == "audio":  # log-mel features or a waveform, and the tokens its decoder reads (Whisper's)
        decoder = _takes_decoder_inputs(model)
        return Samples({model.module.main_input_name: x,
                        **({"decoder_input_ids": _tokens(model, n, "max_target_positions", generator)}
                           if decoder else {})}, None, "synthetic")
    return Samples(x, None, "synthetic")


def _takes_decoder_inputs(model: LoadedModel) -> bool:
    """Whether the model is an encoder–decoder whose forward takes the decoder's tokens."""
    return bool(getattr(getattr(model.module, "config", None), "is_encoder_decoder", False)) \
        and "decoder_input_ids" in inspect.signature(model.module.forward).parameters


def _decoder_inputs(model: LoadedModel, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The decoder's tokens of an encoder–decoder text model (none for others): each sample's real tokens
    shifted right behind the decoder's start token, as BART derives them and as training feeds them, at
    the positions of the real tokens (so that dropping the padding drops the decoder's too). Given to
    every encoder–decoder, also to those that would derive them (BART, mBART), so all read the same."""
    if not _takes_decoder_inputs(model):
        return {}
    config = model.module.config
    start = next((t for t in (getattr(config, key, None) for key in ("decoder_start_token_id", "pad_token_id",
                                                                     "bos_token_id")) if t is not None), 0)
    decoder = ids.clone()
    for row, real in zip(decoder, mask.bool()):
        tokens = row[real]
        row[real] = torch.cat([tokens.new_tensor([start]), tokens[:-1]])
    return {"decoder_input_ids": decoder}


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
    return Samples(torch.from_numpy(x_test), torch.from_numpy(y_test), ref)


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
    if model.preprocessor is None:
        raise UserError(f"{model.name} has no tokenizer to read {path}; use --data synthetic")
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path} as UTF-8 text: {exc}") from None
    tokenizer = model.preprocessor
    if tokenizer.pad_token is None:  # GPT-2-style tokenizers pad with their end-of-text token
        tokenizer.pad_token = tokenizer.eos_token
    max_length = getattr(model.module.config, "max_position_embeddings", None) or tokenizer.model_max_length
    if not max_length < 2 ** 31:  # a tokenizer that names no maximum says 1e30 (T5's relative positions have none)
        max_length = None
    encoded = dict(tokenizer(lines[:limit], padding=True, truncation=max_length is not None, max_length=max_length,
                             return_tensors="pt"))
    if "attention_mask" in encoded:
        encoded.update(_decoder_inputs(model, encoded["input_ids"], encoded["attention_mask"]))
    return Samples(encoded, None, str(path))


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
