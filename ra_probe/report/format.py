"""How every report output prints a value: the console, the HTML pages and the gate's lines alike."""
from __future__ import annotations

from typing import Any

from ra_probe.metrics.results import Sampling


def fmt(value: Any, digits: int = 3) -> str:
    """None as "–", booleans as yes/no, floats with `digits` significant digits, the rest as str()."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def fmt_ci(value: Any, ci: list[float] | None, digits: int = 3, unit: str = "") -> str:
    """A value with its confidence interval, "0.737 [0.734–0.740]"; the value alone without one."""
    text = fmt(value, digits) + unit if value is not None else "–"
    if value is None or not ci:
        return text
    return f"{text} [{fmt(ci[0], digits)}–{fmt(ci[1], digits)}{unit}]"


def null_rows(report: Any) -> list[list[str]]:
    """Each headline number contrasted with the random init as text: its label, the model's value, its
    value at random init and their ratio (the console's table and the HTML's alike)."""
    from ra_probe.report.headline import contrasted

    return [[label, fmt_ci(value, ci), fmt(at_init), fmt_ci(ratio, ratio_ci, unit="×")]
            for label, value, ci, at_init, ratio, ratio_ci in contrasted(report)]


def cost_rows(timings: dict[str, Any]) -> list[list[str]]:
    """The probe's wall time and peak memory as text, predicted and measured, with their ratio (the
    console's table and the HTML's alike); none for a report made before predictions (schema 1.7)."""
    from ra_probe.pipeline.cost import duration, size

    prediction = timings.get("prediction")
    if not prediction:
        return []

    def ratio(actual, predicted) -> str:
        return "–" if actual is None or not predicted else f"{actual / predicted:.2g}×"
    bound = "≤ " if prediction["upper_bound"] else ""
    peak, predicted_peak = timings.get("peak_bytes"), prediction["peak_bytes"]
    return [["wall time", bound + duration(prediction["seconds"]), duration(timings["total_seconds"], ""),
             ratio(timings["total_seconds"], prediction["seconds"])],
            ["peak memory", "–" if predicted_peak is None else "~" + size(predicted_peak),
             "–" if peak is None else size(peak), ratio(peak, predicted_peak)]]


def cost_caption(timings: dict[str, Any]) -> str:
    """What the prediction rested on, and how the peak was measured."""
    prediction = timings["prediction"]
    return (f"predicted after {prediction['after_seconds']:.1f} s: {prediction['basis']}; "
            f"peak: {timings['peak_measured_as']}")


def sampling_line(sampling: Sampling) -> str:
    """How many samples `--samples auto` measured and why no more, in words."""
    why = {"decided": "every RA check decided", "max_samples": "the cap (--max-samples)", "budget": "the budget spent",
           "data": "every sample taken"}
    line = (f"Jacobians of {sampling.measured} of {sampling.available} samples (--samples auto: "
            f"{why.get(sampling.stopped, sampling.stopped)} after rounds of {', '.join(map(str, sampling.rounds))})")
    if sampling.null_measured:
        line += (f"; random init: {sampling.null_measured} ({why.get(sampling.null_stopped, 'its contrast decided')})"
                 if sampling.null_stopped != "decided" else
                 f"; random init: {sampling.null_measured} (its contrast decided)")
    return line + "; NC on all of them"
