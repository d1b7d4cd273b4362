"""Sweeps: several models (FCResNets of depths 2, 4 and 8 with trained weights) and the checkpoints of
one, on a real local Ray instance and in-process; resumed, isolated, summarized in sweep.json."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from ra_probe.errors import UserError
from ra_probe.load.bundled import MODELS
from ra_probe.sweeps.summary import sweep_schema_errors

FACTORIES = """from ra_probe.load.bundled.fcresnet import FCResNet


def d2():
    return FCResNet(depth=2)


def d4():
    return FCResNet(depth=4)


def d8():
    return FCResNet(depth=8)


def crash():
    import os

    os._exit(3)
"""
COMMON = 'samples = 8\nk = 4\ndata = "bundled/digits"\nno-cache = true\n'
RUNS = "".join(f'\n[[run]]\nmodel = "nets.py:d{d}"\nweights = "d{d}.safetensors"\n' for d in (2, 4, 8))


def make_models(folder: Path) -> None:
    """nets.py (FCResNet factories) and trained weights for depths 2, 4, 8: the bundled model's stem,
    head and first blocks; the sweep file of the three."""
    (folder / "nets.py").write_text(FACTORIES)
    trained = load_file(str(MODELS["fc-digits"].weights))
    for depth in (2, 4, 8):
        save_file({k: v for k, v in trained.items() if not k.startswith("blocks.") or int(k.split(".")[1]) < depth},
                  str(folder / f"d{depth}.safetensors"))
    (folder / "sweep.toml").write_text(COMMON + RUNS)


def without_seconds(value):
    """A report without its timing and memory fields (a process's peak depends on what it ran before;
    everything else must be equal)."""
    if isinstance(value, dict):
        return {k: without_seconds(v) for k, v in value.items()
                if "seconds" not in k and not k.startswith(("peak", "prediction"))}
    if isinstance(value, list):
        return [without_seconds(v) for v in value]
    return value


def read(path: Path) -> dict:
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="module")
def ray_instance():
    """A small local Ray instance for this module's tests: 2 CPUs, a small object store, no dashboard."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, object_store_memory=80 * 1024 * 1024, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield ray
    ray.shutdown()


def test_sweep_on_ray_measures_each_run_once_isolates_failures_and_writes_what_the_cli_writes(cli, tmp_path,
                                                                                              ray_instance):
    make_models(tmp_path)
    code, out, err = cli("sweep", "sweep.toml", "--out", "out")
    assert code == 0, err
    document = read(tmp_path / "out" / "sweep.json")
    assert sweep_schema_errors(document) == []
    assert document["executor"]["name"] == "ray" and document["executor"]["version"] == ray_instance.__version__
    assert document["executor"]["per_run"] == {"num_cpus": 1, "num_gpus": 0}  # 2 CPUs shared by 3 runs
    assert document["measured"] == 3 and [r["status"] for r in document["runs"]] == ["done"] * 3
    assert [r["metrics"]["depth"] for r in document["runs"]] == [2, 4, 8]
    ra4 = document["ra4"]
    assert ra4["points"] == 3 and ra4["slope"] < 0 and 0 <= ra4["r2"] <= 1  # deeper nets, smaller σ₁
    assert "fig-compare-slopes" in (tmp_path / "out" / "sweep.html").read_text()
    assert all(line in err for line in ("done    d2", "done    d4", "done    d8"))

    # the same report as `ra-probe MODEL` with the same settings
    code, _, err = cli("nets.py:d4", "--weights", "d4.safetensors", "--data", "bundled/digits", "--samples", 8,
                       "--k", 4, "--no-cache", "--json", "d4.json", "-q")
    assert code == 0, err
    assert without_seconds(read(tmp_path / "out" / "d4.json")) == without_seconds(read(tmp_path / "d4.json"))

    # a second call measures nothing
    code, _, err = cli("sweep", "sweep.toml", "--out", "out")
    assert code == 0, err
    again = read(tmp_path / "out" / "sweep.json")
    assert again["measured"] == 0 and [r["status"] for r in again["runs"]] == ["skipped"] * 3
    assert again["ra4"] == ra4

    # runs that fail at run time (a corrupt checkpoint, a worker that dies) fail alone: exit 1
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with open(tmp_path / "sweep.toml", "a") as f:
        f.write('\n[[run]]\nname = "corrupt"\nmodel = "nets.py:d4"\nweights = "bad.safetensors"\n'
                '\n[[run]]\nname = "crash"\nmodel = "nets.py:crash"\ninput-shape = [64]\n')
    code, _, err = cli("sweep", "sweep.toml", "--out", "out")
    assert code == 1
    third = read(tmp_path / "out" / "sweep.json")
    assert sweep_schema_errors(third) == []
    status = {r["name"]: (r["status"], r["error"]) for r in third["runs"]}
    assert third["measured"] == 2 and [status[n][0] for n in ("d2", "d4", "d8")] == ["skipped"] * 3
    assert status["corrupt"][0] == "failed" and "cannot read weights" in status["corrupt"][1]
    assert status["crash"][0] == "failed" and "\n" not in status["crash"][1]
    assert "failed  corrupt: " in err and "Traceback" not in err


def test_checkpoints_sweep_in_process_without_ray_ordered_by_step(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray not installed
    (tmp_path / "ckpts").mkdir()
    for step, name in ((100, "fc-digits-lowwd"), (2000, "fc-digits"), (500, "fc-digits")):
        (tmp_path / "ckpts" / f"step{step}.safetensors").write_bytes(MODELS[name].weights.read_bytes())
    code, _, err = cli("sweep", "bundled/fc-digits", "--weights", "ckpts/step*.safetensors", "--samples", 8,
                       "--k", 4, "--out", "out")
    assert code == 0, err
    assert err.count("Ray is not installed") == 1
    document = read(tmp_path / "out" / "sweep.json")
    assert sweep_schema_errors(document) == []
    assert document["executor"]["name"] == "local"
    assert [(r["name"], r["step"]) for r in document["runs"]] == [("step100", 100), ("step500", 500),
                                                                  ("step2000", 2000)]
    assert document["ra4"] is None  # one depth
    assert [r["verdict"]["ra"] for r in document["runs"]] == ["absent", "present", "present"]
    assert 'id="fig-steps"' in (tmp_path / "out" / "sweep.html").read_text()


def test_ctrl_c_keeps_the_finished_runs_and_the_next_call_measures_the_rest(tmp_path, monkeypatch):
    import ra_probe

    monkeypatch.chdir(tmp_path)
    make_models(tmp_path)

    def interrupt(entry):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ra_probe.sweep("sweep.toml", "out", executor="local", progress=interrupt)
    document = read(tmp_path / "out" / "sweep.json")
    assert [r["status"] for r in document["runs"]] == ["done", "interrupted", "interrupted"]
    assert sweep_schema_errors(document) == []
    resumed = ra_probe.sweep("sweep.toml", "out", executor="local")
    assert resumed["measured"] == 2 and [r["status"] for r in resumed["runs"]] == ["skipped", "done", "done"]


@pytest.mark.parametrize("sweep_file, message", [
    (COMMON + RUNS + "\nsampels = 3\n", "unknown key 'sampels'"),
    (COMMON + RUNS.replace("d8.safetensors", "missing.safetensors"), "weights file not found: missing.safetensors"),
    (COMMON + RUNS + '\n[[run]]\nmodel = "nets.py:d2"\nweights = "d4.safetensors"\nname = "d2"\n', "repeated: d2"),
    (COMMON + RUNS.replace('model = "nets.py:d4"', 'model = "nets.py:d4"\nk = 0'), "k must be a positive integer"),
    (COMMON, "no runs"),
])
def test_a_bad_sweep_file_is_one_line_exit_2_and_nothing_written(cli, tmp_path, sweep_file, message):
    make_models(tmp_path)
    (tmp_path / "sweep.toml").write_text(sweep_file)
    code, out, err = cli("sweep", "sweep.toml", "--out", "out")
    assert code == 2
    assert message in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_options_on_the_command_line_apply_to_every_run_and_win_over_the_file(tmp_path, monkeypatch):
    from ra_probe.sweeps.spec import read_spec

    monkeypatch.chdir(tmp_path)
    make_models(tmp_path)
    (tmp_path / "sweep.toml").write_text(COMMON + RUNS.replace('model = "nets.py:d4"', 'model = "nets.py:d4"\nk = 6'))
    runs = read_spec("sweep.toml").runs
    assert [r.settings.k for r in runs] == [4, 6, 4] and runs[0].cache is False
    assert [r.settings.k for r in read_spec("sweep.toml", {"k": 3}).runs] == [3, 3, 3]
    assert [r.name for r in read_spec(["timm/resnet18", "timm/resnet34"]).runs] == ["timm-resnet18", "timm-resnet34"]
    keys = {r.name: r.key() for r in runs}
    (tmp_path / "d4.safetensors").write_bytes((tmp_path / "d2.safetensors").read_bytes())  # other weights
    changed = {r.name: r.key() for r in read_spec("sweep.toml").runs}
    assert changed["d2"] == keys["d2"] and changed["d8"] == keys["d8"] and changed["d4"] != keys["d4"]
    assert read_spec("sweep.toml", {"tau": 0.5}).runs[0].key() != keys["d2"]


def test_the_schema_refuses_what_a_sweep_never_writes():
    document = {"schema_version": "2.1", "tool": {"name": "ra-probe", "version": "0"}, "source": "x",
                "executor": {"name": "local", "version": None, "address": None, "resources": None, "per_run": None},
                "measured": 0, "seconds": 0.0, "counts": {"done": 0, "skipped": 0, "failed": 1, "interrupted": 0},
                "runs": [{"name": "a", "model": "m", "weights": None, "data": None, "step": None, "key": "0" * 64,
                          "status": "failed", "report": None, "error": "boom", "seconds": None, "verdict": None,
                          "metrics": None}], "ra4": None, "messages": []}
    assert sweep_schema_errors(document) == []
    document["runs"][0]["error"] = None  # a failed run always says why
    assert sweep_schema_errors(document) != []


def test_importing_ra_probe_imports_neither_ray_nor_accelerate():
    code = "import sys, ra_probe; print(sorted({'ray', 'accelerate'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_checkpoints_of_the_same_file_name_in_folders_of_their_own_are_named_by_their_folders(tmp_path, monkeypatch):
    """Every checkpoint called model.safetensors, each in its run's folder: the runs are named by as many
    folders as tell them apart, instead of a refused sweep; names that were given still must differ."""
    from ra_probe.sweeps.spec import read_spec

    monkeypatch.chdir(tmp_path)
    for folder in ("runs/a/final", "runs/b/final", "other/a"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "model.safetensors").write_bytes(MODELS["fc-digits"].weights.read_bytes())
    spec = read_spec("bundled/fc-digits", {"weights": "runs/*/final/model.safetensors"})
    assert [run.name for run in spec.runs] == ["a-final-model", "b-final-model"]
    (tmp_path / "sweep.toml").write_text('[[run]]\nmodel = "bundled/fc-digits"\nweights = "runs/a/final/model.safetensors"\n'
                                         '[[run]]\nmodel = "bundled/fc-digits"\nweights = "other/a/model.safetensors"\n')
    assert [run.name for run in read_spec("sweep.toml").runs] == ["final-model", "a-model"]
    (tmp_path / "named.toml").write_text('[[run]]\nmodel = "bundled/fc-digits"\nname = "x"\n'
                                         '[[run]]\nmodel = "bundled/fc-digits"\nweights = "other/a/model.safetensors"\n'
                                         'name = "x"\n')
    with pytest.raises(UserError, match="repeated: x"):
        read_spec("named.toml")


LISTENING = """
import sys
from ra_probe.sweeps.execute import executor

def listening():
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            found |= {line.split()[1] for line in list(lines)[1:] if line.split()[3] == "0A"}
    return found

before = listening()
with executor("ray", [], cpus=1) as pool:
    address = pool.describe()["address"]
    opened = listening() - before
print(address, " ".join(sorted(opened)))
"""


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's socket tables")
def test_a_local_ray_instance_listens_on_loopback_only():
    """Ray's ports take commands from whoever reaches them: the instance a sweep starts opens every
    listening socket on 127.0.0.1 (or ::1), none on the machine's network address."""
    pytest.importorskip("ray")
    done = subprocess.run([sys.executable, "-c", LISTENING], capture_output=True, text=True, timeout=300)
    address, *opened = done.stdout.split()
    loopback = ("0100007F", "00000000000000000000000001000000")  # 127.0.0.1 (also IPv4-mapped), ::1
    assert address.startswith("127.0.0.1:") and opened, done.stderr[-2000:]
    assert all(socket.split(":")[0].endswith(loopback) for socket in opened), opened
