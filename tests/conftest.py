"""Shared fixtures: the bundled models probed once per test session, and the CLI run in a folder."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ra_probe.cli import main
from ra_probe.scripts.reference_reports import MODELS, reference_report

# The tests' models are tiny: one thread is faster than several, by far on a loaded CI machine.
torch.set_num_threads(1)

TINY = Path(__file__).parent / "tiny_models.py"


@pytest.fixture(scope="session", autouse=True)
def one_blas_thread():
    """numpy's and scipy's BLAS on one thread too (torch's is set above): their idle threads spin, and on
    a machine whose two cores were shared a 400 × 400 SVD took 2.4 s on two threads, 0.28 s on one; the
    metrics, options and solver tests ran in 36 s instead of 70 s."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # not installed: the libraries' own defaults
        yield
        return
    with threadpool_limits(1, user_api="blas"):
        yield


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


@pytest.fixture(scope="session", autouse=True)
def every_report_validates():
    """Every report the suite builds (probes, checks, sweeps, the CLI) is checked against the shipped
    schema as it is built: a field the schema does not know, or one it requires and a model lacks, fails
    the test that made it."""
    import ra_probe.api
    from ra_probe.report.schema import schema_errors

    build = ra_probe.api.build_report

    def validated(*args, **kwargs):
        report = build(*args, **kwargs)
        errors = schema_errors(report)
        assert not errors, f"report of {report['model']['name']} fails the schema: {errors[:3]}"
        return report
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ra_probe.api, "build_report", validated)
        yield


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
