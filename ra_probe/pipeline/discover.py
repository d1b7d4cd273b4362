"""Sites found and verified on a real forward, and what the model's output says before anything is
measured: whether its samples are independent, and how many classes it scores."""
from __future__ import annotations

import torch

from ra_probe.capture import Captured, capture, logits_of
from ra_probe.errors import UserError, first_line
from ra_probe.load.data import Samples, batch, chunks, run_model, take
from ra_probe.pipeline.settings import DTYPES, Settings
from ra_probe.sites import SiteReport, find_sites
from ra_probe.verify import verify_sites


def discover(model: torch.nn.Module, samples: Samples, settings: Settings) -> SiteReport:
    """Sites found by the adapters and verified on a real forward of the first samples, after checking
    that the model treats samples independently (each sample's Jacobian is its own)."""
    report = find_sites(model)
    device, dtype = settings.resolved_device(), DTYPES[settings.dtype]
    first = batch(samples.inputs, chunks(samples.inputs, 4)[0], device, dtype)
    try:
        captured = capture(model, first, report.sites, with_head=False)
        alone = capture(model, take(first, slice(0, 1)), report.sites, with_head=False)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise UserError(f"data {samples.name!r} does not fit the model: {first_line(exc)}") from None
    _check_independent(captured, alone)
    return verify_sites(report, captured)


def _check_independent(batch: Captured, alone: Captured) -> None:
    """The first sample's output and site values must not depend on the other samples of its batch:
    batch statistics (BatchNorm in training mode or without running statistics) or any other layer
    that mixes samples would make every Jacobian wrong."""
    pairs = [(batch.logits, alone.logits)] + [(batch.sites[name].y, record.y) for name, record in alone.sites.items()
                                              if name in batch.sites]
    for together, single in pairs:
        if not isinstance(together, torch.Tensor) or len(together) < 2 or together.shape[1:] != single.shape[1:]:
            continue
        finite = torch.isfinite(single) & torch.isfinite(together[:1])  # NaN weights are flagged elsewhere
        gap = (together[:1] - single)[finite].abs()
        scale = single[finite].abs().max() if gap.numel() else None
        if gap.numel() and not bool(gap.max() <= 1e-4 * scale.clamp_min(torch.finfo(single.dtype).tiny)):
            raise UserError("the model's samples interact: a sample's output changes with the other samples of its "
                            "batch (BatchNorm in training mode or without running statistics, or another "
                            "batch-dependent layer); per-sample Jacobians need a model that treats samples "
                            "independently")


def output_classes(model: torch.nn.Module, samples: Samples, settings: Settings) -> int | None:
    """How many classes the model's output scores: the width of its 2-D logits for one sample."""
    one = batch(samples.inputs, chunks(samples.inputs, 1)[0], settings.resolved_device(), DTYPES[settings.dtype])
    with torch.no_grad():
        logits = logits_of(run_model(model, one))
    return logits.shape[1] if isinstance(logits, torch.Tensor) and logits.ndim == 2 else None
