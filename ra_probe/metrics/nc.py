"""Neural Collapse (Papyan, Han & Donoho 2020) on the classifier's input features."""
from __future__ import annotations

from typing import Any

import torch

MIN_PER_CLASS = 2  # a class of one sample has no within-class spread: Σ_W and NC4 would be zero by construction
# Fewer samples per class bias NC toward collapse: a class mean of two or three samples absorbs most of their
# scatter (the bundled digits model: NC1 0.66× its value from every test sample at 2 a class, 0.79× at 3,
# 0.92× at 5), and NC4's nearest mean holds the sample itself. Below this many on average, NC is undetermined.
MIN_MEAN_PER_CLASS = 5

# NC codes in use differ in their conventions; these are the ones followed here, recorded in every report.
CONVENTIONS = {
    "next_tokens": "causal language models: every token with a next token is a sample, the next token its class, the "
                   "LM head (tied embeddings included) the classifier",
    "classes": f"only classes with at least {MIN_PER_CLASS} samples count (their samples alone); with fewer than 2 "
               f"such classes, or fewer than {MIN_MEAN_PER_CLASS} samples a class on average, every NC value is "
               "undetermined (small classes bias every value toward collapse)",
    "global_mean": "unweighted mean of the class means (each class counts once, whatever its size)",
    "nc1": "Tr(Σ_W Σ_B⁺)/C with Σ_W = (1/N) Σ_i (h_i − μ_y)(h_i − μ_y)ᵀ, Σ_B = (1/C) Σ_c (μ_c − μ_G)(μ_c − μ_G)ᵀ "
           "and ⁺ the Moore–Penrose pseudo-inverse (all C − 1 directions of Σ_B)",
    "nc2": "equinorm: std/mean of the norms, std with 1/n (biased); equiangularity: mean over c ≠ c′ of "
           "|cos(μ_c − μ_G, μ_c′ − μ_G) + 1/(C − 1)|",
    "subset": "the classes measured are their own simplex: class means centred on their own mean, and the "
              "classifier's rows for those classes centred on theirs (W̃; a shift shared by every row moves every "
              "logit alike, so it is no part of the classifier), whether they are all of its rows or a few",
    "nc2_weights": "equinorm of the norms of the rows of W̃",
    "nc3": "squared Frobenius distance ‖W̃/‖W̃‖_F − M̃/‖M̃‖_F‖²_F",
    "nc4": "share of samples whose prediction differs from the nearest class mean (Euclidean); the prediction is "
           "the argmax of the logits over the rows of the classes measured (next tokens: over the vocabulary)",
}


def neural_collapse(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None,
                    predictions: torch.Tensor | None = None, logits: torch.Tensor | None = None) -> dict[str, Any]:
    """NC1–NC4 for features H (N, d), labels (N,), classifier weight W (C_total, d) and the model's
    `logits` (N, C_total) or its `predictions` (N,), on the classes with at least two samples (C of them;
    the others are counted in `classes_dropped`); every value None, with `undetermined` saying why, when
    C < 2. The C classes may be a few of the classifier's rows (ten ImageNet classes of a 1000-way
    head): they are measured as their own simplex.

    W̃ = W_C − mean of its rows (W_C: the rows of the C classes). NC1 = Tr(Σ_W Σ_B†)/C; NC2: std/mean
    of ‖μ_c − μ_G‖ (`nc2_equinorm_means`) and of ‖w̃_c‖ (`nc2_equinorm_weights`), mean over c ≠ c′ of
    |cos(μ̃_c, μ̃_c′) + 1/(C−1)| (`nc2_equiangular`); NC3 = ‖W̃/‖W̃‖_F − M̃ᵀ/‖M̃‖_F‖_F²; NC4 = share of
    samples whose prediction (the argmax of `logits` over the C rows, or `predictions` as given)
    differs from the nearest-class-mean rule."""
    present, counts = torch.unique(labels, return_counts=True)
    classes = present[counts >= MIN_PER_CLASS]
    kept = torch.isin(labels, classes)
    C = len(classes)
    result: dict[str, Any] = {
        "classes": C, "samples": int(kept.sum()), "classes_dropped": len(present) - C,
        "samples_dropped": int((~kept).sum()),
        "classifier_classes": None if weight is None else weight.shape[0],
        "subset": weight is not None and C < weight.shape[0], "undetermined": None,
        "nc1": None, "nc2_equinorm_means": None, "nc2_equinorm_weights": None, "nc2_equiangular": None,
        "nc3": None, "nc4": None, "conventions": CONVENTIONS,
    }
    if C < 2:
        result["undetermined"] = (f"NC needs at least {MIN_PER_CLASS} samples in each of at least 2 classes: the "
                                  f"{len(labels)} samples fall in {len(present)} class(es), {C} with {MIN_PER_CLASS} or more")
        return result
    if int(kept.sum()) < MIN_MEAN_PER_CLASS * C:
        result["undetermined"] = (f"NC needs at least {MIN_MEAN_PER_CLASS} samples a class on average: {int(kept.sum())} "
                                  f"samples in {C} classes would bias it toward collapse (measure "
                                  f"{MIN_MEAN_PER_CLASS * C} or more)")
        return result
    H, labels = features.double()[kept], labels[kept]
    if logits is not None:  # the model's choice among the classes measured
        predictions = classes[logits[kept][:, classes].argmax(dim=1)]
    elif predictions is not None:
        predictions = predictions[kept]
    means = torch.stack([H[labels == c].mean(dim=0) for c in classes])  # (C, d)
    centered_means = means - means.mean(dim=0)  # M̃ᵀ (C, d), around the unweighted global mean
    within = H - means[torch.searchsorted(classes, labels)]
    # Σ_B = M̃ᵀM̃/C, so Σ_B⁺ = C·M̃⁺M̃⁺ᵀ and Tr(Σ_W Σ_B⁺)/C = ‖(H − μ_y) M̃⁺‖²_F / N: C × d work, not d × d
    result["nc1"] = (within @ torch.linalg.pinv(centered_means)).pow(2).sum().item() / len(H)
    mean_norms = centered_means.norm(dim=1)
    result["nc2_equinorm_means"] = _cv(mean_norms)
    unit = centered_means / mean_norms.clamp_min(1e-300)[:, None]
    off = ~torch.eye(C, dtype=torch.bool, device=unit.device)
    result["nc2_equiangular"] = ((unit @ unit.T)[off] + 1.0 / (C - 1)).abs().mean().item()
    if weight is not None:
        W = weight.double()[classes]
        W = W - W.mean(dim=0)
        result["nc2_equinorm_weights"] = _cv(W.norm(dim=1))
        result["nc3"] = (W / W.norm() - centered_means / centered_means.norm()).pow(2).sum().item()
    if predictions is not None:
        ncc = classes[torch.cdist(H, means).argmin(dim=1)]
        result["nc4"] = (ncc != predictions).double().mean().item()
    return result


def next_token_samples(features: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A causal language model's tokens as NC samples (Wu & Papyan, 2024): the head's input at every
    position that has a next token (B, T, d) → (B·(T−1), d), that next token as the class, and the
    model's prediction there (the argmax of its logits)."""
    d = features.shape[-1]
    return (features[:, :-1].reshape(-1, d), ids[:, 1:].reshape(-1), logits[:, :-1].argmax(dim=-1).reshape(-1))


def _cv(values: torch.Tensor) -> float:
    return (values.std(unbiased=False) / values.mean().clamp_min(1e-300)).item()
