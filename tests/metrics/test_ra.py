"""RA1 and RA2 on constructed trajectories and operators whose values are known by hand."""
import math

import pytest
import torch

from ra_probe.metrics.ra import (
    alignment_pairs,
    alignment_score,
    heatmap_pairs,
    pair_mean,
    partners_per_site,
    trajectory_projection,
    trajectory_stats,
)


def _embed(points_2d: torch.Tensor, d: int, seed: int = 0) -> torch.Tensor:
    """(P, m+1, 2) points placed in a random 2-plane of R^d, plus an offset."""
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, 2, generator=gen, dtype=torch.float64))
    return points_2d @ basis.T + torch.randn(d, generator=gen, dtype=torch.float64)


def test_planar_trajectories_keep_their_geometry():
    # two trajectories in a plane of R^300: the projection is an isometry of the plane (up to rotation/sign)
    t = torch.arange(6, dtype=torch.float64)
    planar = torch.stack([torch.stack([t, t ** 1.5 / 3], 1), torch.stack([-t, 0.5 * t], 1)])  # (2, 6, 2)
    points, share = trajectory_projection(_embed(planar, 300))
    assert points.shape == (2, 6, 2)
    torch.testing.assert_close(torch.cdist(points.flatten(0, 1), points.flatten(0, 1)),
                               torch.cdist(planar.flatten(0, 1), planar.flatten(0, 1)))
    torch.testing.assert_close(share.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert share[0] >= share[1] > 0


def test_equispaced_line_is_one_component():
    step = torch.zeros(1, 1, 2, dtype=torch.float64)
    step[..., 0] = 2.0
    line = torch.arange(9, dtype=torch.float64)[None, :, None] * step  # (1, 9, 2) along x
    points, share = trajectory_projection(_embed(line, 50, seed=3))
    torch.testing.assert_close(share, torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(points[0, 1:, 0] - points[0, :-1, 0], torch.full((8,), 2.0, dtype=torch.float64))  # advancing along +PC1
    torch.testing.assert_close(points[..., 1], torch.zeros(1, 9, dtype=torch.float64), atol=1e-6, rtol=0)


def test_straight_equispaced_line_by_hand():
    H = (torch.arange(5.0)[:, None] * torch.tensor([1.0, 2.0, -1.0]))[None]  # (1, 5, 3)
    stats = trajectory_stats(H)
    assert stats["linearity"].item() == pytest.approx(1.0, abs=1e-12)
    assert stats["lss"].item() == pytest.approx(1.0, abs=1e-12)
    assert stats["step_cv"].item() == pytest.approx(0.0, abs=1e-12)
    assert stats["step_cos"].item() == pytest.approx(1.0, abs=1e-12)


def test_right_angle_zigzag_by_hand():
    H = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [2.0, 1.0], [2.0, 2.0]]], dtype=torch.float64)
    stats = trajectory_stats(H)  # unit steps e1, e2, e1, e2: m = 4 over ‖(2, 2)‖ = 2√2
    assert stats["lss"].item() == pytest.approx(math.sqrt(2), abs=1e-12)
    assert stats["step_cos"].item() == pytest.approx(0.0, abs=1e-12)
    assert stats["step_cv"].item() == pytest.approx(0.0, abs=1e-12)
    # centered points (−1.2, −0.8) … : the best line holds σ₁²/Σσ² of the variance, here < 1
    centered = H[0] - H[0].mean(dim=0)
    s = torch.linalg.svdvals(centered)
    expected = (s[0] ** 2 / (s ** 2).sum()).item()
    assert stats["linearity"].item() == pytest.approx(expected, abs=1e-12) and expected < 1


def test_trajectories_are_measured_chunk_by_chunk_without_a_float64_copy_of_them(monkeypatch):
    """A group's trajectories at high resolution are large (65 points of 1.56M coordinates: 0.4 GB in
    float32): RA1 never makes a float64 copy of them (it took 3.9 GB more), only chunks of coordinates
    and Gram matrices, and measures the same as the direct formulas (SVD of the centered points, unit
    steps summed)."""
    from torch.overrides import TorchFunctionMode

    from ra_probe.metrics import ra

    monkeypatch.setattr(ra, "GRAM_CHUNK_ELEMENTS", 3 * 7 * 100)  # chunks of 100 coordinates
    H = torch.randn(3, 7, 1000, generator=torch.Generator().manual_seed(0)).cumsum(dim=1)
    largest = []

    class Float64Sizes(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dtype == torch.float64:
                largest.append(out.numel())
            return out
    with Float64Sizes():
        stats = trajectory_stats(H)
        trajectory_projection(H)
    assert max(largest) <= 3 * 7 * 100 < H.numel()
    D = H.double()
    steps = D[:, 1:] - D[:, :-1]
    s = torch.linalg.svdvals(D - D.mean(dim=1, keepdim=True))
    unit = steps / steps.norm(dim=2, keepdim=True)
    torch.testing.assert_close(stats["linearity"], s[:, 0] ** 2 / (s ** 2).sum(dim=1))
    torch.testing.assert_close(stats["lss"], 6 / unit.sum(dim=1).norm(dim=1))
    torch.testing.assert_close(stats["step_cos"], (unit[:, 1:] * unit[:, :-1]).sum(dim=2).mean(dim=1))


def test_alignment_by_hand():
    J_i, S_i = torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64)), torch.tensor([[3.0, 1.0]], dtype=torch.float64)
    eye = torch.eye(2, dtype=torch.float64)
    assert alignment_score((eye.T @ J_i @ eye)[None], S_i).item() == pytest.approx(1.0)  # a_ii = 1
    theta = math.pi / 3  # J_j's left singular vectors turned by 60°, right ones the standard basis
    U_j = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]], dtype=torch.float64)
    M = U_j.T @ J_i @ eye  # diagonal (3 cos θ, cos θ): a_ij = 4 cos θ / 4 = 1/2
    assert alignment_score(M[None], S_i).item() == pytest.approx(0.5)


def test_a_large_group_measures_neighbours_heat_map_pairs_and_a_seeded_sample():
    assert partners_per_site(17, "auto") is None and partners_per_site(18, "auto") == 6
    assert partners_per_site(40, "all") is None and partners_per_site(5, 4) is None and partners_per_site(30, 3) == 3
    assert alignment_pairs(5, None, 0) == [(a, b) for a in range(5) for b in range(5) if a != b]
    pairs = alignment_pairs(30, 6, seed=0)
    assert len(pairs) == len(set(pairs)) == 6 * 30 and all(a != b for a, b in pairs)
    names = [str(i) for i in range(30)]
    assert {(str(a), str(b)) for a, b in pairs} >= set(heatmap_pairs(names))  # every kept K×K map is measured
    assert alignment_pairs(30, 6, seed=0) == pairs != alignment_pairs(30, 6, seed=1)
    assert len(alignment_pairs(30, 1, seed=0)) == len(heatmap_pairs(names))  # never fewer than the maps need


def test_pair_mean_is_exact_on_every_pair_and_stratified_on_a_sample():
    full = [[1.0, 0.2, 0.4], [0.6, 1.0, 0.8], [0.3, 0.5, 1.0]]
    assert pair_mean(full) == pytest.approx((0.2 + 0.4 + 0.6 + 0.8 + 0.3 + 0.5) / 6)
    m = 5  # neighbours: 8 pairs, all measured; the 12 others: 3 measured
    matrix = [[None] * m for _ in range(m)]
    for a in range(m - 1):
        matrix[a][a + 1], matrix[a + 1][a] = 0.5, 0.7
    matrix[0][2], matrix[4][0], matrix[1][4] = 0.1, 0.2, 0.3
    assert pair_mean(matrix) == pytest.approx((4 * 0.5 + 4 * 0.7 + 12 * 0.2) / 20)
    assert pair_mean([[1.0, None], [None, 1.0]]) is None
    assert math.isnan(pair_mean([[1.0, math.nan], [0.5, 1.0]]))
