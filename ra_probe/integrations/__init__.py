"""Watching RA and NC emerge during training: `Tracker` for a plain loop, and callbacks for PyTorch
Lightning (`ra_probe.integrations.lightning`) and the Hugging Face Trainer
(`ra_probe.integrations.transformers`), imported only when used."""
from ra_probe.integrations.tracker import DEFAULTS, Tracker, scalars

__all__ = ["DEFAULTS", "Tracker", "scalars"]
