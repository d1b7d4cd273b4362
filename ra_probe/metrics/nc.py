"""Neural Collapse (Papyan, Han & Donoho 2020) on the classifier's input features."""
from __future__ import annotations

import torch


# NC codes in use differ in their conventions; these are the ones followed here, recorded in every report.
CONVENTIONS = {
    "global_mean": "unweighted mean of the class means (each class counts once, whatever its size)",
    "nc1": "Tr(Σ_W Σ_B⁺)/C with Σ_W = (1/N) Σ_i (h_i − μ_y)(h_i − μ_y)ᵀ, Σ_B = (1/C) Σ_c (μ_c − μ_G)(μ_c − μ_G)ᵀ "
           "and ⁺ the Moore–Penrose pseudo-inverse (all C − 1 directions of Σ_B)",
    "nc2": "equinorm: std/mean of the norms, std with 1/n (biased); equiangularity: mean over c ≠ c′ of "
           "|cos(μ_c − μ_G, μ_c′ − μ_G) + 1/(C − 1)|",
    "nc3": "squared Frobenius distance ‖W/‖W‖_F − M̃/‖M̃‖_F‖²_F, rows of W for the classes present",
    "nc4": "share of samples whose prediction differs from the nearest class mean (Euclidean)",
}


def neural_collapse(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None,
                    predictions: torch.Tensor | None) -> dict[str, float | int | None]:
    """NC1–NC4 for features H (N, d), labels (N,), classifier weight W (C_total, d) and the model's
    predictions (N,). Only classes with samples count (C of them), and NC2's angle term needs C ≥ 2.

    NC1 = Tr(Σ_W Σ_B†)/C; NC2: std/mean of ‖μ_c − μ_G‖ (`nc2_equinorm_means`) and of ‖w_c‖
    (`nc2_equinorm_weights`), mean over c ≠ c′ of |cos(μ̃_c, μ̃_c′) + 1/(C−1)| (`nc2_equiangular`);
    NC3 = ‖W/‖W‖_F − M̃ᵀ/‖M̃‖_F‖_F²; NC4 = share of samples whose prediction differs from the
    nearest-class-mean rule."""
    H = features.double()
    classes = torch.unique(labels)
    C = len(classes)
    means = torch.stack([H[labels == c].mean(dim=0) for c in classes])  # (C, d)
    global_mean = means.mean(dim=0)
    centered_means = means - global_mean  # M̃ᵀ (C, d)
    within = H - means[torch.searchsorted(classes, labels)]
    sigma_w = within.T @ within / len(H)
    sigma_b = centered_means.T @ centered_means / C
    nc1 = torch.trace(sigma_w @ torch.linalg.pinv(sigma_b, hermitian=True)).item() / C

    mean_norms = centered_means.norm(dim=1)
    result: dict[str, float | int | None] = {
        "classes": C, "samples": len(H), "nc1": nc1,
        "nc2_equinorm_means": _cv(mean_norms), "nc2_equinorm_weights": None, "nc2_equiangular": None,
        "nc3": None, "nc4": None, "conventions": CONVENTIONS,
    }
    if C >= 2:
        unit = centered_means / mean_norms.clamp_min(1e-300)[:, None]
        cos = unit @ unit.T
        off = ~torch.eye(C, dtype=torch.bool, device=cos.device)
        result["nc2_equiangular"] = (cos[off] + 1.0 / (C - 1)).abs().mean().item()
    if weight is not None:
        W = weight.double()[classes]
        result["nc2_equinorm_weights"] = _cv(W.norm(dim=1))
        result["nc3"] = (W / W.norm() - centered_means / centered_means.norm()).pow(2).sum().item()
    if predictions is not None:
        ncc = classes[torch.cdist(H, means).argmin(dim=1)]
        result["nc4"] = (ncc != predictions).double().mean().item()
    return result


def _cv(values: torch.Tensor) -> float:
    return (values.std(unbiased=False) / values.mean().clamp_min(1e-300)).item()
