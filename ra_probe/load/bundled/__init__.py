"""Small trained models shipped in the package (`bundled/<name>`) and their sample data (`bundled/digits`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class BundledModel:
    name: str
    skip: bool
    weight_decay: float
    description: str

    @property
    def weights(self) -> Path:
        return WEIGHTS_DIR / f"{self.name}.safetensors"


MODELS = {
    m.name: m
    for m in (
        BundledModel("fc-digits", True, 5e-3, "fully-connected ResNet on digits, weight decay 5e-3 (RA expected)"),
        BundledModel("fc-digits-lowwd", True, 5e-4, "the same net with weight decay 5e-4 (no RA expected)"),
        BundledModel("fc-digits-noskip", False, 5e-3, "the same net without skip connections"),
    )
}
DATASETS = {"digits": "the 397 held-out scikit-learn digits, labelled, standardized as in training"}
