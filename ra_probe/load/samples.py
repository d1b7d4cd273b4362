"""The samples a probe runs on: model inputs (a tensor, or a dict of tensors for text) and labels."""
from __future__ import annotations

from dataclasses import dataclass

import torch

Inputs = torch.Tensor | dict[str, torch.Tensor]


@dataclass
class Samples:
    """`inputs` is a tensor (N, *input_shape) or a dict of such tensors (text models); `labels` (N,)
    or None when the data has none."""

    inputs: Inputs
    labels: torch.Tensor | None
    name: str

    def __len__(self) -> int:
        return len(first_tensor(self.inputs))


def first_tensor(inputs: Inputs) -> torch.Tensor:
    return inputs if isinstance(inputs, torch.Tensor) else next(iter(inputs.values()))
