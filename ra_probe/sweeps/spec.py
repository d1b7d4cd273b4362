"""What a sweep measures: runs read from a sweep file (common options at the top, one `[[run]]` table
per model) or from model references on the command line, every one checked before anything starts —
unknown keys, bad values, missing files and duplicate names are a UserError naming the run."""
from __future__ import annotations

import glob
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ra_probe.api import LOADING_OPTIONS, settings_from
from ra_probe.errors import UserError, first_line
from ra_probe.load.sources.registry import find_source
from ra_probe.load.weights import CHECKPOINT_SUFFIXES, sha256_of
from ra_probe.pipeline.options import (
    OPTIONS,
    SWEEP_KEYS,
    SWEEP_ROLES,
    current_names,
    library_warning,
    normalized,
    refuse_bad,
)
from ra_probe.pipeline.settings import Settings
from ra_probe.report.files import file_safe

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

RUN_KEYS = ("model", "name", "step")  # keys of a run that are not probe options
FORMER = {old for name in SWEEP_KEYS for old in OPTIONS[name].was}  # former names, taken with a warning
NEGATED = {OPTIONS[name].cli_name: name for name in SWEEP_KEYS if OPTIONS[name].negated}  # no_cache: cache
GLOB = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class Run:
    """One model (or checkpoint) to probe: its reference, data, settings and loading options."""

    name: str
    model: str
    data: str | None
    settings: Settings
    loading: dict[str, Any] = field(default_factory=dict)  # pretrained, weights, arch, input_shape, device_map
    cache: bool = True
    step: int | None = None  # the training step of a checkpoint, from its file name or given

    def key(self) -> str:
        """A digest of everything the run's numbers depend on: the model reference, the content of the
        files it names (weights, checkpoint, factory, data), the data reference and every setting."""
        files = {what: sha256_of(Path(path)) for what, path in self.files().items() if Path(path).is_file()}
        identity = {"model": self.model, "data": self.data, "loading": self.loading, "files": files,
                    "settings": self.settings.as_dict()}
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()

    def files(self) -> dict[str, str]:
        """The local files and folders the run reads, by role."""
        found = {"model": _local_part(self.model), "weights": self.loading.get("weights"),
                 "arch": _local_part(self.loading.get("arch")), "data": _local_data(self.data)}
        return {what: path for what, path in found.items() if path}


@dataclass(frozen=True)
class SweepSpec:
    runs: list[Run]
    source: str  # the sweep file, or "command line"


def read_spec(spec: str | Path | Sequence[str], options: dict[str, Any] | None = None) -> SweepSpec:
    """The runs of `spec`: a sweep file (`.toml`), a model reference, or several. `options` (named as
    for `ra_probe.probe`) apply to every run and win over the file; a `weights` glob gives one run per
    checkpoint, in the order of the number in their names (training steps)."""
    options = _normalized(dict(options or {}), "the options")
    if isinstance(spec, (str, Path)) and str(spec).endswith(".toml"):
        path = Path(spec)
        common, tables = _read_file(path)
        source = str(path)
    else:
        refs = [str(spec)] if isinstance(spec, (str, Path)) else [str(s) for s in spec]
        if not refs:
            raise UserError("a sweep needs a sweep file (.toml) or at least one model")
        if any(ref.endswith(".toml") for ref in refs):
            raise UserError("give one sweep file (.toml), or model references, not both")
        common, tables, source = {}, [{"model": ref} for ref in refs], "command line"
    runs = []
    for index, table in enumerate(tables, 1):
        where = f"{source}: run {index}" + (f" ({table['name']})" if "name" in table else "")
        runs.extend(_runs({**common, **table, **options}, where))
    runs = _with_steps(_distinct_names(runs))
    names = [run.name for run in runs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UserError(f"{source}: run names must differ, repeated: {', '.join(repeated)} (give each run a name)")
    return SweepSpec(runs, source)


def _read_file(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The common options and the run tables of a sweep file."""
    if not path.is_file():
        raise UserError(f"sweep file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"cannot read sweep file {path}: {first_line(exc)}") from None
    tables = data.pop("run", None)
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise UserError(f"{path}: no runs; add one [[run]] table per model (with model = \"…\")")
    common = _normalized(data, str(path))
    return common, [_normalized(table, f"{path}: run {i}") for i, table in enumerate(tables, 1)]


def _normalized(table: dict[str, Any], where: str) -> dict[str, Any]:
    """Keys with `-` as `_`, `no_cache`/`no_pretrained` as their positive options, former names as the
    current ones (with a FutureWarning); unknown keys refused."""
    out = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name in NEGATED:
            if not isinstance(value, bool):
                raise UserError(f"{where}: {key} must be true or false, got {value!r}")
            name, value = NEGATED[name], not value
        if name not in SWEEP_KEYS and name not in RUN_KEYS and name not in FORMER:
            known = ", ".join(k.replace("_", "-") for k in (*RUN_KEYS, *SWEEP_KEYS))
            raise UserError(f"{where}: unknown key {key!r} (known: {known})")
        out[name] = value
    return current_names(out, SWEEP_ROLES, lambda line: library_warning(f"{line} ({where})"),
                         spell=lambda name: name.replace("_", "-"))


def _runs(table: dict[str, Any], where: str) -> list[Run]:
    """The run of one table, or one run per checkpoint when its weights are a glob pattern."""
    table = {key: value for key, value in table.items() if value is not None}
    model = table.pop("model", None)
    if not isinstance(model, str) or not model:
        raise UserError(f"{where}: no model (model = \"timm/resnet18\", \"nets.py:build\", …)")
    weights = table.get("weights")
    if isinstance(weights, (str, Path)) and GLOB.search(str(weights)):
        matches = sorted(glob.glob(str(weights)), key=lambda p: (_step_of(p) is None, _step_of(p) or 0, p))
        if not matches:
            raise UserError(f"{where}: no file matches the weights pattern {weights}")
        prefix = table.pop("name", None)
        return [_run(model, {**table, "weights": path,
                             "name": f"{prefix}-{Path(path).stem}" if prefix else Path(path).stem}, where)
                for path in matches]
    return [_run(model, table, where)]


def _run(model: str, table: dict[str, Any], where: str) -> Run:
    table = dict(table)
    name, step, data = table.pop("name", None), table.pop("step", None), table.pop("data", None)
    cache = table.pop("cache", True)
    loading = {key: normalized(key, table.pop(key)) for key in LOADING_OPTIONS if key in table}
    try:
        settings = settings_from(table)
        refuse_bad({**loading, "cache": cache})
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    if data is not None and not isinstance(data, str):
        raise UserError(f"{where}: data must be a data reference (text), got {data!r}")
    if step is not None and (not isinstance(step, int) or isinstance(step, bool)):
        raise UserError(f"{where}: step must be an integer, got {step!r}")
    if name is None:
        name = _default_name(model, loading)
    if not isinstance(name, str) or file_safe(name) != name:
        raise UserError(f"{where}: name {name!r} must be usable as a file name (letters, digits, '.', '_', '-')")
    run = Run(name, model, data, settings, loading, cache, step)
    _check_files(run, where)
    return run


def _default_name(model: str, loading: dict[str, Any]) -> str:
    """A run's name when none is given: its checkpoint's file name without suffix, else the model reference."""
    checkpoint = _checkpoint(model, loading)
    return Path(checkpoint).stem if checkpoint else file_safe(model)


def _distinct_names(runs: list[Run]) -> list[Run]:
    """Runs named after their checkpoints whose names collide (every one `model.safetensors`, each in a
    folder of its own) named by as many of their folders as tell them apart: `a-model`, `b-model`. A
    name that was given stays, and collides as it does."""
    from dataclasses import replace

    by_name: dict[str, list[int]] = {}
    for index, run in enumerate(runs):
        by_name.setdefault(run.name, []).append(index)
    renamed = list(runs)
    for indices in by_name.values():
        paths = [_checkpoint(runs[i].model, runs[i].loading) for i in indices]
        if len(indices) < 2 or None in paths or any(runs[i].name != _default_name(runs[i].model, runs[i].loading)
                                                    for i in indices):
            continue
        parts = [Path(path).resolve().with_suffix("").parts for path in paths]
        for depth in range(2, max(map(len, parts)) + 1):
            names = [file_safe("-".join(p[-depth:])) for p in parts]
            if len(set(names)) == len(names):
                for i, new in zip(indices, names):
                    renamed[i] = replace(runs[i], name=new)
                break
    return renamed


def _check_files(run: Run, where: str) -> None:
    """Every local file or folder the run names must be there; references must have a known form."""
    try:
        source = find_source(run.model)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    if source.name == "checkpoint" and "arch" not in run.loading:
        raise UserError(f"{where}: checkpoint {run.model} needs arch = \"…\" to say which architecture it holds")
    for what, path in run.files().items():
        if not Path(path).exists():
            raise UserError(f"{where}: {what} file not found: {path}")


def _local_part(ref: str | None) -> str | None:
    """The local file or folder a model reference names (a factory's .py file), if any."""
    if not ref or ref.startswith(("bundled/", "timm/", "hf/")):
        return None
    if ref.endswith(CHECKPOINT_SUFFIXES) or Path(ref).is_dir():
        return ref
    target = ref.rpartition(":")[0]
    return target if target.endswith(".py") else None


def _local_data(ref: str | None) -> str | None:
    """The local file or folder a data reference names, if any."""
    if not ref or ref == "synthetic" or ref.startswith(("bundled/", "hf-data/")):
        return None
    return ref


def _checkpoint(model: str, loading: dict[str, Any]) -> str | None:
    """The checkpoint file a run loads: its weights, or the model itself when that is a checkpoint."""
    return loading.get("weights") or (model if model.endswith(CHECKPOINT_SUFFIXES) else None)


def _with_steps(runs: list[Run]) -> list[Run]:
    """Checkpoints of one architecture (two or more runs of the same model and arch, each with a number
    in its checkpoint's name) get that number as their training step, unless a step is given."""
    from dataclasses import replace

    by_model: dict[tuple, list[Run]] = {}
    for run in runs:
        by_model.setdefault((run.model, run.loading.get("arch")), []).append(run)
    steps = {}
    for members in by_model.values():
        found = {run.name: _step_of(_checkpoint(run.model, run.loading) or "") for run in members}
        if len(members) >= 2 and None not in found.values():
            steps.update(found)
    return [replace(run, step=steps[run.name]) if run.step is None and run.name in steps else run for run in runs]


def _step_of(path: str | Path) -> int | None:
    """The last number in a file's name: a checkpoint's training step ("ckpt-step1200.safetensors" → 1200)."""
    numbers = re.findall(r"\d+", Path(path).stem)
    return int(numbers[-1]) if numbers else None
