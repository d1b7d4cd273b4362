"""The `ra-probe` command (spec §7): a thin Typer layer that parses options and calls one library
function per command. A user's mistake is one line on stderr and exit code 2."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ra_probe.engine.solvers import DENSE_LIMIT
from ra_probe.errors import UserError

try:  # recent Typer releases vendor click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - older Typer on plain click
    from click.exceptions import ClickException

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  help="Residual Alignment and Neural Collapse diagnostics for residual networks.\n\n"
                       "Usage: ra-probe [MODEL] [options] (default MODEL: bundled/fc-digits), or one of the commands below.")
COMMANDS = {"probe", "check", "sites", "adapters", "compare"}
DEFAULT_MODEL = "bundled/fc-digits"
DEFAULT_OUT = "reports"
err = Console(stderr=True)


def _shape(text: Optional[str]) -> Optional[tuple[int, ...]]:
    if text is None:
        return None
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise UserError(f"--input-shape must be integers like 3,224,224, got {text!r}") from None
    if not shape or min(shape) <= 0:
        raise UserError(f"--input-shape must be positive integers, got {text!r}")
    return shape


ModelArg = typer.Argument(..., help="bundled/<name>, timm/<name>, hf/<org>/<name>, a folder, a checkpoint "
                                    "(with --arch), or a factory file.py:fn / package.module:fn")
NoPretrained = typer.Option(False, "--no-pretrained", help="random init for timm models")
Weights = typer.Option(None, help="state dict (safetensors or torch) loaded strictly into the model")
Arch = typer.Option(None, help="architecture of a checkpoint file, as a model reference")
InputShape = typer.Option(None, help="per-sample input shape, e.g. 3,224,224 (factories, synthetic data)")
Data = typer.Option(None, help="bundled/digits, a .npz with x (and y), a .txt file (one example per line, text "
                                "models), an image folder (class sub-folders give labels), or synthetic; default: "
                                "the model's own")
Samples = typer.Option(64, min=1, help="at most this many samples")


def _load(model: str, no_pretrained: bool, weights: Optional[Path], arch: Optional[str], input_shape: Optional[str]):
    from ra_probe.sources import load_model

    return load_model(model, pretrained=not no_pretrained, weights=None if weights is None else str(weights),
                      arch=arch, input_shape=_shape(input_shape))


K = typer.Option(16, min=1, help="singular triplets per site and sample")
AlignK = typer.Option(None, min=1, help="K of the RA2 alignment (default: k)")
Tol = typer.Option(1e-3, min=0.0, help="relative residual tolerance of the iterative solver")
Solver = typer.Option("auto", help="auto (dense where forming J costs fewer products than a Krylov solve, "
                                   "else block) | dense | block")
DenseLimit = typer.Option(DENSE_LIMIT, min=0, help="auto solver: never form J for sites with more dimensions "
                                                  "than this")
Tau = typer.Option(1e-2, min=0.0, help="RA3 numerical rank threshold σ_k > τ σ₁")
BatchSize = typer.Option(None, min=1, help="samples per chunk (default: the most that fit in the device's free memory)")
DType = typer.Option("float32", help="float32 | float64")
Device = typer.Option(None, help="cpu, cuda, cuda:1… (default: cuda when present)")
Seed = typer.Option(0)
Force = typer.Option(False, "--force", help="overwrite an existing report file")
NoCache = typer.Option(False, "--no-cache", help="measure everything anew (cache: $RA_PROBE_CACHE or ~/.cache/ra-probe)")


def _settings(k: int, align_k: Optional[int], samples: int, batch_size: Optional[int], tol: float, solver: str,
              dense_limit: int, tau: float, dtype: str, device: Optional[str], seed: int):
    from ra_probe.engine import SOLVERS
    from ra_probe.probe import DTYPES, Settings

    if solver not in SOLVERS:
        raise UserError(f"--solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    settings = Settings(k=k, align_k=align_k, samples=samples, batch_size=batch_size, tol=tol, solver=solver,
                        dense_limit=dense_limit, tau=tau, dtype=dtype, device=device, seed=seed)
    _check_device(settings)
    return settings


def _run_probe(loaded, data: Optional[str], settings, *, quiet: bool, no_cache: bool) -> dict:
    """Samples for `loaded`, then the probe with a progress bar on stderr and the result cache."""
    from ra_probe.cache import ResultCache
    from ra_probe.data import load_samples
    from ra_probe.probe import probe as run_probe

    sample_set = load_samples(data, loaded, limit=settings.samples, seed=settings.seed)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True, quiet=quiet), transient=True) as bar:
        task = bar.add_task("probing", total=None)

        def progress(name: str, done: int, total: int) -> None:
            bar.update(task, description=f"probing {name}", completed=done, total=total)

        cache = None if no_cache else ResultCache()
        report = run_probe(loaded, sample_set, settings, progress, cache=cache)
    if cache is not None and cache.hits:  # timings of these entries are those of the run that measured them
        report["messages"].append(f"{cache.hits} of {cache.hits + cache.misses} group measurements served from "
                                  f"the cache in {cache.folder} (--no-cache measures anew)")
    return report


@app.command()
def probe(
    model: str = ModelArg,
    data: Optional[str] = Data,
    samples: int = Samples,
    k: int = K, align_k: Optional[int] = AlignK, tol: float = Tol, solver: str = Solver,
    dense_limit: int = DenseLimit, tau: float = Tau,
    batch_size: Optional[int] = BatchSize, dtype: str = DType, device: Optional[str] = Device, seed: int = Seed,
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the JSON report here"),
    html_path: Optional[Path] = typer.Option(None, "--html", help="write the HTML report here"),
    out: Optional[Path] = typer.Option(None, "--out", help="folder for <model>-<timestamp>.json and .html "
                                       "(default reports/, used when --json and --html are not given)"),
    force: bool = Force,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no tables or progress; the verdict line only"),
    no_cache: bool = NoCache,
    no_pretrained: bool = NoPretrained, weights: Optional[Path] = Weights, arch: Optional[str] = Arch,
    input_shape: Optional[str] = InputShape,
) -> None:
    """Probe MODEL: residual sites, Jacobian spectra, RA1–RA4, NC1–NC4 and the verdict."""
    from ra_probe.console import print_report
    from ra_probe.html import render_report, write_html
    from ra_probe.report import write_json

    paths = _report_paths(model, json_path, html_path, out)
    _refuse_overwrite(paths.values(), force)
    settings = _settings(k, align_k, samples, batch_size, tol, solver, dense_limit, tau, dtype, device, seed)
    loaded = _load(model, no_pretrained, weights, arch, input_shape)
    report = _run_probe(loaded, data, settings, quiet=quiet, no_cache=no_cache)
    console = Console(quiet=quiet)
    print_report(report, console)
    if ".json" in paths:
        write_json(report, paths[".json"])
    if ".html" in paths:
        write_html(render_report(report), paths[".html"])
    for path in paths.values():
        console.print(f"report written to {path}")
    if quiet:
        typer.echo(f"{report['model']['name']}: RA {report['verdict']['ra']}, NC {report['verdict']['nc']}")


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
    defaults = {}
    for key, value in read_config(path).items():
        param = by_key.get(key)
        if param is None:
            known = ", ".join(sorted(k.replace("_", "-") for k in by_key))
            raise UserError(f"{path}: unknown setting {key.replace('_', '-')!r} (known: {known})")
        defaults[param.name] = [value] if param.multiple and isinstance(value, str) else value
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return path


@app.command()
def check(
    model: str = typer.Argument(DEFAULT_MODEL, help="the model to gate, as for probe"),
    require: Optional[list[str]] = typer.Option(None, help="ra | nc: fail unless that verdict is present (repeatable)"),
    baseline: Optional[Path] = typer.Option(None, help="a report JSON: fail if a verdict gets worse or a metric "
                                                        "moves beyond --tolerance"),
    tolerance: float = typer.Option(0.05, min=0.0, help="allowed move from the baseline: relative for values above "
                                                        "1, absolute below"),
    min_alignment: Optional[float] = typer.Option(None, help="fail if the RA2 mean alignment a_ij is lower"),
    min_linearity: Optional[float] = typer.Option(None, help="fail if the RA1 mean linearity is lower"),
    max_rank: Optional[float] = typer.Option(None, help="fail if the median over sites of the RA3 rank is higher"),
    max_nc1: Optional[float] = typer.Option(None, help="fail if NC1 is higher"),
    max_nc4: Optional[float] = typer.Option(None, help="fail if NC4 is higher"),
    config: Optional[Path] = typer.Option(None, "--config", is_eager=True, callback=_apply_config,
                                          help="settings file (default: ./ra-probe.toml, or the tool.ra-probe "
                                               "table of ./pyproject.toml)"),
    data: Optional[str] = Data, samples: int = Samples,
    k: int = K, align_k: Optional[int] = AlignK, tol: float = Tol, solver: str = Solver,
    dense_limit: int = DenseLimit, tau: float = Tau,
    batch_size: Optional[int] = BatchSize, dtype: str = DType, device: Optional[str] = Device, seed: int = Seed,
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the report here (default: "
                                                                  "reports/<model>.check.json)"),
    force: bool = Force,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="also print the report's tables (on stderr)"),
    no_cache: bool = NoCache,
    no_pretrained: bool = NoPretrained, weights: Optional[Path] = Weights, arch: Optional[str] = Arch,
    input_shape: Optional[str] = InputShape,
) -> None:
    """CI gate: probe MODEL and judge the report. Exit 0 pass, 1 fail, 2 usage or input error; one
    summary line on stdout; the JSON report of the run (with the gate's checks) is written."""
    from ra_probe.console import print_report
    from ra_probe.gate import GateRules, judge, read_baseline, summary_line
    from ra_probe.report import file_safe, write_json

    wanted = tuple(dict.fromkeys(part.strip() for text in require or () for part in text.split(",")))
    if not set(wanted) <= {"ra", "nc"}:
        raise UserError(f"--require takes ra or nc, got {', '.join(wanted)}")
    settings = _settings(k, align_k, samples, batch_size, tol, solver, dense_limit, tau, dtype, device, seed)
    limits = {name: value for name, value in (("min_alignment", min_alignment), ("min_linearity", min_linearity),
                                              ("max_rank", max_rank), ("max_nc1", max_nc1), ("max_nc4", max_nc4))
              if value is not None}
    rules = GateRules(require=wanted, limits=limits, tolerance=tolerance,
                      baseline=None if baseline is None else read_baseline(baseline, settings.as_dict()))
    if not rules.require and not rules.limits and rules.baseline is None:
        raise UserError("check needs a rule: --require ra/nc, --baseline REPORT.json or a limit such as "
                        "--min-alignment (or a config file that sets them)")
    loaded = _load(model, no_pretrained, weights, arch, input_shape)
    out = json_path or Path(DEFAULT_OUT) / f"{file_safe(loaded.name)}.check.json"
    if out.exists() and not force and not (json_path is None and _is_report(out)):
        raise UserError(f"{out} exists; pass --force to overwrite it")
    report = _run_probe(loaded, data, settings, quiet=not verbose, no_cache=no_cache)
    if verbose:
        print_report(report, err)
    result = judge(report, rules)
    report["gate"] = {**result.as_dict(), "rules": {"require": list(rules.require), "limits": rules.limits,
                                                    "baseline": None if baseline is None else str(baseline),
                                                    "tolerance": rules.tolerance}}
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

    from ra_probe.report import default_report_path

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


def _check_device(settings) -> None:
    import torch

    device = settings.resolved_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {settings.device}: CUDA is not available here")


@app.command()
def sites(
    model: str = ModelArg, data: Optional[str] = Data,
    no_pretrained: bool = NoPretrained, weights: Optional[Path] = Weights, arch: Optional[str] = Arch,
    input_shape: Optional[str] = InputShape,
) -> None:
    """List the residual sites found in MODEL (and those skipped, with the reason), without probing."""
    from ra_probe.console import sites_table
    from ra_probe.data import load_samples
    from ra_probe.probe import Settings, discover, prepare

    loaded = _load(model, no_pretrained, weights, arch, input_shape)
    settings = Settings()
    sample_set = load_samples(data, loaded, limit=4)
    report = discover(prepare(loaded.module, settings), sample_set, settings)
    console = Console()
    console.print(sites_table([s.describe() for s in report.sites],
                              [{"name": s.name, "reason": s.reason} for s in report.skipped], report.adapter))
    if not report.sites:
        console.print("no residual connections found")


@app.command()
def adapters() -> None:
    """List the registered adapters (entry-point group ra_probe.adapters)."""
    from rich.table import Table

    from ra_probe.sites import registered_adapters

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
    from ra_probe.compare import compare as compare_reports
    from ra_probe.console import print_comparison
    from ra_probe.html import render_comparison, write_html
    from ra_probe.report import load_report

    if len(reports) < 2:
        raise UserError("compare needs at least two reports")
    if html_path is not None:
        _refuse_overwrite([html_path], force)
    comparison = compare_reports([(str(path), load_report(path)) for path in reports])
    console = Console()
    print_comparison(comparison, console)
    if html_path is not None:
        write_html(render_comparison(comparison), html_path)
        console.print(f"comparison written to {html_path}")


def main(argv: Optional[list[str]] = None) -> None:
    # Flush subnormal floats to zero (engine.solvers: ~100× slower on x86) in torch's CPU threads too:
    # they inherit the mode from this thread when they start, so it is set before any tensor work.
    torch.set_flush_denormal(True)
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or (args[0].startswith("-") and args[0] not in ("--help", "-h")):
        args = ["probe", DEFAULT_MODEL, *args]  # the embedded default: the bundled trained ResNet
    elif args[0] not in COMMANDS and not args[0].startswith("-"):
        args.insert(0, "probe")  # `ra-probe MODEL` is `ra-probe probe MODEL`
    command = typer.main.get_command(app)
    try:
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
