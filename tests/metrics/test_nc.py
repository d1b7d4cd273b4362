"""NC1–NC4 against hand-computed values on constructed feature sets."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ra_probe.metrics.nc import neural_collapse


def simplex_etf(classes: int, dim: int, seed: int = 0) -> torch.Tensor:
    """C unit vectors in R^dim with pairwise cosine −1/(C−1): the centered standard basis, rotated."""
    etf = np.eye(classes) - 1.0 / classes
    etf /= np.linalg.norm(etf, axis=1, keepdims=True)
    rotation, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, classes)))
    return torch.from_numpy(etf @ rotation.T)  # (C, dim)


def test_exact_simplex_etf_is_fully_collapsed():
    C, per_class = 5, 7
    means = 3.0 * simplex_etf(C, 12)
    labels = torch.arange(C).repeat_interleave(per_class)
    features = means[labels]
    nc = neural_collapse(features, labels, weight=means.clone(), predictions=labels)
    assert nc["nc1"] == pytest.approx(0.0, abs=1e-12)
    assert nc["nc2_equinorm_means"] == pytest.approx(0.0, abs=1e-12)
    assert nc["nc2_equinorm_weights"] == pytest.approx(0.0, abs=1e-12)
    assert nc["nc2_equiangular"] == pytest.approx(0.0, abs=1e-12)
    assert nc["nc3"] == pytest.approx(0.0, abs=1e-12)
    assert nc["nc4"] == 0.0


def test_noisy_features_match_hand_computation():
    rng = np.random.default_rng(1)
    C, per_class, d = 3, 20, 4
    labels = np.repeat(np.arange(C), per_class)
    centers = rng.standard_normal((C, d)) * 2
    H = centers[labels] + rng.standard_normal((C * per_class, d))
    W = rng.standard_normal((C, d))
    predictions = (H @ W.T).argmax(1)
    nc = neural_collapse(torch.from_numpy(H), torch.from_numpy(labels), torch.from_numpy(W),
                         torch.from_numpy(predictions))

    mu = np.stack([H[labels == c].mean(0) for c in range(C)])
    mu_g = mu.mean(0)
    sw = sum(np.outer(h - mu[y], h - mu[y]) for h, y in zip(H, labels)) / len(H)
    sb = sum(np.outer(m - mu_g, m - mu_g) for m in mu) / C
    assert nc["nc1"] == pytest.approx(np.trace(sw @ np.linalg.pinv(sb)) / C, rel=1e-9)
    norms = np.linalg.norm(mu - mu_g, axis=1)
    assert nc["nc2_equinorm_means"] == pytest.approx(norms.std() / norms.mean(), rel=1e-9)
    unit = (mu - mu_g) / norms[:, None]
    cos = unit @ unit.T
    off = ~np.eye(C, dtype=bool)
    assert nc["nc2_equiangular"] == pytest.approx(np.abs(cos[off] + 1 / (C - 1)).mean(), rel=1e-9)
    M, Wc = mu - mu_g, W - W.mean(0)  # the classifier's rows centred: a shared shift moves every logit alike
    assert nc["nc3"] == pytest.approx(np.sum((Wc / np.linalg.norm(Wc) - M / np.linalg.norm(M)) ** 2), rel=1e-9)
    w_norms = np.linalg.norm(Wc, axis=1)
    assert nc["nc2_equinorm_weights"] == pytest.approx(w_norms.std() / w_norms.mean(), rel=1e-9)
    ncc = np.linalg.norm(H[:, None] - mu[None], axis=2).argmin(1)
    assert nc["nc4"] == pytest.approx(np.mean(ncc != predictions))
    assert nc["nc1"] > 0.01 and nc["nc2_equiangular"] > 0.01


def test_collapse_degrades_with_noise():
    C, per_class = 4, 30
    means = simplex_etf(C, 8)
    labels = torch.arange(C).repeat_interleave(per_class)
    gen = torch.Generator().manual_seed(0)
    values = []
    for noise in (0.01, 0.1, 0.5):
        features = means[labels] + noise * torch.randn(len(labels), 8, generator=gen, dtype=torch.float64)
        values.append(neural_collapse(features, labels, means, labels)["nc1"])
    assert values[0] < values[1] < values[2]


def test_a_single_class_gives_no_nc_verdict():
    from ra_probe.metrics.results import NCResults
    from ra_probe.metrics.verdict import Thresholds, nc_verdict

    features = torch.randn(6, 4, dtype=torch.float64)
    labels = torch.zeros(6, dtype=torch.long)
    nc = neural_collapse(features, labels, torch.randn(3, 4, dtype=torch.float64), labels)
    verdict = nc_verdict(NCResults(**nc, labels_from="data"), Thresholds())
    assert verdict.status == "undetermined" and "at least 2" in verdict.reason


def test_a_subset_of_the_classifier_rows_is_its_own_simplex():
    """Four classes of a twelve-way head (as ten Imagenette classes of an ImageNet head): the class means
    and those four rows form a simplex of their own, whatever the other rows and a shift shared by all."""
    C, per_class, d, rows = 4, 5, 6, torch.tensor([0, 3, 7, 11])
    means = 2.0 * simplex_etf(C, d)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(12, d, generator=gen, dtype=torch.float64)
    weight[rows] = means
    weight += 5.0 * torch.randn(d, generator=gen, dtype=torch.float64)  # a shift of every row: logits move alike
    labels = rows.repeat_interleave(per_class)
    features = means[torch.arange(C).repeat_interleave(per_class)]
    logits = features @ weight.T
    logits[:, 5] = 1e3  # a class outside the subset wins the full argmax
    nc = neural_collapse(features, labels, weight, logits=logits)
    assert nc["subset"] and nc["classes"] == C and nc["classifier_classes"] == 12
    assert nc["nc1"] == pytest.approx(0.0, abs=1e-12)
    assert nc["nc2_equinorm_weights"] == pytest.approx(0.0, abs=1e-12)
    assert nc["nc3"] == pytest.approx(0.0, abs=1e-12)
    assert nc["nc4"] == 0.0  # the argmax over the four rows, not over all twelve


def test_subset_values_match_hand_computation():
    rng = np.random.default_rng(3)
    C, per_class, d, total = 3, 6, 5, 9
    rows = np.array([1, 4, 8])
    labels = np.repeat(rows, per_class)
    H = rng.standard_normal((C, d))[np.repeat(np.arange(C), per_class)] + 0.5 * rng.standard_normal((C * per_class, d))
    W = rng.standard_normal((total, d))
    logits = H @ W.T
    nc = neural_collapse(torch.from_numpy(H), torch.from_numpy(labels), torch.from_numpy(W),
                         logits=torch.from_numpy(logits))
    mu = np.stack([H[labels == c].mean(0) for c in rows])
    M = mu - mu.mean(0)
    Ws = W[rows] - W[rows].mean(0)
    assert nc["nc3"] == pytest.approx(np.sum((Ws / np.linalg.norm(Ws) - M / np.linalg.norm(M)) ** 2), rel=1e-9)
    predictions = rows[logits[:, rows].argmax(1)]
    ncc = rows[np.linalg.norm(H[:, None] - mu[None], axis=2).argmin(1)]
    assert nc["nc4"] == pytest.approx(np.mean(ncc != predictions))
