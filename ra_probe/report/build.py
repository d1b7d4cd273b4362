"""The report as plain, JSON-ready data, built once from what a probe found: the console, the JSON
file and the HTML report all read this one structure."""
from __future__ import annotations

import dataclasses
import math
import platform
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ra_probe.load.loaded import LoadedModel
from ra_probe.load.samples import Samples, real_tokens
from ra_probe.metrics.results import NullContrast, Results
from ra_probe.metrics.verdict import no_sites_message
from ra_probe.pipeline.cache import tensor_digest
from ra_probe.pipeline.run import Outcome
from ra_probe.pipeline.settings import Settings
from ra_probe.report.layout import HEADLINE_FIELDS, NULL_NC
from ra_probe.report.schema import SCHEMA_VERSION
from ra_probe.version import __version__


def environment(settings: Settings, threads: int) -> dict[str, Any]:
    """Where and how the numbers were computed (a probe always runs with TF32 off)."""
    device = settings.resolved_device()
    return {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "dtype": settings.dtype, "seed": settings.seed,
            "tf32": False, "threads": threads}


def build_report(loaded: LoadedModel, samples: Samples, settings: Settings, outcome: Outcome,
                 notes: Sequence[str] = ()) -> dict[str, Any]:
    """The report of one probe as a JSON-ready dict (see report.schema.json), written from its typed
    results: the one place the report is put together. `notes`: messages said last (e.g. cache hits)."""
    site_report, measured, results = outcome.site_report, outcome.measured, outcome.results
    tokens = real_tokens(samples.inputs)
    sites = []
    for site, entry in zip(site_report.sites, site_report.describe()):
        if settings.tokens == "last":  # measured at one token: the Jacobian's shapes are a token's
            entry.update(input_shape=entry["input_shape"][1:], output_shape=entry["output_shape"][1:])
        entry.update(plain(results.spectra[site.name]))
        sites.append(entry)
    return finite({
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "ra-probe", "version": __version__},
        "model": {"name": loaded.name, "source": loaded.source, "pretrained": loaded.pretrained,
                  "weights_sha256": loaded.weights_sha256, "num_classes": loaded.num_classes,
                  "parameters": sum(p.numel() for p in loaded.module.parameters()), "adapter": site_report.adapter,
                  "weights_path": loaded.weights_path, "preprocessing": loaded.preprocessing},
        "data": {"name": samples.name, "samples": len(samples), "labelled": samples.labels is not None,
                 "tokens": None if tokens is None else tokens.tolist(),
                 "digest": tensor_digest(samples.inputs, samples.labels),
                 "synthetic": samples.synthetic, "kind": samples.kind, "description": samples.description, "reason": samples.reason,
                 "source": samples.source},
        "settings": settings.as_dict(),
        "environment": environment(settings, outcome.threads),
        "sites": sites,
        "skipped": [{"name": s.name, "reason": s.reason} for s in site_report.skipped],
        "metrics": metrics(results),
        "verdict": {"ra": results.verdict.ra.status, "nc": results.verdict.nc.status,
                    "evidence": {"ra": plain(results.verdict.ra), "nc": plain(results.verdict.nc)},
                    "thresholds": settings.thresholds.as_dict()},
        "messages": [*_messages(sites, len(site_report.skipped), measured.finite_outputs, results), *notes],
        "timings": {"total_seconds": outcome.seconds,
                    "sites_seconds": sum(s["timing"]["seconds"] for s in sites),
                    "alignment_seconds": sum(s["timing"]["align_seconds"] for s in sites),
                    "products": sum(s["timing"]["products"] + s["timing"]["align_products"] for s in sites),
                    "samples_per_chunk": measured.batch_size,
                    "null_seconds": outcome.null_cost["seconds"], "null_products": outcome.null_cost["products"],
                    "peak_bytes": outcome.peak_bytes, "peak_measured_as": outcome.peak_measured_as,
                    "prediction": outcome.prediction.as_dict() if outcome.prediction is not None else None},
    })


def _messages(sites: list[dict[str, Any]], skipped: int, finite_outputs: bool, results: Results) -> list[str]:
    """What the reader is told beside the numbers: no sites, zero branches, an unconverged solver,
    non-finite outputs, NC on the model's own predictions."""
    messages = []
    if not sites:
        messages.append(no_sites_message(skipped))
    zero = results.ra.ra4.zero_sites
    if zero:
        messages.append(f"σ₁ = 0 at {len(zero)} site(s) ({', '.join(zero[:4])}{'…' if len(zero) > 4 else ''}): "
                        "branches that are exactly zero (random init with zero_init_last?)")
    unconverged = [s["name"] for s in sites if s["timing"].get("converged", s["timing"].get("samples")) != s["timing"].get("samples")]
    if unconverged:
        messages.append(f"the iterative solver did not reach --tol at {len(unconverged)} site(s) "
                        f"({', '.join(unconverged[:4])}{'…' if len(unconverged) > 4 else ''}) within its Krylov basis: "
                        "their singular values are approximate; each triplet's residual bound is in the report")
    if not finite_outputs:
        messages.append("the model's outputs hold NaN or Inf values (non-finite weights?): NC metrics are unreliable")
    if results.nc is not None and results.nc.labels_from == "predictions":
        messages.append("the data has no labels: NC metrics use the model's own predictions")
    return messages


def metrics(results: Results) -> dict[str, Any]:
    """The report's `metrics`: RA1–RA4, the coupling, NC, the intervals' making, the sampling and the null."""
    ra = results.ra
    return {"ra1": plain(ra.ra1), "ra2": plain(ra.ra2), "ra3": plain(ra.ra3), "ra4": plain(ra.ra4),
            "coupling": plain(ra.coupling), "nc": plain(results.nc), "uncertainty": plain(results.uncertainty),
            "sampling": plain(results.sampling), "null": _null(results.null)}


def _null(null: NullContrast) -> dict[str, Any]:
    """The report's `metrics.null`: why there is none, or how it was made, its RA headline numbers (each
    under its section's field), its NC and the model's ratios to it."""
    if not null.measured:
        return {"status": null.status, "reason": null.reason, **({} if null.seed is None else {"seed": null.seed})}
    return {"status": null.status, "init": null.init, "seed": null.seed, "samples": null.samples, "sites": null.sites,
            **{section: {HEADLINE_FIELDS[section]: value} for section, value in null.at_init.items()},
            "nc": None if null.nc is None else {key: getattr(null.nc, key) for key in NULL_NC},
            "ratio": dict(null.ratio), "ratio_ci": plain(null.ratio_ci)}


def plain(value: Any) -> Any:
    """A result as JSON-ready data: a record as a dict of its fields in their order (an optional field
    left out where None), sequences as lists."""
    if dataclasses.is_dataclass(value):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not (f.metadata.get("optional") and getattr(value, f.name) is None)}
    if isinstance(value, Mapping):
        return {key: plain(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def with_gate(report: dict[str, Any], gate: dict[str, Any]) -> dict[str, Any]:
    """The report with the gate's checks and rules (`ra-probe check` writes them into its report)."""
    return {**report, "gate": gate}


def finite(value: Any) -> Any:
    """The same structure with NaN and ±Inf replaced by None: JSON has no such numbers, and an undefined
    metric (a constant trajectory, a single class) is reported as missing, not as a number."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


