"""What a probe will cost, said before it is spent: the wall time and peak memory of the whole probe,
the random-init null included, extrapolated from what the first sample of each measurement took
(each is a chunk of its own, measured first: the model's, then the null's), and what each option
that cuts it would save."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ra_probe.engine.solvers import KRYLOV_MIN_K
from ra_probe.pipeline.measure import ChunkCost, PeakEstimate
from ra_probe.pipeline.settings import Settings

LONG_SECONDS = 180.0  # a prediction beyond this comes with the options that would cut it


@dataclass
class Calibration:
    """The numbers a prediction extrapolates: what the probe has spent so far and what the first sample
    of each measurement took. Sample sizes are relative to that first sample (text: its real tokens,
    which a product's cost follows; 1 for inputs of one shape)."""

    elapsed: float  # seconds of the probe so far
    overhead: float  # of them, those spent besides measuring samples: the model prepared, its sites found
    sample: float  # seconds of the model's first sample
    sizes: list[float]  # every sample of the model, in order
    shares: tuple[float, float] = (0.0, 0.0)  # of a sample's seconds: Krylov solves, RA2 products (what k scales)
    null_sample: float = 0.0  # seconds of the null's first sample
    null_sizes: list[float] = field(default_factory=list)  # the null's samples (none: no null measured)
    null_shares: tuple[float, float] = (0.0, 0.0)
    null_setup: float = 0.0  # seconds the null took before its first sample: its random init, its sites found
    cached: bool = False  # a first sample came from the cache: seconds as first measured, later ones may too
    peak_bytes: int | None = None
    products: int = 0  # Jacobian products of the model's first sample
    null_products: int = 0  # and of the null's

    @property
    def per_sample(self) -> float:
        """Seconds a sample of the model costs: its first sample's (measured after the null's first, so
        past the process's first calls)."""
        return self.sample

    @property
    def null_per_sample(self) -> float:
        """Seconds a sample of the null costs: its first sample's, or fewer at the model's seconds per
        product. The null's first sample is the probe's first: it paid the process's first calls (kernels
        loaded, programs traced), which the model's, on the same architecture after it, did not."""
        if not (self.products and self.null_products):
            return self.null_sample
        return min(self.null_sample, self.null_products * self.sample / self.products)


def seconds(cal: Calibration, samples: int | None = None, null: bool = True,
            keep: tuple[float, float] = (1.0, 1.0)) -> float:
    """The probe's predicted wall seconds, or with `samples` samples, without the null, or with its
    Krylov and RA2 seconds scaled by `keep` (a smaller k): the overhead already spent, every sample at
    its first sample's cost per unit of size, and the null's setup."""
    n = len(cal.sizes) if samples is None else min(samples, len(cal.sizes))

    def per_unit(seconds: float, shares: tuple[float, float]) -> float:
        return seconds * (1 - shares[0] * (1 - keep[0]) - shares[1] * (1 - keep[1]))
    total = cal.overhead + per_unit(cal.per_sample, cal.shares) * sum(cal.sizes[:n])
    if null and cal.null_sizes:
        total += cal.null_setup + per_unit(cal.null_per_sample, cal.null_shares) * sum(cal.null_sizes[:n])
    return total


def products(chunk: ChunkCost) -> int:
    """The Jacobian products a chunk took (SVDs and RA2), measured or as first measured."""
    return sum(int(t["products"] + t.get("align_products", 0)) for g in chunk.groups for t in g.timing.values())


def shares(chunk: ChunkCost) -> tuple[float, float]:
    """Of a chunk's seconds, the shares its Krylov solves and its RA2 products took: those grow with k
    (a dense solve forms J whatever k is)."""
    spent = chunk.seconds + chunk.cached_seconds
    if spent <= 0:
        return 0.0, 0.0
    timings = [(g.method[name], t) for g in chunk.groups for name, t in g.timing.items()]
    block = sum(t["seconds"] for method, t in timings if method == "block")
    align = sum(t["align_seconds"] for _, t in timings)
    return min(1.0, block / spent), min(1.0, align / spent)


@dataclass
class Prediction:
    """A probe's predicted wall seconds and peak bytes, what they rest on, and the options that would
    cut the time (option, the factor it divides the time by: None where it cannot be computed)."""

    seconds: float
    peak_bytes: int | None
    after_seconds: float  # how far into the probe it was made
    samples: int
    null_samples: int
    basis: str
    upper_bound: bool = False
    cuts: list[tuple[str, float | None]] = field(default_factory=list)

    def line(self) -> str:
        """"predicted: ~14 min, peak ~2.1 GB (64 samples + 8 null; measured 1 sample in 13 s, …)"."""
        peak = f", peak ~{size(self.peak_bytes)}" if self.peak_bytes is not None else ""
        null = f" + {self.null_samples} null" if self.null_samples else ""
        bound = "at most " if self.upper_bound else ""
        return f"predicted: {bound}{duration(self.seconds)}{peak} ({self.samples} samples{null}; {self.basis})"

    def hint(self, long_after: float | None = None) -> str | None:
        """How to cut a long probe (beyond `long_after` seconds, default LONG_SECONDS), or None."""
        if self.seconds <= (LONG_SECONDS if long_after is None else long_after) or not self.cuts:
            return None
        parts = [option if factor is None else f"{option} (÷{factor:.2g})" for option, factor in self.cuts]
        return "to cut it: " + ", ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "peak_bytes": self.peak_bytes, "after_seconds": self.after_seconds,
                "basis": self.basis, "upper_bound": self.upper_bound,
                "cuts": [{"option": option, "factor": factor} for option, factor in self.cuts]}


def predict(cal: Calibration, settings: Settings) -> Prediction:
    """The whole probe's cost from `cal`, and the options that cut it: fewer samples and no null (their
    factors from the same extrapolation), a smaller k (the Krylov solves' products follow max(k, 8) in
    the solver's cost model, RA2's follow its K), a GPU."""
    total = seconds(cal)
    basis = f"measured 1 sample in {duration(cal.sample, '')}"

    if cal.null_sizes:
        basis += f", 1 at random init in {duration(cal.null_sample, '')}"
        if cal.null_per_sample < cal.null_sample:
            basis += f" ({duration(cal.null_per_sample, '')} at the model's time per product, past the first calls)"
    if cal.cached:
        basis += " as first measured: it came from the cache, and later samples may too"
    cuts: list[tuple[str, float | None]] = []
    n = len(cal.sizes)
    if n > 2:
        fewer = max(2, n // 4)
        cuts.append((f"--samples {fewer}", total / seconds(cal, samples=fewer)))
    if cal.null_sizes:
        cuts.append(("--null none", total / seconds(cal, null=False)))
    smaller = max(KRYLOV_MIN_K, settings.k // 2)
    if smaller < settings.k and all(c <= smaller for c in settings.coupling_k):
        aligned = settings.widest_alignment_k()
        kept = smaller / max(settings.k, KRYLOV_MIN_K)
        aligned_after = settings.widest_alignment_k(smaller)
        cuts.append((f"--k {smaller}", total / seconds(cal, keep=(kept, aligned_after / aligned))))
    cuts = [(option, factor) for option, factor in cuts if factor >= 1.1]
    if settings.resolved_device().type == "cpu":
        cuts.append(("--device cuda (a GPU is here)" if torch.cuda.is_available() else "a GPU (--device cuda)", None))
    if settings.samples == "auto":  # the rounds stop once the verdict is decided: the whole is the most it costs
        basis += "; --samples auto stops once the verdict is decided"
    return Prediction(total, cal.peak_bytes, cal.elapsed, n, len(cal.null_sizes), basis,
                      cal.cached or settings.samples == "auto", cuts)


def peak_bytes(start: int | None, copied: int, model: PeakEstimate, null: PeakEstimate | None) -> int | None:
    """The probe's peak on its device: what was in use at its start (the model's weights included where
    they stood there already), plus the most either measurement adds: the model's chunk of samples, a
    block made resident and the `copied` bytes of its weights that had to move there (another device or
    dtype); or the null's whole estimate beside those copied weights."""
    if start is None:
        return None
    added = copied + model.resident_block + model.per_sample * model.samples
    return start + max(added, copied + null.total if null is not None else 0)


def bytes_as(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> int:
    """Bytes of `module`'s weights that stand on `device` in `dtype` already (a probe there holds no copy)."""
    index = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda" else None)
    there = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers())
                if t.device.type == device.type and t.device.index == index and t.dtype == dtype)
    return there


def duration(seconds: float, about: str = "~") -> str:
    """"~13 s", "~14 min", "~2.3 h"."""
    if seconds < 10:
        return f"{about}{seconds:.1f} s"
    if seconds < 90:
        return f"{about}{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{about}{seconds / 60:.0f} min"
    return f"{about}{seconds / 3600:.1f} h"


def size(count: int) -> str:
    """"~650 MB", "~2.1 GB" (decimal units)."""
    if count < 1e9:
        return f"{count / 1e6:.0f} MB"
    return f"{count / 1e9:.1f} GB"
