"""Text as sample data, through the model's own tokenizer: examples (a line, a sentence) padded to the
longest, or windows of running text of one length (what a causal language model is measured on)."""
from __future__ import annotations

import inspect

import numpy as np
import torch

from ra_probe.errors import UserError
from ra_probe.load.loaded import LoadedModel

WINDOW = 32  # tokens of a window of running text: a sentence or two, as long as a short example


def tokenized(texts: list[str], model: LoadedModel, what: str) -> dict[str, torch.Tensor]:
    """`texts` through the model's tokenizer, padded to the longest and cut at the model's maximum length
    (input_ids, attention_mask…). `what` names the data in errors."""
    tokenizer = _tokenizer(model, what)
    max_length = _max_length(model)
    encoded = dict(tokenizer(texts, padding=True, truncation=max_length is not None, max_length=max_length,
                             return_tensors="pt"))
    if "attention_mask" in encoded:
        encoded.update(decoder_inputs(model, encoded["input_ids"], encoded["attention_mask"]))
    return encoded


def windows(texts: list[str], model: LoadedModel, n: int, seed: int, what: str,
            length: int = WINDOW) -> dict[str, torch.Tensor]:
    """At most `n` windows of `length` tokens (fewer if the model's positions are fewer): the first tokens
    of paragraphs of `texts` drawn under `seed`, one window a paragraph. Headings ("= Title =") and
    paragraphs too short for a window are passed over."""
    tokenizer = _tokenizer(model, what)
    length = min(length, _max_length(model) or length)
    ids = []
    for index in np.random.default_rng(seed).permutation(len(texts)):
        text = texts[index].strip()
        if len(text) < length or text.startswith("="):  # a token is at least a character
            continue
        tokens = tokenizer(text, truncation=True, max_length=length)["input_ids"]
        if len(tokens) == length:
            ids.append(tokens)
            if len(ids) == n:
                break
    if not ids:
        raise UserError(f"data {what} holds no paragraph of {length} tokens or more")
    ids = torch.tensor(ids)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _tokenizer(model: LoadedModel, what: str):
    if model.modality != "text":
        raise UserError(f"data {what} is text, but {model.name} takes {model.modality} inputs")
    if model.preprocessor is None:
        raise UserError(f"{model.name} has no tokenizer to read {what}; use --data synthetic")
    tokenizer = model.preprocessor
    if tokenizer.pad_token is None:  # GPT-2-style tokenizers pad with their end-of-text token
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _max_length(model: LoadedModel) -> int | None:
    """The model's positions, or its tokenizer's maximum; None when neither names one (a tokenizer
    without a maximum says 1e30: T5's relative positions have none)."""
    length = getattr(model.module.config, "max_position_embeddings", None) or model.preprocessor.model_max_length
    return length if length < 2 ** 31 else None


def takes_decoder_inputs(model: LoadedModel) -> bool:
    """Whether the model is an encoder–decoder whose forward takes the decoder's tokens."""
    return bool(getattr(getattr(model.module, "config", None), "is_encoder_decoder", False)) \
        and "decoder_input_ids" in inspect.signature(model.module.forward).parameters


def decoder_inputs(model: LoadedModel, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The decoder's tokens of an encoder–decoder text model (none for others): each sample's real tokens
    shifted right behind the decoder's start token, as BART derives them and as training feeds them, at
    the positions of the real tokens (so that dropping the padding drops the decoder's too). Given to
    every encoder–decoder, also to those that would derive them (BART, mBART), so all read the same."""
    if not takes_decoder_inputs(model):
        return {}
    config = model.module.config
    start = next((t for t in (getattr(config, key, None) for key in ("decoder_start_token_id", "pad_token_id",
                                                                     "bos_token_id")) if t is not None), 0)
    decoder = ids.clone()
    for row, real in zip(decoder, mask.bool()):
        tokens = row[real]
        row[real] = torch.cat([tokens.new_tensor([start]), tokens[:-1]])
    return {"decoder_input_ids": decoder}
