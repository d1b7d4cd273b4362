"""Weights files: a state dict read from safetensors or torch files, loaded strictly into a module."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from ra_probe.errors import UserError, first_line

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a torch file (plain, or under "state_dict"/"model")."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or truncated files raise many different types
        raise UserError(f"cannot read weights {path}: {first_line(exc)}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} does not hold a state dict of tensors")
    return state


def load_weights(module: nn.Module, path: str | Path) -> str:
    """Load a state dict strictly; a checkpoint that does not fit is a UserError. Returns its sha256."""
    state = read_state_dict(path)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        own = module.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        misshaped = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
        detail = "; ".join(f"{label} {len(keys)} (e.g. {keys[0]})" for label, keys in
                           (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if keys)
        raise UserError(f"weights {path} do not fit the architecture: {detail or first_line(exc)}") from None
    return sha256_of(Path(path))
