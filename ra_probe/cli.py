"""The `ra-probe` command (spec §7): a thin Typer layer that parses options and calls one library
function per command. A user's mistake is one line on stderr and exit code 2."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ra_probe.errors import UserError

try:  # recent Typer releases vendor click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - older Typer on plain click
    from click.exceptions import ClickException

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  help="Residual Alignment and Neural Collapse diagnostics for residual networks.\n\n"
                       "Usage: ra-probe [MODEL] [options] (default MODEL: bundled/fc-digits), or one of the commands below.")
COMMANDS = {"probe", "sites", "adapters", "compare"}
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
                                "models), or synthetic; default: the model's own")
Samples = typer.Option(64, min=1, help="at most this many samples")


def _load(model: str, no_pretrained: bool, weights: Optional[Path], arch: Optional[str], input_shape: Optional[str]):
    from ra_probe.sources import load_model

    return load_model(model, pretrained=not no_pretrained, weights=None if weights is None else str(weights),
                      arch=arch, input_shape=_shape(input_shape))


@app.command()
def probe(
    model: str = ModelArg,
    data: Optional[str] = Data,
    samples: int = Samples,
    k: int = typer.Option(16, min=1, help="singular triplets per site and sample"),
    align_k: Optional[int] = typer.Option(None, min=1, help="K of the RA2 alignment (default: k)"),
    tol: float = typer.Option(1e-3, min=0.0, help="relative residual tolerance of the iterative solver"),
    solver: str = typer.Option("auto", help="auto | dense | lanczos"),
    tau: float = typer.Option(1e-2, min=0.0, help="RA3 numerical rank threshold σ_k > τ σ₁"),
    batch_size: int = typer.Option(32, min=1, help="samples per chunk (memory)"),
    dtype: str = typer.Option("float32", help="float32 | float64"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1… (default: cuda when present)"),
    seed: int = typer.Option(0),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the JSON report here"),
    html_path: Optional[Path] = typer.Option(None, "--html", help="write the HTML report here"),
    out: Optional[Path] = typer.Option(None, "--out", help="folder for <model>-<timestamp>.json and .html "
                                       "(default reports/, used when --json and --html are not given)"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing report file"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no tables or progress; the verdict line only"),
    no_pretrained: bool = NoPretrained, weights: Optional[Path] = Weights, arch: Optional[str] = Arch,
    input_shape: Optional[str] = InputShape,
) -> None:
    """Probe MODEL: residual sites, Jacobian spectra, RA1–RA4, NC1–NC4 and the verdict."""
    from ra_probe.console import print_report
    from ra_probe.data import load_samples
    from ra_probe.probe import DTYPES, Settings
    from ra_probe.probe import probe as run_probe
    from ra_probe.html import render_report, write_html
    from ra_probe.report import write_json

    if solver not in ("auto", "dense", "lanczos"):
        raise UserError(f"--solver must be auto, dense or lanczos, got {solver!r}")
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    paths = _report_paths(model, json_path, html_path, out)
    _refuse_overwrite(paths.values(), force)
    settings = Settings(k=k, align_k=align_k, samples=samples, batch_size=batch_size, tol=tol, solver=solver,
                        tau=tau, dtype=dtype, device=device, seed=seed)
    _check_device(settings)
    loaded = _load(model, no_pretrained, weights, arch, input_shape)
    sample_set = load_samples(data, loaded, limit=samples, seed=seed)
    console = Console(quiet=quiet)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True, quiet=quiet), transient=True) as bar:
        task = bar.add_task("probing", total=None)

        def progress(name: str, done: int, total: int) -> None:
            bar.update(task, description=f"probing {name}", completed=done, total=total)

        report = run_probe(loaded, sample_set, settings, progress)
    print_report(report, console)
    if ".json" in paths:
        write_json(report, paths[".json"])
    if ".html" in paths:
        write_html(render_report(report), paths[".html"])
    for path in paths.values():
        console.print(f"report written to {path}")
    if quiet:
        typer.echo(f"{report['model']['name']}: RA {report['verdict']['ra']}, NC {report['verdict']['nc']}")


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
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or (args[0].startswith("-") and args[0] not in ("--help", "-h")):
        args = ["probe", DEFAULT_MODEL, *args]  # the embedded default: the bundled trained ResNet
    elif args[0] not in COMMANDS and not args[0].startswith("-"):
        args.insert(0, "probe")  # `ra-probe MODEL` is `ra-probe probe MODEL`
    command = typer.main.get_command(app)
    try:
        command.main(args, prog_name="ra-probe", standalone_mode=False)
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
