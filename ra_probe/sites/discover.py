"""Sites found and verified on a real forward, and what the model's output says before anything is
measured: whether its samples are independent, and how many classes it scores."""
from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch

from ra_probe.errors import UserError, first_line
from ra_probe.load.samples import Samples, batch, chunks, run_model, take
from ra_probe.sites.capture import Captured, capture, logits_of
from ra_probe.sites.records import Found, SiteReport
from ra_probe.sites.registry import find_sites, hand_over
from ra_probe.sites.verify import verify_sites

# samples the sites are verified on: two show whether samples interact, and at high resolution every
# sample more holds a whole forward's activations and every site's tensors again (four blocks of
# gemma4_vit_167m at 768 px: 0.9 GB a sample)
VERIFY_SAMPLES = 2


def discover(model: torch.nn.Module, samples: Samples, device: torch.device, dtype: torch.dtype,
             site_level: str = "auto") -> SiteReport:
    """Sites found by the adapters and verified on a real forward of the first samples, after checking
    that the model treats samples independently (each sample's Jacobian is its own). `site_level`: the
    granularity of transformer sites (auto: each family's default, block, sublayer). Blocks whose
    family-adapter sites the forward refuses are looked at again by the generic detector."""
    first = batch(samples.inputs, chunks(samples.inputs, VERIFY_SAMPLES)[0], device, dtype)
    run = lambda: run_model(model, take(first, slice(0, 1)))  # noqa: E731
    with _fitting(model, first, samples.name):
        found = find_sites(model, run=run).at_level(site_level)
    verified = verify_sites(found, _captured(model, first, found, samples.name))
    handed = hand_over(model, found, verified.skipped, run=run)
    return verified if handed is None else verify_sites(handed, _captured(model, first, handed, samples.name))


def _captured(model: torch.nn.Module, first, found: Found, data: str) -> Captured:
    """The sites' tensors on the first batch, once checked against its first sample alone."""
    with _fitting(model, first, data):
        captured = capture(model, first, found, with_head=False)
        alone = capture(model, take(first, slice(0, 1)), found, with_head=False)
    _check_independent(captured, alone)
    return captured


@contextmanager
def _fitting(model: torch.nn.Module, inputs, data: str):
    """Forwards of `model` on `inputs`: an error they raise is data that does not fit the model, said
    in one line (the inputs it needs that the data does not give, when that is why)."""
    try:
        yield
    except (RuntimeError, ValueError, TypeError, IndexError, AttributeError, KeyError) as exc:
        missing = _missing_inputs(model, inputs)
        why = f"the model also takes {', '.join(missing)}, which the data does not give" if missing \
            else first_line(exc)
        raise UserError(f"data {data!r} does not fit the model: {why}") from None


# the inputs of a modality a model may need besides the ones given (a text-and-image model given text)
MODALITY_INPUTS = ("input_ids", "pixel_values", "input_features", "input_values", "decoder_input_ids")


def _missing_inputs(model: torch.nn.Module, inputs) -> list[str]:
    """The modality inputs the model's forward names that the data does not hold."""
    given = {"input_ids"} if isinstance(inputs, torch.Tensor) else set(inputs)
    names = inspect.signature(model.forward).parameters
    return [name for name in MODALITY_INPUTS if name in names and name not in given] if given & set(names) else []


def _check_independent(batch: Captured, alone: Captured) -> None:
    """The first sample's output and site values must not depend on the other samples of its batch:
    batch statistics (BatchNorm in training mode or without running statistics) or any other layer
    that mixes samples would make every Jacobian wrong. A tensor whose first dimension holds several
    rows per sample (windows, patches) is compared on the first sample's rows; the tolerance follows
    the dtype (a batch may take other kernels than one sample) and each tensor's scale."""
    pairs = [(batch.logits, alone.logits)] + [(batch.sites[name].y, record.y) for name, record in alone.sites.items()
                                              if name in batch.sites]
    for together, single in pairs:
        if not (isinstance(together, torch.Tensor) and isinstance(single, torch.Tensor)) or single.ndim == 0 \
                or together.shape[1:] != single.shape[1:] or len(together) != batch.batch * len(single):
            continue
        if batch.batch > 1 and _differ(together[:len(single)], single):
            raise UserError("the model's samples interact: a sample's output changes with the other samples of its "
                            "batch (BatchNorm in training mode or without running statistics, or another "
                            "batch-dependent layer); per-sample Jacobians need a model that treats samples "
                            "independently")


def _differ(together: torch.Tensor, single: torch.Tensor) -> bool:
    finite = torch.isfinite(single) & torch.isfinite(together)  # NaN weights are flagged elsewhere
    if not finite.any() or not single.is_floating_point():
        return False
    gap = (together - single)[finite].abs().max()
    tolerance = min(1e-2, 1e3 * torch.finfo(single.dtype).eps)  # float32: 1.2e-4 of the scale
    return bool(gap > tolerance * single[finite].abs().max().clamp_min(torch.finfo(single.dtype).tiny))


def output_classes(model: torch.nn.Module, samples: Samples, device: torch.device, dtype: torch.dtype) -> int | None:
    """How many classes the model's output scores: the width of its 2-D logits for one sample."""
    one = batch(samples.inputs, chunks(samples.inputs, 1)[0], device, dtype)
    with torch.no_grad(), _fitting(model, one, samples.name):
        logits = logits_of(run_model(model, one))
    return logits.shape[1] if isinstance(logits, torch.Tensor) and logits.ndim == 2 else None
