"""Shared fixtures: the bundled models probed once per test session, and the CLI run in a folder."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ra_probe.scripts.reference_reports import MODELS, reference_report
from ra_probe.cli import main

# The tests' models are tiny: one thread is faster than several, by far on a loaded CI machine.
torch.set_num_threads(1)

TINY = Path(__file__).parent / "tiny_models.py"


@pytest.fixture(scope="session")
def bundled_reports() -> dict[str, dict]:
    """The three bundled models probed once for the whole session, with the reference reports' settings."""
    return {name: reference_report(name) for name in MODELS}


@pytest.fixture(scope="session", autouse=True)
def shared_cache(tmp_path_factory) -> Path:
    """One result cache for the whole session (never the user's): each bundled model is measured once."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RA_PROBE_CACHE", str(folder))
        yield folder


@pytest.fixture
def cli(capsys, monkeypatch, tmp_path, shared_cache):
    """Run `ra-probe ARGS` in an empty working folder: (exit code, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RA_PROBE_CACHE", str(shared_cache))

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code
        out, err = capsys.readouterr()
        return code, out, err

    return run
