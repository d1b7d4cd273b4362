"""The report's JSON Schema, shipped in the package, and validation against it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SCHEMA_VERSION = "1.7"  # also in report.schema.json; MINOR for added fields, MAJOR for changed ones
SCHEMA_PATH = Path(__file__).with_name("report.schema.json")


def schema() -> dict[str, Any]:
    """The report's JSON Schema (draft 2020-12), shipped in the package."""
    return json.loads(SCHEMA_PATH.read_text())


def schema_errors(report: dict[str, Any], against: dict[str, Any] | None = None) -> list[str]:
    """Where `report` departs from the report schema (or the schema `against`), one line per error
    ("path: message"); empty when valid."""
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(against or schema())
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {_shorten(e.message)}"
            for e in sorted(validator.iter_errors(report), key=lambda e: list(map(str, e.absolute_path)))]


def _shorten(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"
