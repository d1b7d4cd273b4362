"""The CI model-health gate (`ra-probe check`): rules judged over a finished report, so the
same gate runs from Python on any report dict. A rule is a required verdict, a limit on one metric,
or agreement with a baseline report (verdicts no worse, metrics within a tolerance)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ra_probe.errors import UserError, first_line
from ra_probe.pipeline.options import OPTIONS, baseline_settings, default, names, refuse_bad
from ra_probe.report.headline import HEADLINE, headline
from ra_probe.report.schema import upgraded
from ra_probe.report.view import ReportView, view_of

VERDICT_ORDER = {"not_applicable": 0, "absent": 1, "undetermined": 1, "partial": 2, "present": 3}
LIMITS = names("limit")  # fail_below_ra2, fail_above_nc1…: each an option of the table, with the metric it bounds


def given_limits(values: dict[str, Any]) -> dict[str, float]:
    """The limits among `values` that are set (not None), each refused as the command line refuses it."""
    limits = {name: value for name, value in values.items() if name in LIMITS and value is not None}
    refuse_bad(limits)
    return limits


@dataclass
class GateRules:
    """`require`: verdicts that must be "present" ("ra", "nc"); `limits`: limit name → value;
    `baseline`: a report dict; `tolerance`: |run − baseline| ≤ tolerance · max(|baseline|, 1), i.e.
    relative for values above 1 and absolute below (scores, shares and NC metrics)."""

    require: tuple[str, ...] = ()
    limits: dict[str, float] = field(default_factory=dict)
    baseline: dict[str, Any] | None = None
    tolerance: float = default("tolerance")


@dataclass
class GateResult:
    passed: bool
    checks: list[dict[str, Any]]  # every rule judged: name, passed, detail
    report: dict[str, Any] | None = field(default=None, repr=False)  # the report judged

    @property
    def failures(self) -> list[str]:
        return [c["detail"] for c in self.checks if not c["passed"]]

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "checks": self.checks, "failures": self.failures}


def check_rules(rules: GateRules, k: int) -> None:
    """Refuse rules that could never fail: ranks are counted among the top k values, so a rank limit
    of k or more passes whatever the model."""
    limit = rules.limits.get("fail_above_rank")
    if limit is not None and limit >= k:
        raise UserError(f"--fail-above-rank {limit:g} can never fail with --k {k} (ranks are counted among the top k "
                        f"singular values): raise --k above {limit:g}")


def judge(report: dict[str, Any], rules: GateRules) -> GateResult:
    """Every rule of `rules` judged on `report`. A metric the report does not have (no residual
    sites, no classifier head) fails a limit on it: a gate never passes on missing evidence."""
    checks, view = [], view_of(report)
    for what in rules.require:
        evidence = getattr(view.verdict, what)
        status = evidence.status
        why = [f"{c.name} {_fmt(c.value)}, needs {c.rule}" for c in evidence.checks if c.passed is False] or [
            evidence.reason or ""]
        checks.append({"name": f"require {what}", "passed": status == "present",
                       "detail": f"{what.upper()} {status}" if status == "present" else
                       f"{what.upper()} {status}, required present ({', '.join(w for w in why if w)})"})
    for option, limit in rules.limits.items():
        metric, lower = OPTIONS[option].metric, OPTIONS[option].lower
        label, value = HEADLINE[metric].label, HEADLINE[metric].value(view)
        passed = value is not None and (value >= limit if lower else value <= limit)
        sign = ("≥" if passed else "<") if lower else ("≤" if passed else ">")
        checks.append({"name": option, "passed": passed, "value": value, "limit": limit,
                       "detail": f"{label} {_fmt(value)} {sign} {limit:g}" if value is not None
                       else f"{label} not measured ({option} {limit:g})"})
    if rules.baseline is not None:
        checks += _against_baseline(view, view_of(rules.baseline), rules.tolerance)
    return GateResult(all(c["passed"] for c in checks), checks)


def _against_baseline(report: ReportView, baseline: ReportView, tolerance: float) -> list[dict[str, Any]]:
    checks = _sites_against_baseline(report, baseline)
    for what in ("ra", "nc"):
        before, now = baseline.status(what), report.status(what)
        passed = VERDICT_ORDER[now] >= VERDICT_ORDER[before]
        checks.append({"name": f"baseline {what}", "passed": passed,
                       "detail": f"{what.upper()} {before} → {now}" + ("" if passed else " (worse than baseline)")})
    earlier, current = headline(baseline), headline(report)
    for metric in (name for name, metric in HEADLINE.items() if metric.held):
        label, before, now = HEADLINE[metric].label, earlier[metric], current[metric]
        if before is None and now is None:
            continue
        if before is None or now is None:
            checks.append({"name": f"baseline {metric}", "passed": False, "baseline": before, "value": now,
                           "detail": f"{label} {_fmt(before)} → {_fmt(now)} (measured in only one of the runs)"})
            continue
        allowed = tolerance * max(abs(before), 1.0)
        moved = abs(now - before) > allowed
        # a move beyond the tolerance fails only where the two runs' intervals show it: the smallest
        # distance between them exceeds the tolerance (without intervals, the values themselves)
        was, is_ = HEADLINE[metric].interval(baseline) or [before, before], HEADLINE[metric].interval(report) or [now, now]
        resolved = max(is_[0] - was[1], was[0] - is_[1]) > allowed
        detail = f"{label} {_fmt(before)} → {_fmt(now)}"
        if moved:
            detail += (f" (moved {_fmt(now - before, signed=True)}, allowed ±{allowed:.3g}"
                       + ("" if resolved else f"; within noise: intervals {_fmt_ci(was)} and {_fmt_ci(is_)}") + ")")
        checks.append({"name": f"baseline {metric}", "passed": not resolved, "baseline": before, "value": now,
                       "detail": detail})
    return checks


def _sites_against_baseline(report: ReportView, baseline: ReportView) -> list[dict[str, Any]]:
    """The baseline's sites must all be measured again: none missing, none newly skipped."""
    missing = [name for name in baseline.spectra if name not in report.spectra]
    skipped_before = {s["name"] for s in baseline.skipped}
    newly_skipped = [s for s in report.skipped if s["name"] not in skipped_before]
    problems = ([f"{len(missing)} baseline site(s) missing ({', '.join(missing[:3])}{'…' if len(missing) > 3 else ''})"]
                if missing else [])
    problems += [f"{s['name']} newly skipped ({s['reason']})" for s in newly_skipped[:3]]
    detail = f"sites: {len(baseline.spectra)} → {len(report.spectra)}"
    return [{"name": "baseline sites", "passed": not problems,
             "detail": detail + (f" ({'; '.join(problems)})" if problems else "")}]


def check_baseline_data(baseline: dict[str, Any], digest: str, path: Path | str) -> None:
    """A baseline measured on other samples is not comparable: refuse it at the door."""
    made_on = baseline.get("data", {}).get("digest")
    if made_on is None:
        raise UserError(f"baseline {path} has no fingerprint of its data (an older report): make a new baseline")
    if made_on != digest:
        raise UserError(f"baseline {path} was measured on other data ({baseline['data'].get('name')!r}, "
                        "different samples): run on the baseline's data or make a new baseline")


def _fmt_ci(bounds: list[float]) -> str:
    return f"[{bounds[0]:.3g}, {bounds[1]:.3g}]"


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.3g}" if signed else f"{value:.3g}"


def read_baseline(path: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """A baseline report, validated at the door: readable JSON with verdicts and numeric metrics,
    measured with the same comparable settings as this run."""
    if not path.is_file():
        raise UserError(f"baseline not found: {path}")
    try:
        report = upgraded(json.loads(path.read_text()))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"cannot read baseline {path}: {first_line(exc)}") from None
    try:
        view = view_of(report)
        verdicts = [view.status(what) for what in ("ra", "nc")]
        values = list(headline(view).values())
        made_with = dict(view.settings)
        valid = all(v in VERDICT_ORDER for v in verdicts) and all(
            isinstance(s["name"], str) for s in view.sites + view.skipped) and all(
            v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):
        valid = False
    if not valid:
        raise UserError(f"baseline {path} is not an ra-probe report (no verdicts or metrics)")
    compared = baseline_settings()  # the table's `must_match_baseline`
    before = {name: OPTIONS[name].before for name in compared if OPTIONS[name].before is not None}
    made_with, settings = {**before, **made_with}, {**before, **settings}
    differ = [f"{k} {made_with.get(k)} vs {settings.get(k)}" for k in compared if made_with.get(k) != settings.get(k)]
    if differ:
        raise UserError(f"baseline {path} was measured with other settings ({', '.join(differ)}): "
                        "run with the baseline's settings or make a new baseline")
    return report


def summary_line(report: dict[str, Any], result: GateResult) -> str:
    """One line for a CI log: PASS/FAIL, the model, its verdicts and every failed rule."""
    view = view_of(report)
    head = f"{'PASS' if result.passed else 'FAIL'} {view.model_name}: RA {view.status('ra')}, " \
           f"NC {view.status('nc')}" + (" on synthetic inputs (a smoke test, not a diagnosis)" if view.synthetic else "")
    if result.passed:
        return f"{head} ({len(result.checks)} check{'s' if len(result.checks) != 1 else ''} passed)"
    return f"{head}; failed: {'; '.join(result.failures)}"
