"""Reference reports of the bundled models, committed under examples/reports/ so a reader sees what
the diagnosis looks like with RA (fc-digits) and without (the two controls), and so tests can check
that the numbers still come out the same. Regenerate them from the repository root with
`python -m ra_probe.scripts.reference_reports` (about a minute on one core)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

MODELS = ("fc-digits", "fc-digits-lowwd", "fc-digits-noskip")
FOLDER = Path("examples/reports")


def reference_settings():
    """The default settings, pinned to the CPU so the numbers do not depend on the machine's GPU."""
    from ra_probe.pipeline.settings import Settings

    return Settings(device="cpu")


def reference_report(name: str) -> dict[str, Any]:
    """The report of `bundled/<name>` on its own data, exactly as `ra-probe bundled/<name> --device cpu` makes it."""
    from ra_probe.api import probe
    from ra_probe.load.data import load_samples
    from ra_probe.load.models import load_model

    settings = reference_settings()
    loaded = load_model(f"bundled/{name}")
    return probe(loaded, load_samples(None, loaded, limit=settings.sample_limit, seed=settings.seed), settings).to_dict()


def main(folder: Path = FOLDER) -> None:
    """Write <name>.json and <name>.html for every bundled model, and compare.html of the three."""
    from ra_probe.report.compare import compare
    from ra_probe.report.files import write_json
    from ra_probe.report.html import render_comparison, render_report, write_html
    from ra_probe.report.view import view_of

    reports = []
    for name in MODELS:
        report = reference_report(name)
        write_json(report, folder / f"{name}.json")
        write_html(render_report(report), folder / f"{name}.html")
        reports.append((f"{name}.json", report))
        view = view_of(report)
        print(f"{folder / name}.{{json,html}}: RA {view.status('ra')}, NC {view.status('nc')}")
    write_html(render_comparison(compare(reports)), folder / "compare.html")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else FOLDER)
