"""The settings of a probe: what to measure and how, one dataclass shared by the CLI, the library and
the cache key. Its fields, defaults and valid values are those of `pipeline.options.OPTIONS`."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ra_probe.errors import UserError
from ra_probe.metrics.verdict import Thresholds
from ra_probe.pipeline.options import DTYPES as DTYPE_NAMES
from ra_probe.pipeline.options import default, names, normalized, refuse_bad

Progress = Callable[[str, int, int], None]  # (what is being measured, done, total)


class Note(str):
    """A line for the reader, not a step of the work (the probe's predicted cost), as a progress
    callable receives it: a bar prints it above itself, a log as it is."""
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


@dataclass
class Settings:
    k: int = default("k")  # singular triplets per site and sample
    align_k: int | None = default("align_k")  # K of RA2 (default: k)
    align_pairs: str | int = default("align_pairs")  # RA2 pairs: all | partners per site on average | auto
    samples: str | int = default("samples")  # auto: rounds until the RA checks are decided | exactly N
    max_samples: int = default("max_samples")  # auto: at most this many
    budget: float | None = default("budget")  # auto: seconds after which no round is added
    batch_size: int | None = default("batch_size")  # samples per chunk; None: the most that fit the device's memory
    tol: float = default("tol")
    solver: str = default("solver")  # auto | dense | block
    vectors_per_call: int = default("vectors_per_call")  # vectors per vmapped Jacobian product call
    dense_limit: int = default("dense_limit")  # largest site dimension whose Jacobian auto may form
    tau: float = default("tau")
    dtype: str = default("dtype")
    device: str | None = default("device")
    seed: int = default("seed")
    null: str = default("null")  # init: RA metrics also measured on the architecture at random init | none
    null_samples: int = default("null_samples")  # samples of the null measurement (the first of the probe's)
    confidence: float = default("confidence")  # level of the bootstrap intervals
    resamples: int = default("resamples")  # bootstrap resamples
    tokens: str = default("tokens")  # all: every real token, its whole Jacobian | last: the last real token's
    site_level: str = default("site_level")  # granularity of transformer sites: auto | block | sublayer
    coupling_k: tuple[int, ...] = default("coupling_k")  # K values of block coupling (empty: not measured)
    threads: int | None = default("threads")  # torch CPU threads while probing; None: the caller's
    thresholds: Thresholds = field(default_factory=Thresholds)

    def alignment_k(self, k: int | None = None) -> int:
        """K of the RA2 alignment: `align_k`, else k (`k`: another k than the settings', for a prediction)."""
        return self.align_k or (self.k if k is None else k)

    def widest_alignment_k(self, k: int | None = None) -> int:
        """Top vectors of a site that RA2 and coupling apply the other sites' J to: the larger of their K."""
        return max([self.alignment_k(k), *self.coupling_k])

    @property
    def sample_limit(self) -> int:
        """The most samples a probe takes: --max-samples under auto, else --samples."""
        return self.max_samples if self.samples == "auto" else self.samples

    def resolved_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def resolved_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def validate(self) -> None:
        """Refuse values no probe can run with, naming the setting (a UserError): each by its option's
        constraint, as the command line refuses it."""
        for name in names("setting"):  # as the library holds them: "10m" is 600 seconds, "8" 8 samples
            setattr(self, name, normalized(name, getattr(self, name)))
        refuse_bad({name: getattr(self, name) for name in names("setting")})
        refuse_bad(self.thresholds.as_dict())
        self.coupling_k = coupling_ks(self.coupling_k, self.k)
        device = self.resolved_device()
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"device {self.device}: CUDA is not available here")

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["device"] = str(self.resolved_device())
        out["align_k"] = self.alignment_k()
        return out


def coupling_ks(values: Any, k: int) -> tuple[int, ...]:
    """The K values of block coupling (checked by the options table), sorted and distinct; each needs as
    many singular triplets, so none may exceed k."""
    values = tuple(sorted(set(normalized("coupling_k", values) or ())))
    if values and values[-1] > k:
        raise UserError(f"coupling_k values must be ≤ k = {k} (each needs that many singular triplets), "
                        f"got {', '.join(map(str, values))}")
    return values
