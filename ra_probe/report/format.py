"""How every report output prints a value: the console, the HTML pages and the gate's lines alike."""
from __future__ import annotations

from typing import Any


def fmt(value: Any, digits: int = 3) -> str:
    """None as "–", booleans as yes/no, floats with `digits` significant digits, the rest as str()."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)
