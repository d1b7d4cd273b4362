"""Shared fixtures: the bundled models probed once per test session."""
from __future__ import annotations

import pytest

from ra_probe.data import load_samples
from ra_probe.probe import Settings, probe
from ra_probe.sources import load_model


def probe_bundled(name: str, **settings) -> dict:
    loaded = load_model(f"bundled/{name}")
    return probe(loaded, load_samples(None, loaded, limit=64), Settings(**settings))


@pytest.fixture(scope="session")
def bundled_reports() -> dict[str, dict]:
    return {name: probe_bundled(name) for name in ("fc-digits", "fc-digits-lowwd", "fc-digits-noskip")}
