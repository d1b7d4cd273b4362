"""The report's JSON Schema, shipped in the package, and validation against it."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

SCHEMA_VERSION = "2.0"  # also in report.schema.json; MINOR for added fields, MAJOR for changed ones
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


# Keys that 2.0 renamed, by their 1.x names: settings, verdict thresholds and the gate's limits
FORMER_SETTINGS = {"chunk": "vectors_per_call", "sites": "site_level"}
FORMER_THRESHOLDS = {"min_linearity": "ra1_min", "min_alignment": "ra2_min", "min_init_ratio": "ra2_min_init_ratio",
                     "rank_share": "ra3_min_rank_share", "max_nc1": "nc1_max", "max_nc_init_ratio": "nc1_max_init_ratio",
                     "max_nc2": "nc2_max", "max_nc3": "nc3_max", "max_nc4": "nc4_max"}
FORMER_LIMITS = {"min_linearity": "fail_below_ra1", "min_alignment": "fail_below_ra2", "max_rank": "fail_above_rank",
                 "max_nc1": "fail_above_nc1", "max_nc4": "fail_above_nc4"}


def upgraded(report: Any) -> Any:
    """A report of schema 1.x (a copy) with its renamed keys as 2.0 names them: the settings' `chunk`
    and `sites`, the thresholds (settings and verdict) and the gate's limits. Its `schema_version`
    stays what it was. Any other value is returned as it is."""
    if not isinstance(report, dict) or not str(report.get("schema_version", "")).startswith("1."):
        return report
    report = copy.deepcopy(report)
    settings = report.get("settings")
    if isinstance(settings, dict):
        _rename(settings, FORMER_SETTINGS)
        _rename(settings.get("thresholds"), FORMER_THRESHOLDS)
    if isinstance(report.get("verdict"), dict):
        _rename(report["verdict"].get("thresholds"), FORMER_THRESHOLDS)
    gate = report.get("gate")
    if isinstance(gate, dict):
        _rename((gate.get("rules") or {}).get("limits"), FORMER_LIMITS)
        for check in gate.get("checks") or ():
            if isinstance(check, dict) and check.get("name") in FORMER_LIMITS:
                check["name"] = FORMER_LIMITS[check["name"]]
    return report


def _rename(table: Any, renames: dict[str, str]) -> None:
    if isinstance(table, dict):
        for old, new in renames.items():
            if old in table and new not in table:
                table[new] = table.pop(old)
