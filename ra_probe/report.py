"""The report as plain, JSON-ready data (spec §7): built once from what the probe measured; the
console, the JSON file and the HTML report all read this one structure."""
from __future__ import annotations

import json
import math
import platform
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from ra_probe import __version__
from ra_probe.cache import tensor_digest
from ra_probe.data import Samples, real_tokens
from ra_probe.errors import UserError
from ra_probe.sites import SiteReport
from ra_probe.sources import LoadedModel

SCHEMA_VERSION = "1.3"  # also in report.schema.json; MINOR for added fields, MAJOR for changed ones
SCHEMA_PATH = Path(__file__).with_name("report.schema.json")
NO_RESIDUAL = "no residual connections found"


def environment(settings) -> dict[str, Any]:
    device = settings.resolved_device()
    return {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "dtype": settings.dtype, "seed": settings.seed,
            "tf32": bool(torch.backends.cuda.matmul.allow_tf32)}


def build_report(loaded: LoadedModel, samples: Samples, settings, site_report: SiteReport, measured,
                 metrics: dict[str, Any], verdict: dict[str, Any], *, seconds: float) -> dict[str, Any]:
    details = metrics.pop("site_details")
    tokens = real_tokens(samples.inputs)
    sites = []
    for site in site_report.sites:
        entry = site.describe()
        entry.update(details[site.name])
        sites.append(entry)
    messages = []
    if not site_report.sites:
        messages.append(NO_RESIDUAL)
    zero = metrics["ra4"]["zero_sites"]
    if zero:
        messages.append(f"σ₁ = 0 at {len(zero)} site(s) ({', '.join(zero[:4])}{'…' if len(zero) > 4 else ''}): "
                        "branches that are exactly zero (random init with zero_init_last?)")
    unconverged = [s["name"] for s in sites if s["timing"].get("converged", s["timing"].get("samples")) != s["timing"].get("samples")]
    if unconverged:
        messages.append(f"the iterative solver did not reach --tol at {len(unconverged)} site(s) "
                        f"({', '.join(unconverged[:4])}{'…' if len(unconverged) > 4 else ''}) within its Krylov basis: "
                        "their singular values are approximate; each triplet's residual bound is in the report")
    if not measured.finite_outputs:
        messages.append("the model's outputs hold NaN or Inf values (non-finite weights?): NC metrics are unreliable")
    if metrics["nc"] is not None and metrics["nc"]["labels_from"] == "predictions":
        messages.append("the data has no labels: NC metrics use the model's own predictions")
    return finite({
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "ra-probe", "version": __version__},
        "model": {"name": loaded.name, "source": loaded.source, "pretrained": loaded.pretrained,
                  "weights_sha256": loaded.weights_sha256, "num_classes": loaded.num_classes,
                  "parameters": sum(p.numel() for p in loaded.module.parameters()), "adapter": site_report.adapter},
        "data": {"name": samples.name, "samples": len(samples), "labelled": samples.labels is not None,
                 "tokens": None if tokens is None else tokens.tolist(),
                 "digest": tensor_digest(samples.inputs, samples.labels)},
        "settings": settings.as_dict(),
        "environment": environment(settings),
        "sites": sites,
        "skipped": [{"name": s.name, "reason": s.reason} for s in site_report.skipped],
        "metrics": metrics,
        "verdict": {"ra": verdict["ra"]["status"], "nc": verdict["nc"]["status"],
                    "evidence": {"ra": verdict["ra"], "nc": verdict["nc"]},
                    "thresholds": settings.thresholds.as_dict()},
        "messages": messages,
        "timings": {"total_seconds": seconds,
                    "sites_seconds": sum(s["timing"]["seconds"] for s in sites),
                    "alignment_seconds": sum(s["timing"].get("align_seconds", 0.0) for s in sites),
                    "products": sum(s["timing"]["products"] + s["timing"].get("align_products", 0) for s in sites),
                    "samples_per_chunk": measured.batch_size},
    })


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


def write_json(report: dict[str, Any], path: Path) -> None:
    write_text(json.dumps(report, indent=1, allow_nan=False, default=_plain), path)


def write_text(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)  # never a half-written report


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON-serializable: {type(value).__name__}")


def schema() -> dict[str, Any]:
    """The report's JSON Schema (draft 2020-12), shipped in the package."""
    return json.loads(SCHEMA_PATH.read_text())


def schema_errors(report: dict[str, Any]) -> list[str]:
    """Where `report` departs from the schema, one line per error ("path: message"); empty when valid."""
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(schema())
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {_shorten(e.message)}"
            for e in sorted(validator.iter_errors(report), key=lambda e: list(map(str, e.absolute_path)))]


def _shorten(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def load_report(path: Path) -> dict[str, Any]:
    """A report read back from JSON for `compare` and the HTML report. Reports of this MAJOR schema
    version are read (older MINOR versions lack only added fields); the current version is validated."""
    try:
        report = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such report file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a JSON report ({exc})") from None
    version = str(report.get("schema_version", "")) if isinstance(report, dict) else ""
    if version.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        raise UserError(f"{path}: not an ra-probe report of schema version {SCHEMA_VERSION.split('.')[0]}.x "
                        f"(schema_version {version or 'missing'})")
    if version == SCHEMA_VERSION:
        errors = schema_errors(report)
        if errors:
            raise UserError(f"{path}: invalid report ({len(errors)} schema errors; first: {errors[0]})")
    return report


def file_safe(model: str) -> str:
    """A model name as part of a file name: "timm/resnet50" → "timm-resnet50"."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", model).strip("-.") or "model"


def default_report_path(model: str, folder: Path, suffix: str, when: datetime | None = None) -> Path:
    """`folder/<model>-<YYYYmmdd-HHMMSS><suffix>`, the model name made file-safe."""
    return Path(folder) / f"{file_safe(model)}-{(when or datetime.now()).strftime('%Y%m%d-%H%M%S')}{suffix}"
