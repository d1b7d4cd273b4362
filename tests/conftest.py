import sys
from pathlib import Path

import pytest
import torch

from ra_probe.cli import main

# The tests' models are tiny: one thread is faster than several, by far on a loaded CI machine.
torch.set_num_threads(1)

TINY = Path(__file__).parent / "tiny_models.py"


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One result cache for the tests that probe the bundled models, so each is measured once."""
    return tmp_path_factory.mktemp("cache")


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
