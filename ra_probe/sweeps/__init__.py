"""Sweeps: many models, or many checkpoints of one, probed as separate runs (on Ray when installed)
into one folder — a JSON report per run written as soon as it finishes, `sweep.json` with every run's
status and the results across runs, and `sweep.html`. A second call in the same folder measures only
the runs whose model, files or settings changed, and those that failed."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

from ra_probe.errors import UserError
from ra_probe.report.files import read_report_file, write_json
from ra_probe.sweeps import execute
from ra_probe.sweeps.execute import RAY_MISSING, Finished
from ra_probe.sweeps.spec import Run, SweepSpec, read_spec
from ra_probe.sweeps.summary import previous_entries, render_sweep, run_entry, sweep_summary

SWEEP_FILE, PAGE = "sweep.json", "sweep.html"


def sweep(spec: str | Path | Sequence[str], out: str | Path, *, executor: str = "auto",
          address: str | None = None, cpus: int | None = None, gpus_per_run: float | None = None,
          cpus_per_run: int | None = None, progress: bool | Callable[[dict[str, Any]], None] = False,
          **options: Any) -> dict[str, Any]:
    """Probe every run of `spec` into the folder `out` and return the sweep.json document.

    `spec`: a sweep file (`.toml`: common options at the top, one `[[run]]` table per model), a model
    reference, or a list of them; `options` (named as for `ra_probe.probe`: `samples`, `k`, `data`,
    `weights`...) apply to every run, and a `weights` glob gives one run per checkpoint, ordered by
    training step. Everything is checked before anything starts (a UserError). `executor`: "ray",
    "local" (one run after another in this process) or "auto" (Ray when installed). On Ray: a running
    instance of this process is used as it is, else `address` is joined ("auto", "ray://host:port"),
    else a local instance with `cpus` CPUs is started; each run gets a GPU (`gpus_per_run` of them) when
    the cluster has GPUs, else `cpus_per_run` CPUs (default: an even share). `progress`: True for a bar
    and a line per finished run on stderr, or a callable given each finished run's sweep.json entry."""
    started = time.perf_counter()
    if executor not in ("auto", "ray", "local"):
        raise UserError(f"executor must be auto, ray or local, got {executor!r}")
    plan = read_spec(spec, options)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a folder for the sweep's reports")
    kind = "local" if executor == "local" or (executor == "auto" and address is None
                                              and not execute.ray_installed()) else "ray"
    messages = [RAY_MISSING] if executor == "auto" and kind == "local" else []
    entries, reports, todo = _earlier(plan, out)
    display = _Display(progress, len(plan.runs))
    for note in messages:
        display.note(note)
    for entry in entries.values():
        display.finished(entry)
    described: dict[str, Any] = {"name": kind, "version": None, "address": None, "resources": None, "per_run": None}
    measured = 0

    def save(final: bool) -> dict[str, Any]:
        ordered = [entries[run.name] for run in plan.runs if run.name in entries]
        document = sweep_summary(plan.source, ordered, described, measured, time.perf_counter() - started, messages)
        write_json(document, out / SWEEP_FILE)
        if final:
            from ra_probe.report.html import write_html

            write_html(render_sweep(document, reports), out / PAGE)
        return document

    try:
        with display:
            if todo:
                with execute.executor(executor, [run for run, _ in todo], address=address, cpus=cpus,
                              gpus_per_run=gpus_per_run, cpus_per_run=cpus_per_run) as pool:
                    described = pool.describe()
                    keys = dict((run.name, key) for run, key in todo)
                    with closing(pool.map([run for run, _ in todo])) as finished_runs:
                        for finished in finished_runs:
                            measured += 1
                            entries[finished.run.name] = _record(finished, keys[finished.run.name], out, reports)
                            display.finished(entries[finished.run.name])
                            save(final=False)
    except KeyboardInterrupt:
        for run, key in todo:
            entries.setdefault(run.name, run_entry(run, key, "interrupted", None, "interrupted", None))
        save(final=True)
        raise
    return save(final=True)


def _earlier(plan: SweepSpec, out: Path) -> tuple[dict[str, dict], dict[str, dict], list[tuple[Run, str]]]:
    """The runs already done in `out` with the same key (entries and reports by name), and the others
    with their keys, to measure."""
    previous = previous_entries(out / SWEEP_FILE)
    entries, reports, todo = {}, {}, []
    for run in plan.runs:
        key, earlier = run.key(), previous.get(run.name)
        report = None
        if earlier and earlier.get("key") == key and earlier.get("status") in ("done", "skipped") \
                and earlier.get("report"):
            try:
                report = read_report_file(out / earlier["report"])
            except UserError:  # removed or damaged since: measured again
                report = None
        if report is None:
            todo.append((run, key))
        else:
            entries[run.name] = run_entry(run, key, "skipped", report, None, earlier.get("seconds"))
            reports[run.name] = report
    return entries, reports, todo


def _record(finished: Finished, key: str, out: Path, reports: dict[str, dict]) -> dict[str, Any]:
    """A finished run's report written under `out` at once, and its sweep.json entry."""
    run, report = finished.run, finished.report
    if report is not None:
        write_json(report, out / f"{run.name}.json")
        reports[run.name] = report
    status = "done" if report is not None else "failed"
    return run_entry(run, key, status, report, finished.error, finished.seconds)


class _Display:
    """One progress bar for the sweep on stderr, and a line per run as it finishes (or the caller's callable)."""

    def __init__(self, progress: bool | Callable[[dict[str, Any]], None], total: int):
        self.callback = progress if callable(progress) else None
        self.total, self.bar = total, None
        if progress is True:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("sweep"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                console=Console(stderr=True, highlight=False), transient=True)
            self.task = self.bar.add_task("sweep", total=total)

    def __enter__(self) -> _Display:
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text, markup=False)

    def finished(self, entry: dict[str, Any]) -> None:
        if self.callback is not None:
            self.callback(entry)
        if self.bar is None:
            return
        self.bar.advance(self.task)
        if entry["status"] == "failed":
            line = f"failed  {entry['name']}: {entry['error']}"
        else:
            seconds = f"{entry['seconds']:.1f} s" if entry["seconds"] is not None else ""
            line = (f"{entry['status']:<7} {entry['name']}  RA {entry['verdict']['ra']}, NC {entry['verdict']['nc']}"
                    f"  {seconds}")
        self.bar.console.print(line, markup=False)


__all__ = ["sweep"]
