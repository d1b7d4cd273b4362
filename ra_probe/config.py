"""Gate configuration: a repository pins its `ra-probe check` settings once, in
`ra-probe.toml` or in the `[tool.ra-probe]` table of `pyproject.toml`. Keys are the command's option
names (`fail-below-ra2 = 0.6`, `require = ["ra"]`, `baseline = "reports/base.json"`); options given on
the command line win over the file."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ra_probe.errors import UserError, first_line

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

CONFIG_FILE = "ra-probe.toml"


def find_config(folder: Path) -> Path | None:
    """`ra-probe.toml` in `folder`, else its `pyproject.toml` when that has a `[tool.ra-probe]` table."""
    own = folder / CONFIG_FILE
    if own.is_file():
        return own
    pyproject = folder / "pyproject.toml"
    if pyproject.is_file() and "ra-probe" in _read_toml(pyproject).get("tool", {}):
        return pyproject
    return None


def read_config(path: Path) -> dict[str, Any]:
    """The settings table of `path`: the whole file, or `[tool.ra-probe]` of a pyproject.toml. Keys are
    returned with `-` replaced by `_`."""
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    data = _read_toml(path)
    if path.name == "pyproject.toml":
        data = data.get("tool", {}).get("ra-probe")
        if not isinstance(data, dict):
            raise UserError(f"{path} has no [tool.ra-probe] table")
    return {key.replace("-", "_"): value for key, value in data.items()}


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"cannot read config {path}: {first_line(exc)}") from None
