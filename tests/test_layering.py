"""The package's shape: modules import only down the flow, never the package's root from below it, with
no circle, and no function longer than 80 lines. The checker itself is tested on made-up sources, so
that a checker which cannot see an upward import fails here rather than passes everywhere."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ra_probe"

# the package's parts in the order data flows through them: each may import only from itself and those before
# it; `version` is the lowest, importable by every part; the root (ra_probe/__init__.py) re-exports the library
# and sits above them all, so a part that imports `ra_probe` itself imports upward
STAGES = ("version", "errors", "files", "host", "config", "load", "sites", "plugins", "engine", "metrics",
          "pipeline", "report", "gate", "api", "integrations", "sweeps", "cli", "scripts")


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def imported_names(source: str, module: str, is_package: bool) -> set[str]:
    """The ra_probe names a module's source imports, type-only ones included, relative imports resolved:
    `import ra_probe` gives "ra_probe", `from ra_probe.engine import krylov` gives "ra_probe.engine" and
    "ra_probe.engine.krylov", `from .. import x` in ra_probe/pipeline/cache.py gives "ra_probe.x"."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                base = ".".join(parts[:len(parts) - node.level + is_package] + ([base] if base else []))
            # `from ra_probe import x` reads x from the root: the root itself is not a separate import of it
            names |= {f"{base}.{a.name}" for a in node.names} | ({base} if base != "ra_probe" else set())
    return {n for n in names if n == "ra_probe" or n.startswith("ra_probe.")}


def stage_of(name: str) -> str:
    """The part an imported name belongs to; "ra_probe" for the root and names read from it
    (`ra_probe.__version__`, `ra_probe.probe`)."""
    part = name.split(".")[1] if "." in name else ""
    return part if part in STAGES else "ra_probe"


def upward_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    """What a module imports from a later part than its own, or from the package's root."""
    if module == "ra_probe":  # the root re-exports the library
        return []
    own = STAGES.index(module.split(".")[1])
    return sorted(f"{module} imports {name}" for name in imported_names(source, module, is_package)
                  if stage_of(name) == "ra_probe" or STAGES.index(stage_of(name)) > own)


def test_nothing_imports_upward():
    upward = [line for path in PACKAGE.rglob("*.py")
              for line in upward_imports(path.read_text(), module_name(path), path.name == "__init__.py")]
    assert upward == []
    assert {p.name.removesuffix(".py") for p in PACKAGE.iterdir() if p.name not in ("__init__.py", "__pycache__")
            and (p.suffix == ".py" or p.is_dir())} == set(STAGES)


def test_the_checker_sees_imports_of_the_root_from_below_it():
    cases = {  # (module, is a package's __init__, source): imports the root or a later part
        ("ra_probe.pipeline.cache", False, "import ra_probe\n"),
        ("ra_probe.pipeline.cache", False, "from ra_probe import __version__\n"),
        ("ra_probe.report.build", False, "from ra_probe import probe as run\n"),
        ("ra_probe.pipeline.cache", False, "from .. import __version__\n"),
        ("ra_probe.pipeline", True, "from .. import Settings\n"),
        ("ra_probe.engine.krylov", False, "def f():\n    import ra_probe\n"),  # inside a function too
        ("ra_probe.engine.krylov", False, "import ra_probe.api\n"),
        ("ra_probe.engine", True, "from ra_probe import metrics\n"),
        ("ra_probe.version", False, "from ra_probe.errors import UsageError\n"),
    }
    for module, is_package, source in cases:
        assert upward_imports(source, module, is_package), f"{module}: {source!r} not seen as upward"


def test_the_checker_lets_imports_down_the_flow_and_within_a_part_pass():
    cases = {
        ("ra_probe.pipeline.cache", False, "from ra_probe.version import __version__\n"),
        ("ra_probe.pipeline.cache", False, "from ..version import __version__\n"),
        ("ra_probe.pipeline.cache", False, "from . import run\nfrom .settings import Settings\n"),
        ("ra_probe.pipeline", True, "from . import cache\n"),
        ("ra_probe.report.build", False, "from ra_probe import engine\nimport ra_probe.metrics.ra\n"),
        ("ra_probe", True, "from ra_probe.api import probe\nfrom .version import __version__\n"),
    }
    for module, is_package, source in cases:
        assert upward_imports(source, module, is_package) == [], f"{module}: {source!r}"


def test_the_package_has_no_import_circle():
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name if name and name != "ra_probe" else None

    edges = {m: {r for r in map(resolve, imported_names(p.read_text(), m, p.name == "__init__.py"))
                 if r and r != m and not m.startswith(r + ".")}
             for m, p in modules.items()}
    state: dict[str, int] = {}  # depth-first search for a back edge

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in edges[node]:
            assert state.get(nxt) != 1, f"import circle: {' -> '.join(path + [node, nxt])}"
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for module in modules:
        if module not in state:
            visit(module, [])


def test_no_function_is_longer_than_80_lines():
    long = [f"{path.relative_to(ROOT)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in PACKAGE.rglob("*.py") for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80]
    assert long == []
