"""Every option defined once: its name (the library's keyword and the key of `ra-probe.toml` and sweep
files), default, the constraint its values must meet (with upper bounds where a value has one), help
text, command-line spelling, former names, and whether it enters the result cache's key or must match a
baseline. The CLI's options, `Settings` and its validation, the library's keywords, the gate's limits
and the keys of config and sweep files are all made from `OPTIONS`, so a value one of them refuses
every one refuses with the same line.

Verdict thresholds (`ra2_min`, `nc1_max`…: how a probe judges its own numbers) and gate limits
(`fail_below_ra2`, `fail_above_nc1`…: what `check` fails a run on) are distinct options."""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

from ra_probe.engine.solvers import DENSE_LIMIT, SOLVERS
from ra_probe.errors import UserError
from ra_probe.metrics.verdict import Thresholds

DTYPES = ("float32", "float64")
NULLS = ("init", "none")
TOKENS = ("all", "last")  # token positions whose Jacobians are measured (text models)
LEVELS = ("auto", "block", "sublayer")  # transformer sites: the family's default, whole blocks, or attention and MLP


class Constraint:
    """What values an option takes: `accepts(value)`, and `text`, what a refusal says it must be."""

    text = ""

    def accepts(self, value: Any) -> bool:
        raise NotImplementedError


@dataclass(frozen=True)
class Integer(Constraint):
    low: int

    @property
    def text(self) -> str:
        return "a positive integer" if self.low == 1 else f"an integer ≥ {self.low}"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= self.low


@dataclass(frozen=True)
class Real(Constraint):
    low: float | None = None  # None: any finite number
    high: float | None = None  # None: no upper bound

    @property
    def text(self) -> str:
        if self.high is not None:
            return f"a number from {self.low:g} to {self.high:g}"
        return "a finite number" if self.low is None else f"a number ≥ {self.low:g}"

    def accepts(self, value: Any) -> bool:
        return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                and (self.low is None or value >= self.low) and (self.high is None or value <= self.high))


SHARE = Real(0.0, 1.0)  # scores, shares and linearities: from 0 to 1


@dataclass(frozen=True)
class Between(Constraint):
    """A number strictly between `low` and `high`."""

    low: float
    high: float

    @property
    def text(self) -> str:
        return f"a number between {self.low:g} and {self.high:g}"

    def accepts(self, value: Any) -> bool:
        return Real().accepts(value) and self.low < value < self.high


@dataclass(frozen=True)
class OneOf(Constraint):
    values: tuple[str, ...]

    @property
    def text(self) -> str:
        return f"one of {', '.join(self.values)}"

    def accepts(self, value: Any) -> bool:
        return value in self.values


@dataclass(frozen=True)
class Kind(Constraint):
    """A value of one of `types`, described as `text`."""

    types: tuple[type, ...]
    text: str = ""

    def accepts(self, value: Any) -> bool:
        return isinstance(value, self.types) and not (bool not in self.types and isinstance(value, bool))


@dataclass(frozen=True)
class WordOrInteger(Constraint):
    """One of `words`, or an integer ≥ 1."""

    words: tuple[str, ...]

    @property
    def text(self) -> str:
        return f"{', '.join(self.words)} or a positive integer"

    def accepts(self, value: Any) -> bool:
        return value in self.words or Integer(1).accepts(value)


class Duration(Constraint):
    text = "a duration such as 90s, 10m or 1h (seconds without a unit)"

    def accepts(self, value: Any) -> bool:
        return Real(0.0).accepts(value) and value > 0


def seconds_of(text: Any) -> Any:
    """"90s", "10m", "1.5h" or a number as seconds; the text itself when it is none of these (the
    constraint then refuses it)."""
    if not isinstance(text, str):
        return text
    units = {"s": 1, "m": 60, "min": 60, "h": 3600}
    stripped = text.strip()
    number = stripped.rstrip("smhin")
    unit = stripped[len(number):]
    try:
        seconds = float(number) * units[unit or "s"]
    except (ValueError, KeyError):
        return text
    return int(seconds) if seconds.is_integer() else seconds  # as a settings file writes the number


def word_or_integer(text: str) -> str | int:
    return int(text) if text.strip().isdigit() else text


class Integers(Constraint):
    text = "positive integers like 10,30"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, tuple) and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in value)


class Shape(Constraint):
    text = "positive integers like 3,224,224"

    def accepts(self, value: Any) -> bool:
        return (isinstance(value, tuple) and len(value) > 0
                and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in value))


def parse_shape(text: str) -> tuple[int, ...] | str:
    """A shape written as text ("3,224,224" or "3x224x224") as a tuple; the text itself when it is not
    integers (the constraint then refuses it)."""
    try:
        return tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        return text


ROLES = ("setting", "threshold", "limit", "gate", "loading", "data", "cache")


@dataclass(frozen=True)
class Option:
    """One probe option. `role`: setting (a `Settings` field), threshold (a verdict threshold: how the
    probe judges its own numbers), limit (a gate limit of `check`: a metric the run must stay within),
    gate (another rule of `check`), loading (how the model is loaded), data or cache. `cli`: its flag
    when not `--name`, None when the command line has none; a flag starting `--no-` turns a default-true
    option off. `cli_type`: what Typer parses, and `from_cli` turns that into the library's value.
    `in_cache_key`: a setting that changes what is measured, so a part of a cached result's key;
    `must_match_baseline`: a setting a run and its baseline must share for their numbers to compare
    (`before`: the value a report made before the setting existed measured with). `was`: its former
    names, still accepted with a deprecation warning. `metric`: a limit's headline metric."""

    name: str
    default: Any
    constraint: Constraint | None
    help: str
    role: str = "setting"
    cli: str | None = ""
    cli_type: Any = None
    from_cli: Callable[[Any], Any] | None = None
    in_cache_key: bool = False
    must_match_baseline: bool = False
    before: Any = None
    was: tuple[str, ...] = ()
    metric: str | None = None

    @property
    def flag(self) -> str | None:
        return None if self.cli is None else self.cli or f"--{self.name.replace('_', '-')}"

    @property
    def negated(self) -> bool:
        """Whether the command line spells it `--no-<name>` (the flag turns the option off)."""
        return bool(self.flag and self.flag.startswith("--no-"))

    @property
    def cli_name(self) -> str | None:
        """The parameter's name on the command line and in `ra-probe.toml`, with `_` for `-`."""
        return None if self.flag is None else self.flag.removeprefix("--").replace("-", "_")

    @property
    def lower(self) -> bool:
        """A limit: whether it is a lower bound of its metric (`fail_below_…`)."""
        return self.name.startswith("fail_below_")

    def library_value(self, cli_value: Any) -> Any:
        """The library's value of what the command line parsed."""
        if self.negated:
            return not cli_value
        if cli_value is None:
            return self.default
        if self.from_cli is None:
            return cli_value
        return self.from_cli(cli_value)

    def refusal(self, value: Any) -> str | None:
        """The one line refusing `value`, or None when it is allowed (None is allowed for options whose
        default is None)."""
        if self.constraint is None or (value is None and self.default is None) or self.constraint.accepts(value):
            return None
        return f"{self.name} must be {self.constraint.text}, got {value!r}"


def _setting(name: str, default: Any, constraint: Constraint | None, help: str, *, key: bool = True,
             match: bool = False, **more: Any) -> Option:
    """A `Settings` field; `key`: part of the cache key, `match`: must match a baseline."""
    return Option(name, default, constraint, help, in_cache_key=key, must_match_baseline=match, **more)


# verdict thresholds: (constraint, help, former name)
_THRESHOLDS = {
    "ra1_min": (SHARE, "RA1: least mean linearity", "min_linearity"),
    "ra2_min": (SHARE, "RA2: least mean group score a_ij", "min_alignment"),
    "ra2_min_init_ratio": (Real(0.0), "RA2: least ratio to its value at random init", "min_init_ratio"),
    "ra3_min_rank_share": (SHARE, "RA3 (fully-connected nets): least share of sites with rank ≤ C", "rank_share"),
    "nc1_max": (Real(0.0), "NC1: most", "max_nc1"),
    "nc1_max_init_ratio": (Real(0.0), "NC1: most ratio to its value at random init", "max_nc_init_ratio"),
    "nc2_max": (Real(0.0), "NC2: most (equinorm and equiangularity)", "max_nc2"),
    "nc3_max": (Real(0.0, 4.0), "NC3: most (a squared distance of unit-norm matrices: 0 to 4)", "max_nc3"),
    "nc4_max": (SHARE, "NC4: most (a share of samples)", "max_nc4"),
}


def _limit(name: str, metric: str, constraint: Constraint, what: str, was: str) -> Option:
    help = f"fail if {what} is {'lower' if name.startswith('fail_below_') else 'higher'}"
    return Option(name, None, constraint, help, "limit", cli_type=Optional[float], was=(was,), metric=metric)


OPTIONS: dict[str, Option] = {option.name: option for option in (
    Option("data", None, None, "bundled/digits, a .npz with x (and y), a .txt file (one example per line, text "
           "models), an image folder (class sub-folders give labels), hf-data/<org>/<name>[:config][@split] (a "
           "Hugging Face dataset), or synthetic (a smoke test); default: real data of the model's domain "
           "(Imagenette, CIFAR, WikiText-2, SST-2) or its own",
           "data", cli_type=Optional[str]),
    _setting("samples", "auto", WordOrInteger(("auto",)), "auto: measure the Jacobians in rounds of samples (8, "
             "16, 32…, a seeded class-balanced order) until every RA check of the verdict is decided, at most "
             "--max-samples or --budget; N: exactly N samples", key=False, match=True, cli_type=str,
             from_cli=word_or_integer),
    _setting("max_samples", 64, Integer(1), "--samples auto: at most this many samples (NC takes all of them: a "
             "forward each)", key=False, cli_type=int),
    _setting("budget", None, Duration(), "--samples auto: stop adding rounds after this long, e.g. 90s, 10m, 1h",
             key=False, cli_type=Optional[str], from_cli=seconds_of),
    _setting("k", 16, Integer(1), "singular triplets per site and sample", match=True, cli_type=int),
    _setting("align_k", None, Integer(1), "K of the RA2 alignment (default: k)", match=True, cli_type=Optional[int]),
    _setting("align_pairs", "auto", WordOrInteger(("auto", "all")), "RA2 pairs of a group: all | N partners per "
             "site on average (every neighbour pair, the pairs among 8 spread sites, the rest drawn at random under "
             "--seed; the group score estimated from them) | auto (all up to 17 sites, else 6)", cli_type=str,
             from_cli=word_or_integer),
    _setting("tol", 1e-3, Real(0.0), "relative residual tolerance of the iterative solver", match=True,
             cli_type=float),
    _setting("solver", "auto", OneOf(SOLVERS), "auto (dense where forming J costs fewer products than a Krylov "
             "solve, else block) | dense | block", match=True, cli_type=str),
    _setting("vectors_per_call", 16, Integer(1), "vectors per vmapped Jacobian product call", cli=None,
             was=("chunk",)),
    _setting("dense_limit", DENSE_LIMIT, Integer(0), "auto solver: never form J for sites with more dimensions "
             "than this", cli_type=int),
    _setting("tau", 1e-2, Real(0.0, 1.0), "RA3 numerical rank threshold σ_k > τ σ₁", key=False, match=True,
             cli_type=float),
    _setting("batch_size", None, Integer(1), "samples per chunk (default: the most that fit in the device's free "
             "memory)", key=False, cli_type=Optional[int]),
    _setting("dtype", "float32", OneOf(DTYPES), "float32 | float64", match=True, cli_type=str),
    _setting("device", None, Kind((str,), "text"), "cpu, cuda, cuda:1… (default: cuda when present)",
             cli_type=Optional[str]),
    _setting("seed", 0, Kind((int,), "an integer"), "seed of the solver's random vectors and of random init",
             cli_type=int),
    _setting("null", "init", OneOf(NULLS), "init: also measure RA on the same architecture at a seeded random "
             "init, the control of the verdict | none", key=False, cli_type=str),
    _setting("null_samples", 8, Integer(1), "samples of the random-init measurement (the first of the probe's)",
             key=False, cli_type=int),
    _setting("confidence", 0.95, Between(0.0, 1.0), "level of the confidence intervals (a bootstrap over the "
             "samples measured); a verdict's check passes or fails only when its interval is clear of its "
             "threshold", key=False, cli_type=float),
    _setting("resamples", 1000, Integer(100), "bootstrap resamples of the confidence intervals", key=False,
             cli_type=int),
    _setting("tokens", "all", OneOf(TOKENS), "text models: all (every real token, each sentence's whole "
             "Jacobian) | last (the last real token of each sentence)", match=True, before="all", cli_type=str),
    _setting("site_level", "auto", OneOf(LEVELS), "transformer sites: auto (the family's default) | block (each "
             "block's residual update) | sublayer (attention and MLP)", cli_type=str, was=("sites",)),
    _setting("coupling_k", (), Integers(), "K values of block coupling, e.g. 10,30 (each ≤ k; default: not "
             "measured)", cli_type=Optional[str], from_cli=parse_shape),
    _setting("threads", None, Integer(1), "torch CPU threads while probing (default: torch's; never more than the "
             "CPUs this process may use: affinity and cgroup quota)", key=False, cli_type=Optional[int]),
    Option("cache", True, Kind((bool, str, Path), "true, false or a folder"), "measure everything anew (cache: "
           "$RA_PROBE_CACHE or ~/.cache/ra-probe)", "cache", cli="--no-cache", cli_type=bool),
    Option("pretrained", True, Kind((bool,), "true or false"), "no trained weights: the architecture at random "
           "init, drawn under --seed", "loading", cli="--no-pretrained", cli_type=bool),
    Option("weights", None, Kind((str, Path), "a path"), "state dict (safetensors or torch) loaded strictly into "
           "the model", "loading", cli_type=Optional[Path], from_cli=str),
    Option("arch", None, Kind((str,), "text"), "architecture of a checkpoint file, as a model reference",
           "loading", cli_type=Optional[str]),
    Option("input_shape", None, Shape(), "per-sample input shape, e.g. 3,224,224 (factories, synthetic data)",
           "loading", cli_type=Optional[str], from_cli=parse_shape),
    Option("device_map", None, Kind((str, dict), "auto, balanced or a map of module to device"), "auto | "
           "balanced | a JSON map {module: device}: a Hugging Face model split across devices (needs accelerate)",
           "loading", cli_type=Optional[str]),
    *(Option(f.name, f.default, _THRESHOLDS[f.name][0], f"verdict threshold, {_THRESHOLDS[f.name][1]}", "threshold",
             cli=None, was=(_THRESHOLDS[f.name][2],)) for f in fields(Thresholds)),
    _limit("fail_below_ra1", "linearity", SHARE, "the RA1 mean linearity", "min_linearity"),
    _limit("fail_below_ra2", "alignment", SHARE, "the RA2 mean alignment a_ij", "min_alignment"),
    _limit("fail_above_rank", "median_rank", Real(0.0), "the median over sites of the RA3 rank", "max_rank"),
    _limit("fail_above_nc1", "nc1", Real(0.0), "NC1", "max_nc1"),
    _limit("fail_above_nc4", "nc4", SHARE, "NC4", "max_nc4"),
    Option("tolerance", 0.05, Real(0.0), "allowed move from the baseline: relative for values above 1, absolute "
           "below", "gate", cli_type=float),
)}


def names(*roles: str) -> tuple[str, ...]:
    """The names of the options of `roles`, in the table's order."""
    return tuple(name for name, option in OPTIONS.items() if option.role in roles)


# The keys a sweep file (or `ra_probe.sweep`) takes: every option of a probe, not the gate's
SWEEP_ROLES = ("setting", "threshold", "loading", "data", "cache")
SWEEP_KEYS = names(*SWEEP_ROLES)


def cache_key_settings() -> tuple[str, ...]:
    """The settings a cached result's key holds: those that change what is measured (`in_cache_key`)."""
    return tuple(name for name in names("setting") if OPTIONS[name].in_cache_key)


def baseline_settings() -> tuple[str, ...]:
    """The settings a run and its baseline must agree on for their numbers to compare
    (`must_match_baseline`)."""
    return tuple(name for name in names("setting") if OPTIONS[name].must_match_baseline)


def current_names(values: Mapping[str, Any], roles: tuple[str, ...], warn: Callable[[str], None],
                  spell: Callable[[str], str] = str) -> dict[str, Any]:
    """`values` with the former names of options of `roles` replaced by their current names (the first
    role in `roles` whose option had the name wins: `min_alignment` is a gate limit to `check`, a
    threshold to `probe`), each said once through `warn` ("deprecated: min_alignment is now ra2_min",
    names written by `spell`). A former name given with its current name is refused."""
    now = {}
    for role in roles:
        for option in OPTIONS.values():
            if option.role == role:
                now.update({old: option.name for old in option.was if old not in now})
    out = {}
    for key, value in values.items():
        new = now.get(key, key)
        if new != key:
            if new in values:
                raise UserError(f"{spell(key)} and {spell(new)} are one setting ({spell(key)} is its former name): "
                                f"give only {spell(new)}")
            warn(f"deprecated: {spell(key)} is now {spell(new)}")
        out[new] = value
    return out


def library_warning(line: str) -> None:
    """A deprecation said to a library caller: a FutureWarning (shown by default), pointing at the
    caller's line (the first frame outside ra_probe)."""
    import sys
    import warnings

    package = str(Path(__file__).resolve().parents[1])
    level, frame = 2, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(package):
        level, frame = level + 1, frame.f_back
    warnings.warn(line, FutureWarning, stacklevel=level)


def default(name: str) -> Any:
    return OPTIONS[name].default


def refuse_bad(values: Mapping[str, Any]) -> None:
    """Raise a UserError with the first value of `values` (by option name) its option refuses."""
    for name, value in values.items():
        line = OPTIONS[name].refusal(normalized(name, value))
        if line is not None:
            raise UserError(line)


def normalized(name: str, value: Any) -> Any:
    """A value as the library holds it: shapes as tuples (files write them as lists), paths as text."""
    if name in ("input_shape", "coupling_k") and isinstance(value, list):
        return tuple(value)
    if name == "coupling_k" and isinstance(value, str):
        return parse_shape(value)
    if name in ("align_pairs", "samples") and isinstance(value, str):
        return word_or_integer(value)
    if name == "budget" and isinstance(value, str):
        return seconds_of(value)
    if name == "weights" and isinstance(value, Path):
        return str(value)
    return value
