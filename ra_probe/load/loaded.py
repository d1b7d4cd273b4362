"""The loaded model: a module ready to probe with what is known of its inputs, whatever source gave it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ra_probe.errors import UserError
from ra_probe.load.reinit import Builder, random_init


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


def at_random_init(loaded: LoadedModel, seed: int) -> None:
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
