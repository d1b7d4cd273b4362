"""The samples a probe runs on: model inputs (a tensor, or a dict of tensors for text) and labels, and
how they are cut into the chunks a forward runs on (rows taken, padding dropped, moved to the device)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

Inputs = torch.Tensor | dict[str, torch.Tensor]


@dataclass
class Samples:
    """`inputs` is a tensor (N, *input_shape) or a dict of such tensors (text models); `labels` (N,)
    or None when the data has none. `description` says what they are in words, `reason` why they were
    taken when the user named no data, `source` where a dataset's were read (repository, revision…)."""

    inputs: Inputs
    labels: torch.Tensor | None
    name: str
    description: str | None = None
    reason: str | None = None
    source: dict[str, Any] | None = None

    @property
    def synthetic(self) -> bool:
        """Drawn at random, not data: a smoke test of the model, not a diagnosis."""
        return self.name == "synthetic"

    @property
    def kind(self) -> str:
        """What the samples are to the model: synthetic; held-out (a validation or test split: the
        bundled digits are their test split); training (a train split, where collapse is stronger); or
        given (a file or folder, whose role the probe cannot know)."""
        if self.synthetic:
            return "synthetic"
        split = (self.source or {}).get("split") or ("test" if self.name.startswith("bundled/") else "")
        if split.startswith("train"):
            return "training"
        return "held-out" if split.startswith(("valid", "test", "dev")) else "given"

    def __len__(self) -> int:
        return len(first_tensor(self.inputs))


def first_tensor(inputs: Inputs) -> torch.Tensor:
    return inputs if isinstance(inputs, torch.Tensor) else next(iter(inputs.values()))


def take(inputs: Inputs, index: slice | torch.Tensor) -> Inputs:
    """The same rows of a tensor or of every tensor of a dict."""
    if isinstance(inputs, torch.Tensor):
        return inputs[index]
    return {key: value[index] for key, value in inputs.items()}


def to(inputs: Inputs, device: torch.device, dtype: torch.dtype) -> Inputs:
    """Move to `device`; floating tensors also take `dtype` (token ids stay integers)."""
    def move(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, dtype) if t.is_floating_point() else t.to(device)
    return move(inputs) if isinstance(inputs, torch.Tensor) else {k: move(v) for k, v in inputs.items()}


def real_tokens(inputs: Inputs) -> torch.Tensor | None:
    """Tokens per sample (N,) from a text batch's attention mask; None for other inputs."""
    if isinstance(inputs, dict) and "attention_mask" in inputs:
        return inputs["attention_mask"].bool().sum(dim=1)
    return None


def chunks(inputs: Inputs, batch_size: int) -> list[torch.Tensor]:
    """Sample indices in chunks of at most `batch_size`. Text samples are grouped by their number of
    real tokens, so that every chunk can drop its padding (see `unpadded`): a sentence is then
    measured alone, whatever the other sentences of the data or the tokenizer's padding side."""
    tokens = real_tokens(inputs)
    n = len(first_tensor(inputs))
    if tokens is None:
        groups = [torch.arange(n)]
    else:
        groups = [(tokens == length).nonzero().squeeze(1) for length in tokens.unique()]
    return [group[start:start + batch_size] for group in groups for start in range(0, len(group), batch_size)]


def unpadded(inputs: Inputs) -> Inputs:
    """The real tokens of a text batch whose samples have equal numbers of them: every per-token
    tensor (input ids, mask, token types...) keeps only the attention mask's positions, wherever the
    padding was (left or right). Other inputs are returned as they are."""
    tokens = real_tokens(inputs)
    if tokens is None:
        return inputs
    mask = inputs["attention_mask"].bool()
    length = int(tokens[0])
    if not bool((tokens == length).all()):
        raise ValueError("unpadded() needs samples with equal numbers of real tokens (see chunks())")
    return {key: value[mask].reshape(len(value), length, *value.shape[2:])
            if value.shape[:2] == mask.shape else value for key, value in inputs.items()}


def batch(inputs: Inputs, index: torch.Tensor, device: torch.device, dtype: torch.dtype) -> Inputs:
    """Samples `index` (one of `chunks`) as one model input on `device`: padding dropped, floating
    tensors in `dtype`."""
    return to(unpadded(take(inputs, index)), device, dtype)


def run_model(model: torch.nn.Module, inputs: Inputs) -> Any:
    return model(inputs) if isinstance(inputs, torch.Tensor) else model(**inputs)
