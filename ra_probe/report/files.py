"""Report files: written atomically, read back validated, named after the model."""
from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from ra_probe.errors import UserError
from ra_probe.files import atomic_write
from ra_probe.report.schema import SCHEMA_VERSION, schema_errors, upgraded


def write_json(report: dict[str, Any], path: Path) -> None:
    write_text(json.dumps(report, indent=1, allow_nan=False, default=_plain), path)


def write_text(text: str, path: Path) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON-serializable: {type(value).__name__}")


READABLE_MAJORS = ("1", SCHEMA_VERSION.split(".")[0])  # 1.x reports are read with their keys renamed


def read_report_file(path: Path) -> dict[str, Any]:
    """A report dict read back from JSON for `compare`, `check` and the HTML report. Reports of this
    MAJOR schema version are read (older MINOR versions lack only added fields), and of 1.x with the
    keys 2.0 renamed under their new names (`schema.upgraded`); the current version is validated."""
    try:
        report = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such report file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a JSON report ({exc})") from None
    version = str(report.get("schema_version", "")) if isinstance(report, dict) else ""
    if version.split(".")[0] not in READABLE_MAJORS:
        raise UserError(f"{path}: not an ra-probe report of schema version {' or '.join(READABLE_MAJORS)}.x "
                        f"(schema_version {version or 'missing'})")
    if version == SCHEMA_VERSION:
        errors = schema_errors(report)
        if errors:
            raise UserError(f"{path}: invalid report ({len(errors)} schema errors; first: {errors[0]})")
    return upgraded(report)


def file_safe(model: str) -> str:
    """A model name as part of a file name: "timm/resnet50" → "timm-resnet50"."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", model).strip("-.") or "model"


def default_report_path(model: str, folder: Path, suffix: str, when: datetime | None = None) -> Path:
    """`folder/<model>-<YYYYmmdd-HHMMSS><suffix>`, the model name made file-safe."""
    return Path(folder) / f"{file_safe(model)}-{(when or datetime.now()).strftime('%Y%m%d-%H%M%S')}{suffix}"
