"""RA1 trajectory projection on constructed trajectories with known geometry."""
import torch

from ra_probe.metrics.ra import trajectory_projection


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
