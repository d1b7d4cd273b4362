"""The wheel carries everything a non-editable install needs: every module of ra_probe/ (its adapters included),
the bundled weights, the templates and the JSON schema, and the adapters' entry points."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_holds_every_module_and_data_file(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("ra_probe-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"ra_probe/{p.relative_to(ROOT / 'ra_probe').as_posix()}" for p in (ROOT / "ra_probe").rglob("*")
                if p.is_file() and p.suffix in (".py", ".json", ".j2", ".safetensors") and "__pycache__" not in p.parts}
    assert expected - names == set()
    assert any(n.endswith(".safetensors") for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[ra_probe.adapters]" in text and "generic = ra_probe.plugins.generic:ADAPTER" in text
