"""The base install alone runs every command: the optional extras (accelerate, ray, lightning, pandas) are
imported only on the paths that need them. Each command runs in a process where those packages cannot be
imported, as on a machine that installed `pip install -e .` and nothing else."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tiny_models import hf_config, saved

EXTRAS = ("accelerate", "ray", "lightning", "pandas")

# None in sys.modules: `import x` raises ModuleNotFoundError and importlib.util.find_spec(x) answers None,
# so a package that probes for an optional dependency (transformers does) sees it as not installed.
BARE = textwrap.dedent(f"""
    import sys
    for name in {EXTRAS!r}:
        sys.modules[name] = None
    from ra_probe.cli import main
    codes = []
    for argv in {{commands}}:
        try:
            main(argv)
            codes.append(0)
        except SystemExit as exc:
            codes.append(exc.code or 0)
    print("CODES", codes)
""")


def run_bare(commands: list[list[str]], cwd) -> tuple[list[int], str]:
    script = BARE.replace("{commands}", repr(commands))
    done = subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    codes = eval(output.rsplit("CODES", 1)[1].splitlines()[0])
    return codes, output


def test_every_command_runs_without_the_optional_extras(tmp_path):
    folder = saved(hf_config("bert"), tmp_path / "bert")
    small = ["--samples", "4", "--k", "2", "--null", "none", "--no-cache", "-q"]
    commands = [
        ["bundled/fc-digits", "--samples", "16", "--k", "4", "--no-cache", "--json", "a.json", "--html", "a.html"],
        ["timm/resnet18", "--no-pretrained", "--data", "synthetic", "--input-shape", "3,32,32", *small,
         "--json", "b.json"],
        [folder, "--data", "synthetic", *small, "--json", "c.json"],
        ["sites", "timm/resnet18", "--no-pretrained"],
        ["render", "a.json", "--html", "again.html"],
        ["compare", "a.json", "b.json", "--html", "cmp.html"],
        ["check", "bundled/fc-digits", "--require", "ra", "--samples", "16", "--k", "4", "--no-cache",
         "--json", "gate.json"],
    ]
    codes, output = run_bare(commands, tmp_path)
    assert codes == [0] * len(commands), output
    assert "ModuleNotFoundError" not in output and "Traceback" not in output
    for name in ("a.json", "b.json", "c.json", "gate.json"):
        assert json.loads((tmp_path / name).read_text())["tool"]["name"] == "ra-probe"
    for name in ("a.html", "again.html", "cmp.html"):
        assert (tmp_path / name).read_text().lstrip().lower().startswith("<!doctype html")


def test_the_extras_cannot_be_imported_there():
    """The harness itself: an import of an extra fails in it, as on a bare install."""
    probe = subprocess.run([sys.executable, "-c", BARE.split("from ra_probe")[0] + "import accelerate.utils"],
                           capture_output=True, text=True)
    assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr
