"""The numbers of a probe of the bundled fc-digits model, recomputed here without ra-probe's code: the
network written out again (a linear stem, eight blocks h + BN(Linear(ReLU(BN(Linear(h))))), a linear
head) with the shipped weights, each block's Residual Jacobian formed densely by torch.func.jacrev in
float64, and the spectra, RA1–RA4 and NC1–NC4 taken from them with numpy by their definitions:

- spectrum: the top k singular values of each J, averaged over samples;
- RA1: linearity σ₁²/Σσ² of each sample's trajectory h_0..h_8 centred on its mean;
- RA2: a_ij = Σ_k |(U_jᵀ J_i V_j)_kk| / Σ_k σ_{i,k} over the top K, averaged over samples, the score the
  mean over the pairs i ≠ j;
- RA3: the numerical rank #{σ > τσ₁} per sample, its median over samples per site (known below k);
- RA4: σ₁ averaged over samples per site, and L·mean σ₁;
- NC on the head's input with class means μ_c and their unweighted mean μ_G: NC1 = Tr(Σ_W Σ_B⁺)/C,
  NC2 the spread of ‖μ_c − μ_G‖ and the mean |cos + 1/(C−1)|, NC3 the distance of the normalized
  centred head rows to the normalized centred means, NC4 the share of samples whose prediction is not
  their nearest class mean."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.datasets import load_digits
from torch import nn
from torch.func import jacrev, vmap

import ra_probe

K, TAU = 16, 0.01  # the probe's defaults: triplets per site (and RA2's K), the rank threshold
PER_CLASS = 5  # NC needs five samples a class on average: 51 samples, one class with one more (an odd count)
REL = 1e-8  # float64 throughout, on both sides


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.branch = nn.Sequential(nn.Linear(128, 128), nn.BatchNorm1d(128), nn.ReLU(),
                                    nn.Linear(128, 128), nn.BatchNorm1d(128))

    def forward(self, h):
        return h + self.branch(h)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(64, 128)
        self.blocks = nn.Sequential(*(Block() for _ in range(8)))
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def bundled_net() -> Net:
    weights = next(Path(ra_probe.__file__).parent.rglob("fc-digits.safetensors"))
    net = Net().double()
    net.load_state_dict({name: value.double() for name, value in load_file(weights).items()})
    return net.eval()


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """PER_CLASS digits of each class (one more of class 0), pixels / 16 standardized per feature."""
    data = load_digits()
    x = data.data / 16.0
    std = x.std(axis=0)
    x = (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)
    order = np.random.default_rng(1).permutation(len(x))
    chosen = np.concatenate([order[data.target[order] == c][:PER_CLASS + (c == 0)] for c in range(10)])
    return torch.from_numpy(x[chosen]), torch.from_numpy(data.target[chosen])


@pytest.fixture(scope="module")
def measured():
    """The probe's report, and what this file computes on its own: per site the trajectory points, the
    Jacobians' SVDs, and the head's inputs and logits."""
    net, (x, y) = bundled_net(), digits()
    report = ra_probe.probe(net, (x, y), samples=len(x), k=K, tau=TAU, null="none", dtype="float64",
                            device="cpu", resamples=100)
    with torch.no_grad():
        points = [net.stem(x)]
        for block in net.blocks:
            points.append(block(points[-1]))
        logits = net.head(points[-1])
    svds = []
    for block, h in zip(net.blocks, points[:-1]):
        J = vmap(jacrev(lambda v, f=block.branch: f(v[None])[0]))(h).detach().numpy()  # (N, 128, 128)
        U, S, Vt = np.linalg.svd(J)
        svds.append((J, U, S, np.swapaxes(Vt, 1, 2)))
    return {"report": report, "points": np.stack([p.numpy() for p in points], axis=1), "svds": svds,
            "features": points[-1].numpy(), "logits": logits.numpy(), "labels": y.numpy(),
            "head": net.head.weight.detach().numpy()}


def test_the_spectra_are_the_jacobians_singular_values(measured):
    sites = measured["report"]["sites"]
    assert [s["name"] for s in sites] == [f"blocks.{i}" for i in range(8)]
    for site, (_, _, S, _) in zip(sites, measured["svds"]):
        np.testing.assert_allclose(site["singular_values"], S[:, :K].mean(axis=0), rtol=REL, err_msg=site["name"])


def test_ra1_linearity_of_each_trajectory(measured):
    H = measured["points"]  # (N, 9, 128): h_0 … h_8
    centred = H - H.mean(axis=1, keepdims=True)
    s = np.linalg.svd(centred, compute_uv=False)
    linearity = (s[:, 0] ** 2 / (s ** 2).sum(axis=1)).mean()
    assert measured["report"]["metrics"]["ra1"]["mean_linearity"] == pytest.approx(linearity, rel=REL)


def test_ra2_alignment_of_every_pair(measured):
    svds = measured["svds"]
    a = np.eye(8)
    for i, (J_i, _, S_i, _) in enumerate(svds):
        for j, (_, U_j, _, V_j) in enumerate(svds):
            if i != j:
                M = np.swapaxes(U_j[:, :, :K], 1, 2) @ J_i @ V_j[:, :, :K]  # (N, K, K)
                a[i, j] = (np.abs(np.diagonal(M, axis1=1, axis2=2)).sum(axis=1) / S_i[:, :K].sum(axis=1)).mean()
    ra2 = measured["report"]["metrics"]["ra2"]
    np.testing.assert_allclose(ra2["groups"][0]["matrix"], a, rtol=REL)
    assert ra2["mean_score"] == pytest.approx(a[~np.eye(8, dtype=bool)].mean(), rel=REL)


def test_ra3_ranks_and_ra4_depth_scaling(measured):
    metrics = measured["report"]["metrics"]
    medians = []
    for site, (_, _, S, _) in zip(metrics["ra3"]["sites"], measured["svds"]):
        rank = np.minimum((S > TAU * S[:, :1]).sum(axis=1), K)  # only the top k are measured: at most k
        median = float(np.median(rank))  # an odd count of samples: the middle one
        medians.append(median)
        assert site["rank_median"] == (median if median < K else None), site["site"]
        assert site["rank_le_classes"] == (median <= 10), site["site"]
    ordered = sorted(medians)  # the network's median rank: the middle of the sites' (even: the two middle ones)
    assert ordered[4] < K
    assert metrics["ra3"]["median_rank"] == (ordered[3] + ordered[4]) / 2
    assert metrics["ra3"]["share_rank_le_classes"] == pytest.approx(np.mean([m <= 10 for m in medians]))
    sigma1 = [S[:, 0].mean() for _, _, S, _ in measured["svds"]]
    np.testing.assert_allclose([s["sigma1_mean"] for s in metrics["ra4"]["sites"]], sigma1, rtol=REL)
    assert metrics["ra4"]["depth"] == 8
    assert metrics["ra4"]["L_times_mean_sigma1"] == pytest.approx(8 * np.mean(sigma1), rel=REL)


def test_nc_on_the_heads_input(measured):
    H, y, W, logits = measured["features"], measured["labels"], measured["head"], measured["logits"]
    N, C = len(H), 10
    means = np.stack([H[y == c].mean(axis=0) for c in range(C)])
    M = means - means.mean(axis=0)  # centred on the unweighted mean of the class means
    within = H - means[y]
    sigma_w = within.T @ within / N
    sigma_b = M.T @ M / C
    values, vectors = np.linalg.eigh(sigma_b)  # its pseudo-inverse over its C − 1 non-zero directions
    top = vectors[:, -(C - 1):]
    nc1 = np.trace(sigma_w @ top @ np.diag(1 / values[-(C - 1):]) @ top.T) / C
    norms = np.linalg.norm(M, axis=1)
    cosines = (M @ M.T) / np.outer(norms, norms)
    equiangular = np.abs(cosines[~np.eye(C, dtype=bool)] + 1 / (C - 1)).mean()
    W_centred = W - W.mean(axis=0)
    nc3 = ((W_centred / np.linalg.norm(W_centred) - M / np.linalg.norm(M)) ** 2).sum()
    nearest = np.linalg.norm(H[:, None] - means[None], axis=2).argmin(axis=1)
    nc4 = (nearest != logits.argmax(axis=1)).mean()
    nc = measured["report"]["metrics"]["nc"]
    assert nc["classes"] == C and nc["samples"] == N and nc["labels_from"] == "data"
    assert nc["nc1"] == pytest.approx(nc1, rel=1e-6)
    assert nc["nc2_equinorm_means"] == pytest.approx(norms.std() / norms.mean(), rel=REL)
    row_norms = np.linalg.norm(W_centred, axis=1)
    assert nc["nc2_equinorm_weights"] == pytest.approx(row_norms.std() / row_norms.mean(), rel=REL)
    assert nc["nc2_equiangular"] == pytest.approx(equiangular, rel=REL)
    assert nc["nc3"] == pytest.approx(nc3, rel=REL)
    assert nc["nc4"] == pytest.approx(nc4, abs=1e-12)
