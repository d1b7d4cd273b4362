"""The report is written in one place (report/build.py) from typed, frozen results; everything else
reads it."""
from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from ra_probe.metrics import results
from ra_probe.report.schema import schema

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "ra_probe"
WRITER = PACKAGE / "report" / "build.py"
MUTATORS = {"append", "extend", "insert", "update", "setdefault", "pop", "popitem", "clear", "remove"}


def _report_keys() -> set[str]:
    """The report's top-level keys, its metrics' sections and the keys below them the verdict and the
    null contrast hold: a subscript with one of these reaches into a report."""
    properties = schema()["properties"]
    keys = set(properties) | set(properties["metrics"].get("properties", {}))
    return keys | {"gate", "evidence", "ratio", "ratio_ci", "checks", "caveat", "control", "scope"}


def _path(node: ast.expr) -> tuple[str | None, list[str]]:
    """The root name of a subscript/attribute chain and the string keys along it."""
    keys = []
    while isinstance(node, (ast.Subscript, ast.Attribute)):
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
            keys.append(node.slice.value)
        node = node.value
    return (node.id if isinstance(node, ast.Name) else None), keys[::-1]


def report_writes(source: str) -> list[str]:
    """Where `source` writes into a report dict: an assignment to (or a del of, or a mutating call on) a
    subscript chain rooted at a name ending in "report", "verdict" or "evidence"; rooted at a name of one
    of the report's sections ("metrics", "null"…) and holding one of the report's keys; or holding two of
    them (a path into a report, whatever the dict is called)."""
    keys, found = _report_keys(), []

    def into_report(target: ast.expr) -> bool:
        root, path = _path(target)
        held = [key for key in path if key in keys]
        return (bool(root) and root.lower().endswith(("report", "verdict", "evidence"))
                or (root in keys and bool(held)) or len(held) >= 2)

    for node in ast.walk(ast.parse(source)):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Delete):
            targets = node.targets
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS
              and isinstance(node.func.value, ast.Subscript)):
            targets = [node.func.value]
        found += [f"line {node.lineno}: {ast.unparse(t)}" for t in targets
                  if isinstance(t, ast.Subscript) and into_report(t)]
    return found


@pytest.mark.parametrize("snippet", [
    'report["messages"].append("served from the cache")', 'metrics["null"] = {"status": "off"}',
    'metrics["null"]["ratio"]["nc1"] = 0.5', 'evidence["caveat"] = "synthetic"', 'report["gate"] = {}',
    'out["verdict"]["evidence"] = {}', 'del report["timings"]', 'metrics["ra3"]["sites"][0]["rank_median"] += 1',
])
def test_the_criterion_sees_writes_into_a_report(snippet):
    assert report_writes(snippet) != []


@pytest.mark.parametrize("snippet", [
    'metrics["ra/probe_seconds"] = 1.0', 'values[key] = 2', 'figures["coupling"][group["group"]] = {}',
    'replicates["ra1"] = values', 'entry.update(other)', 'counts["done"] += 1',
])
def test_the_criterion_leaves_other_dicts_alone(snippet):
    assert report_writes(snippet) == []


def test_no_module_but_the_builder_writes_into_the_report():
    writes = {str(path.relative_to(ROOT)): found for path in PACKAGE.rglob("*.py") if path != WRITER
              for found in [report_writes(path.read_text())] if found}
    assert writes == {}


def report_reads(source: str) -> list[str]:
    """Where `source` reads a report dict by a path of string keys: a subscript chain rooted at a name
    ending in "report", or reaching a section of `metrics` or into a verdict's `evidence`."""
    tree = ast.parse(source)
    sections = set(schema()["properties"]["metrics"]["properties"])
    inner = {id(n) for node in ast.walk(tree) if isinstance(node, (ast.Subscript, ast.Attribute))
             for n in [node.value] if isinstance(n, (ast.Subscript, ast.Attribute))}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Subscript) or id(node) in inner:
            continue
        root, path = _path(node)
        pairs = list(zip(path, path[1:]))
        if (root and root.lower().endswith("report") and path or any(a == "metrics" and b in sections for a, b in pairs)
                or any(a == "evidence" for a, _ in pairs)):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


@pytest.mark.parametrize("snippet", ['report["model"]["name"]', 'r["metrics"]["ra2"]["mean_score"]',
                                     'x["verdict"]["evidence"]["ra"]["checks"]', 'self._data["metrics"]["nc"]'])
def test_the_reading_criterion_sees_string_paths_into_a_report(snippet):
    assert report_reads(snippet) != []


@pytest.mark.parametrize("snippet", ['entry["metrics"]["depth"]', 'entry["verdict"]["ra"]', 'site["name"]'])
def test_the_reading_criterion_leaves_sweep_entries_and_records_alone(snippet):
    assert report_reads(snippet) == []


def test_reports_are_read_through_the_view_alone():
    readers = {PACKAGE / "report" / "view.py", WRITER}
    reads = {str(path.relative_to(ROOT)): found for path in PACKAGE.rglob("*.py") if path not in readers
             for found in [report_reads(path.read_text())] if found}
    assert reads == {}


def test_results_are_frozen():
    records = [cls for cls in vars(results).values() if dataclasses.is_dataclass(cls) and cls.__module__ == results.__name__]
    assert len(records) > 20 and all(cls.__dataclass_params__.frozen for cls in records)
    check = results.Check("RA2", 0.7, [0.6, 0.8], 0.5, True, "a_ij ≥ 0.5")
    with pytest.raises(dataclasses.FrozenInstanceError):
        check.passed = False


class _SiteReport(SimpleNamespace):
    """The sites of the reference as the probe's SiteReport gives them to the builder."""

    def describe(self) -> list[dict]:
        return [dict(entry) for entry in self.entries]


def test_build_report_from_typed_results_reproduces_the_reference():
    """The committed fc-digits report read into typed results and written again by build_report, with
    the model and the data loaded afresh: the same report, but for where it was computed."""
    from ra_probe.load.data import load_samples
    from ra_probe.load.models import load_model
    from ra_probe.pipeline.run import Outcome
    from ra_probe.pipeline.settings import Settings
    from ra_probe.report.build import build_report
    from ra_probe.report.view import results_of
    from ra_probe.scripts.reference_reports import FOLDER, reference_settings

    reference = json.loads((ROOT / FOLDER / "fc-digits.json").read_text())
    typed = results_of(reference)
    assert isinstance(typed.ra.ra2.groups[0], results.Alignment) and isinstance(typed.verdict.ra.checks[0], results.Check)
    settings = reference_settings()
    assert dataclasses.asdict(settings) == dataclasses.asdict(Settings(device="cpu"))
    loaded = load_model("bundled/fc-digits")
    samples = load_samples(None, loaded, limit=settings.sample_limit, seed=settings.seed)
    described = [f.name for f in dataclasses.fields(results.SiteSpectrum)]
    entries = [{k: v for k, v in s.items() if k not in described} for s in reference["sites"]]
    site_report = _SiteReport(sites=[SimpleNamespace(name=e["name"]) for e in entries], entries=entries, skipped=[],
                              adapter=reference["model"]["adapter"])
    timings = reference["timings"]
    outcome = Outcome(site_report,
                      SimpleNamespace(finite_outputs=True, batch_size=timings["samples_per_chunk"]), typed,
                      timings["total_seconds"], reference["environment"]["threads"],
                      {"seconds": timings["null_seconds"], "products": timings["null_products"]},
                      SimpleNamespace(as_dict=lambda: timings["prediction"]), timings["peak_bytes"],
                      timings["peak_measured_as"])
    built = build_report(loaded, samples, settings, outcome)
    assert {**built, "environment": None, "tool": None} == {**reference, "environment": None, "tool": None}
    assert json.dumps(built["metrics"], indent=1) == json.dumps(reference["metrics"], indent=1)  # key order too
