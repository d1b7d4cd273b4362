"""The `ra-probe` command: a thin Typer layer that parses options and calls one library
function per command. A user's mistake is one line on stderr and exit code 2."""
from __future__ import annotations

import functools
import inspect
import json
import sys
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from ra_probe.errors import UserError
from ra_probe.host import own_process
from ra_probe.pipeline.options import OPTIONS, Option, names, refuse_bad

try:  # recent Typer releases vendor click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - older Typer on plain click
    from click.exceptions import ClickException

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  help="Residual Alignment and Neural Collapse diagnostics for residual networks.\n\n"
                       "Usage: ra-probe [MODEL] [options] (default MODEL: bundled/fc-digits), or one of the commands below.")
COMMANDS = {"probe", "check", "sites", "adapters", "compare", "render", "sweep"}
DEFAULT_MODEL = "bundled/fc-digits"
DEFAULT_OUT = "reports"
err = Console(stderr=True)


ModelArg = typer.Argument(..., help="bundled/<name>, timm/<name>, hf/<org>/<name>, a folder, a checkpoint "
                                    "(with --arch), a factory file.py:fn / package.module:fn, or a spec of a "
                                    "source installed through the ra_probe.sources entry points")
Force = typer.Option(False, "--force", help="overwrite an existing report file")

# The flags of every command that probes a model (probe, check, sites, sweep), made from the one
# table of options: `probe_options` adds them to a command, which receives them as one `ProbeOptions`.
# The gate's limits and tolerance are `check`'s alone.
PROBE_FLAGS: dict[str, Option] = {option.name: option for option in OPTIONS.values()
                                  if option.flag and option.role not in ("limit", "gate")}
GATE_FLAGS: dict[str, Option] = {name: OPTIONS[name] for name in names("limit", "gate")}


@dataclass
class ProbeOptions:
    """The options of one command line, as the library takes them (`cache`, not `no_cache`): `values`
    by name, the gate's `limits` that are set, and the names the user gave."""

    values: dict[str, Any]
    limits: dict[str, float]
    given: set[str] = field(default_factory=set)  # the options the user gave (not defaults, not a file's)

    @property
    def for_library(self) -> dict[str, Any]:
        """The settings and loading options, as keywords of `ra_probe.probe`, `check` and `find_sites`."""
        return {name: value for name, value in self.values.items() if OPTIONS[name].role in ("setting", "loading")}


def _parameter(option: Option) -> inspect.Parameter:
    """The Typer parameter of an option: its flag and help; a `--no-…` flag is a switch. Its values are
    checked by the option's constraint (so with the library's message), not by Typer."""
    # a default Typer cannot write as text (an empty tuple) is given as None: the option's own default
    default = False if option.negated else None if isinstance(option.default, tuple) else option.default
    return inspect.Parameter(option.cli_name, inspect.Parameter.KEYWORD_ONLY,
                             default=typer.Option(default, option.flag, help=option.help),
                             annotation=bool if option.negated else option.cli_type)


def _former_parameters(option: Option) -> list[inspect.Parameter]:
    """Hidden parameters for the former flags of an option (`--min-alignment` of `--fail-below-ra2`)."""
    return [inspect.Parameter(f"former_{old}", inspect.Parameter.KEYWORD_ONLY,
                              default=typer.Option(None, f"--{old.replace('_', '-')}", hidden=True),
                              annotation=Optional[option.cli_type]) for old in option.was]


def _with_current_flags(added: list[Option], kwargs: dict[str, Any]) -> set[str]:
    """Move the values of former flags to their current ones, each with one deprecation line on stderr;
    a former flag given with its current one is refused. Returns the names of the options given (on
    the command line, by the environment or by a former flag)."""
    try:
        from typer._click.globals import get_current_context
    except ImportError:  # pragma: no cover - older Typer on plain click
        from click import get_current_context

    context = get_current_context()
    given = {option.name for option in added
             if context.get_parameter_source(option.cli_name).name in ("COMMANDLINE", "ENVIRONMENT")}
    for option in added:
        for old in option.was:
            value = kwargs.pop(f"former_{old}")
            if value is None:
                continue
            former = f"--{old.replace('_', '-')}"
            if context.get_parameter_source(option.cli_name).name != "DEFAULT":
                raise UserError(f"{former} and {option.flag} are one option ({former} is its former name): "
                                f"give only {option.flag}")
            err.print(f"deprecated: {former} is now {option.flag}", highlight=False, markup=False)
            kwargs[option.cli_name] = value
            given.add(option.name)
    return given


def probe_options(*wanted: str, gate: bool = False) -> Callable[[Callable], Callable]:
    """Give a command the probe flags `wanted` (all by default), and the gate's limits and tolerance
    with `gate`, after its own; it receives them as `options: ProbeOptions`, every value checked."""
    from ra_probe.gate import LIMITS, given_limits

    added = [PROBE_FLAGS[name] for name in wanted or PROBE_FLAGS]
    added += list(GATE_FLAGS.values()) if gate else []

    def decorate(command: Callable) -> Callable:
        own = [p for p in inspect.signature(command).parameters.values() if p.name != "options"]
        parameters = [_parameter(option) for option in added]
        parameters += [former for option in added for former in _former_parameters(option)]

        @functools.wraps(command)
        def wrapper(**kwargs):
            named = _with_current_flags(added, kwargs)
            given = {option.name: option.library_value(kwargs.pop(option.cli_name)) for option in added}
            values = {name: value for name, value in given.items() if name not in LIMITS}
            return command(**kwargs, options=ProbeOptions(values, given_limits(given), named))

        del wrapper.__wrapped__  # Typer reads the signature below, not the command's own
        wrapper.__signature__ = inspect.Signature(own + parameters)
        hints = typing.get_type_hints(command)
        wrapper.__annotations__ = {**{p.name: hints[p.name] for p in own},
                                   **{p.name: p.annotation for p in parameters}}
        return wrapper
    return decorate


@app.command()
@probe_options()
def probe(
    model: str = ModelArg,
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the JSON report here"),
    html_path: Optional[Path] = typer.Option(None, "--html", help="write the HTML report here"),
    out: Optional[Path] = typer.Option(None, "--out", help="folder for <model>-<timestamp>.json and .html "
                                       "(default reports/, used when --json and --html are not given)"),
    force: bool = Force,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no tables or progress; the verdict line only"),
    options: ProbeOptions = None,
) -> None:
    """Probe MODEL: residual sites, Jacobian spectra, RA1–RA4, NC1–NC4 and the verdict."""
    from ra_probe.api import probe as run_probe
    from ra_probe.report.console import print_report
    from ra_probe.report.files import write_json
    from ra_probe.report.html import render_report, write_html
    from ra_probe.report.view import view_of

    paths = _report_paths(model, json_path, html_path, out)
    _refuse_overwrite(paths.values(), force)
    report = run_probe(model, options.values["data"], progress=not quiet, cache=options.values["cache"],
                       **options.for_library).to_dict()
    console = Console(quiet=quiet)
    print_report(report, console)
    if ".json" in paths:
        write_json(report, paths[".json"])
    if ".html" in paths:
        write_html(render_report(report), paths[".html"])
    for path in paths.values():
        console.print(f"report written to {path}")
    # the verdict in one line, last, with or without the tables: what a log or a script reads
    view = view_of(report)
    typer.echo(f"{view.model_name}: RA {view.status('ra')}, NC {view.status('nc')}"
               + (" (synthetic inputs: a smoke test, not a diagnosis)" if view.synthetic else ""))


def _apply_config(ctx: typer.Context, path: Optional[Path]) -> Optional[Path]:
    """Eager `--config`: the file's keys become the command's defaults (click's `default_map`), so
    options given on the command line still win. Without `--config`, ./ra-probe.toml or the
    [tool.ra-probe] table of ./pyproject.toml is used when present."""
    from ra_probe.config import find_config, read_config

    path = path or find_config(Path())
    if path is None:
        return None
    by_key = {opt.lstrip("-").replace("-", "_"): param for param in ctx.command.params if param.name != "config"
              for opt in param.opts if not (opt.startswith("-") and not opt.startswith("--"))}
    shown = {key for key, param in by_key.items() if not getattr(param, "hidden", False)}
    defaults = {}
    for key, value in read_config(path).items():
        param = by_key.get(key)
        if param is None:
            known = ", ".join(sorted(k.replace("_", "-") for k in shown))
            raise UserError(f"{path}: unknown setting {key.replace('_', '-')!r} (known: {known})")
        defaults[param.name] = [value] if param.multiple and isinstance(value, str) else value
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return path


@app.command()
@probe_options(gate=True)
def check(
    model: str = typer.Argument(DEFAULT_MODEL, help="the model to gate, as for probe"),
    require: Optional[list[str]] = typer.Option(None, help="ra | nc: fail unless that verdict is present (repeatable)"),
    baseline: Optional[Path] = typer.Option(None, help="a report JSON: fail if a verdict gets worse or a metric "
                                                        "moves beyond --tolerance"),
    config: Optional[Path] = typer.Option(None, "--config", is_eager=True, callback=_apply_config,
                                          help="settings file (default: ./ra-probe.toml, or the tool.ra-probe "
                                               "table of ./pyproject.toml)"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the report here (default: "
                                                                  "reports/<model>.check.json)"),
    force: bool = Force,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="also print the report's tables (on stderr)"),
    options: ProbeOptions = None,
) -> None:
    """CI gate: probe MODEL and judge the report. Exit 0 pass, 1 fail, 2 usage or input error; one
    summary line on stdout; the JSON report of the run (with the gate's checks) is written."""
    from ra_probe.api import check as run_check
    from ra_probe.api import load_inputs
    from ra_probe.gate import summary_line
    from ra_probe.report.build import with_gate
    from ra_probe.report.console import print_report
    from ra_probe.report.files import file_safe, write_json

    wanted = tuple(dict.fromkeys(part.strip() for text in require or () for part in text.split(",")))
    limits, tolerance = options.limits, options.values["tolerance"]
    refuse_bad({"tolerance": tolerance})  # the gate's rules are refused before a model is loaded, as its limits
    if not wanted and not limits and baseline is None:
        raise UserError("check needs a rule: --require ra/nc, --baseline REPORT.json or a limit such as "
                        "--fail-below-ra2 (or a config file that sets them)")
    loaded, samples, settings = load_inputs(model, options.values["data"], **options.for_library)
    out = json_path or Path(DEFAULT_OUT) / f"{file_safe(loaded.name)}.check.json"
    if out.exists() and not force and not (json_path is None and _is_report(out)):
        raise UserError(f"{out} exists; pass --force to overwrite it")
    result = run_check(loaded, require=wanted, baseline=baseline, tolerance=tolerance,
                       data=samples, settings=settings, progress=verbose,
                       cache=options.values["cache"], **limits)
    report = result.report
    if verbose:
        print_report(report, err)
    report = with_gate(report, {**result.as_dict(), "rules": {"require": list(wanted), "limits": limits,
                                                              "baseline": None if baseline is None else str(baseline),
                                                              "tolerance": tolerance}})
    write_json(report, out)
    typer.echo(f"{summary_line(report, result)} [report: {out}]")
    if not result.passed:
        raise typer.Exit(1)


def _is_report(path: Path) -> bool:
    """Whether `path` holds an ra-probe report (a gate may overwrite its own earlier output)."""
    try:
        return json.loads(path.read_text()).get("tool", {}).get("name") == "ra-probe"
    except (OSError, ValueError, AttributeError):
        return False


def _report_paths(model: str, json_path: Optional[Path], html_path: Optional[Path],
                  out: Optional[Path]) -> dict[str, Path]:
    """Report files by suffix: the paths given, and `<out>/<model>-<timestamp>.{json,html}` for the
    formats not given a path when --out is given or no path at all (out defaults to reports/)."""
    from datetime import datetime

    from ra_probe.report.files import default_report_path

    paths = {suffix: path for suffix, path in ((".json", json_path), (".html", html_path)) if path is not None}
    if out is not None or not paths:
        now = datetime.now()
        for suffix in (".json", ".html"):
            paths.setdefault(suffix, default_report_path(model, out or Path(DEFAULT_OUT), suffix, now))
    return paths


def _refuse_overwrite(paths, force: bool) -> None:
    for path in paths:
        if path.exists() and not force:
            raise UserError(f"{path} exists; pass --force to overwrite it")


@app.command()
@probe_options("data", "pretrained", "weights", "arch", "input_shape", "device_map", "device", "site_level")
def sites(model: str = ModelArg, options: ProbeOptions = None) -> None:
    """List the residual sites found in MODEL (and those skipped, with the reason), without probing."""
    from ra_probe.api import find_sites
    from ra_probe.metrics.verdict import no_sites_message
    from ra_probe.report.console import sites_table

    report = find_sites(model, options.values["data"], **options.for_library)
    console = Console()
    console.print(sites_table(report.describe(),
                              [{"name": s.name, "reason": s.reason} for s in report.skipped], report.adapter,
                              console.width))
    if not report.sites:
        console.print(no_sites_message(len(report.skipped)))


@app.command()
def adapters() -> None:
    """List the registered adapters (entry-point group ra_probe.adapters)."""
    from rich.table import Table

    from ra_probe.sites.registry import registered_adapters

    table = Table(title="Registered adapters", title_justify="left")
    for column in ("name", "role", "description"):
        table.add_column(column)
    for adapter in registered_adapters():
        table.add_row(adapter.name, "fallback" if adapter.fallback else "family", adapter.description)
    Console().print(table)


@app.command()
def compare(
    reports: list[Path] = typer.Argument(..., help="JSON reports written by ra-probe"),
    html_path: Optional[Path] = typer.Option(None, "--html", help="write the comparison as HTML here"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing HTML file"),
) -> None:
    """Reports side by side: verdicts, RA1–RA4, NC; RA4 slope across depths within a model family."""
    from ra_probe.report.compare import compare as compare_reports
    from ra_probe.report.console import print_comparison
    from ra_probe.report.files import read_report_file
    from ra_probe.report.html import render_comparison, write_html

    if len(reports) < 2:
        raise UserError("compare needs at least two reports")
    if html_path is not None:
        _refuse_overwrite([html_path], force)
    comparison = compare_reports([(str(path), read_report_file(path)) for path in reports])
    console = Console()
    print_comparison(comparison, console)
    if html_path is not None:
        write_html(render_comparison(comparison), html_path)
        console.print(f"comparison written to {html_path}")


@app.command()
def render(
    report: Path = typer.Argument(..., help="a JSON report written by ra-probe"),
    html_path: Optional[Path] = typer.Option(None, "--html", help="write the page here (default: the report's "
                                             "path with .html)"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing HTML file"),
) -> None:
    """The HTML page of an existing JSON report (pipelines keep the JSON and render later)."""
    from ra_probe.report.files import read_report_file
    from ra_probe.report.html import render_report, write_html

    out = html_path or report.with_suffix(".html")
    _refuse_overwrite([out], force)
    write_html(render_report(read_report_file(report)), out)
    Console().print(f"report written to {out}")


@app.command()
@probe_options()
def sweep(
    spec: list[str] = typer.Argument(..., help="a sweep file (.toml: common options, then a run table per "
                                               "model), or one or more models"),
    out: Path = typer.Option(..., "--out", help="folder of the runs' JSON reports, sweep.json and sweep.html"),
    executor: str = typer.Option("auto", help="auto (Ray when installed) | ray | local (one run after another in "
                                              "this process)"),
    address: Optional[str] = typer.Option(None, help="join a Ray cluster: auto or ray://host:port (default: a "
                                                     "local Ray instance started in this process)"),
    cpus: Optional[int] = typer.Option(None, min=1, help="CPUs of the local Ray instance (default: those this process may use)"),
    gpus_per_run: Optional[float] = typer.Option(None, min=0.0, help="GPUs per run (default: 1 when there are "
                                                 "GPUs; 0.5 lets two runs share one, 2 spans a --device-map run)"),
    cpus_per_run: Optional[int] = typer.Option(None, min=1, help="CPUs (and torch threads) per run (default: an "
                                                                  "even share)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress; the summary line only"),
    options: ProbeOptions = None,
) -> None:
    """Probe many models, or the checkpoints of one (--weights 'ckpts/*.safetensors'), as separate runs
    (on Ray when installed) into --out: a report per run, sweep.json and sweep.html. Runs already done
    with the same settings are skipped. Exit 0 all done, 1 a run failed, 2 a bad sweep."""
    from ra_probe.sweeps import sweep as run_sweep

    document = run_sweep(spec[0] if len(spec) == 1 else spec, out, executor=executor, address=address, cpus=cpus,
                         gpus_per_run=gpus_per_run, cpus_per_run=cpus_per_run, progress=not quiet,
                         **{name: options.values[name] for name in options.given})
    counts = document["counts"]
    typer.echo(f"sweep of {len(document['runs'])} runs: {counts['done']} done, {counts['skipped']} skipped, "
               f"{counts['failed']} failed [{out / 'sweep.json'}, {out / 'sweep.html'}]")
    if counts["failed"]:
        raise typer.Exit(1)


def _deprecation_line(message, category, *_args, **_kwargs) -> None:
    err.print(str(message) if category is FutureWarning else f"{category.__name__}: {message}",
              highlight=False, markup=False, soft_wrap=True)


def main(argv: Optional[list[str]] = None) -> None:
    own_process()  # before any tensor work: torch's CPU threads take the denormal mode when they start
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or (args[0].startswith("-") and args[0] not in ("--help", "-h")):
        args = ["probe", DEFAULT_MODEL, *args]  # the embedded default: the bundled trained ResNet
    elif args[0] not in COMMANDS and not args[0].startswith("-"):
        args.insert(0, "probe")  # `ra-probe MODEL` is `ra-probe probe MODEL`
    command = typer.main.get_command(app)
    try:
        with warnings.catch_warnings():  # the library's deprecations as one line each, like the CLI's own
            warnings.showwarning = _deprecation_line
            code = command.main(args, prog_name="ra-probe", standalone_mode=False)
        if isinstance(code, int) and code:  # typer.Exit(code) is returned, not raised, in this mode
            if code == 130:  # typer's code for KeyboardInterrupt
                err.print("interrupted", markup=False)
            sys.exit(code)
    except UserError as exc:
        err.print(f"error: {exc}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except ClickException as exc:
        err.print(f"error: {exc.format_message()}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        err.print("interrupted", markup=False)
        sys.exit(130)
