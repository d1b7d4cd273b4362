"""Malformed inputs through the CLI: always exit 2 with one line on stderr, never a traceback, never a
written report."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY
from safetensors.torch import save_file

from ra_probe.load.bundled import MODELS

BUNDLED_WEIGHTS = MODELS["fc-digits"].weights


def truncated_safetensors(folder: Path) -> list[str]:
    data = BUNDLED_WEIGHTS.read_bytes()
    (folder / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (folder / "header-only.safetensors").write_bytes(data[:64])
    return ["check", "truncated.safetensors", "--arch", "bundled/fc-digits", "--require", "ra"]


def random_bytes(folder: Path) -> list[str]:
    (folder / "random.safetensors").write_bytes(os.urandom(4096))
    return ["check", "random.safetensors", "--arch", "bundled/fc-digits", "--require", "ra"]


def random_torch_file(folder: Path) -> list[str]:
    (folder / "random.pt").write_bytes(os.urandom(4096))
    return ["probe", "random.pt", "--arch", "bundled/fc-digits", "--json", "out.json"]


def wrong_shapes(folder: Path) -> list[str]:
    from safetensors.torch import load_file

    state = {k: torch.zeros([s + 1 for s in v.shape] or [2]) for k, v in load_file(BUNDLED_WEIGHTS).items()}
    save_file(state, folder / "wrong-shapes.safetensors")
    return ["check", "wrong-shapes.safetensors", "--arch", "bundled/fc-digits", "--require", "ra"]


def other_architecture(folder: Path) -> list[str]:
    torch.save({"conv.weight": torch.zeros(4, 3, 3, 3), "fc.bias": torch.zeros(10)}, folder / "other.pt")
    return ["check", "bundled/fc-digits", "--weights", "other.pt", "--require", "ra"]


def missing_model_file(folder: Path) -> list[str]:
    return ["check", "missing.safetensors", "--arch", "bundled/fc-digits", "--require", "ra"]


def empty_npz(folder: Path) -> list[str]:
    np.savez(folder / "empty.npz", x=np.zeros((0, 64), dtype=np.float32))
    return ["check", "bundled/fc-digits", "--data", "empty.npz", "--require", "ra"]


def npz_with_nan(folder: Path) -> list[str]:
    x = np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32)
    x[3, 5] = np.nan
    x[4, 1] = np.inf
    np.savez(folder / "nan.npz", x=x)
    return ["check", "bundled/fc-digits", "--data", "nan.npz", "--require", "ra"]


def npz_wrong_shape(folder: Path) -> list[str]:
    np.savez(folder / "shape.npz", x=np.zeros((8, 3, 8, 8), dtype=np.float32), y=np.zeros(8, dtype=np.int64))
    return ["check", "bundled/fc-digits", "--data", "shape.npz", "--require", "ra"]


def npz_random_bytes(folder: Path) -> list[str]:
    (folder / "random.npz").write_bytes(os.urandom(2048))
    return ["probe", "bundled/fc-digits", "--data", "random.npz", "--json", "out.json"]


def missing_data(folder: Path) -> list[str]:
    return ["check", "bundled/fc-digits", "--data", "nowhere.npz", "--require", "ra"]


def empty_image_folder(folder: Path) -> list[str]:
    (folder / "images" / "cat").mkdir(parents=True)
    (folder / "images" / "notes.txt").write_text("not an image")
    return ["check", f"{TINY}:conv_net", "--data", "images", "--require", "ra"]


def corrupt_image(folder: Path) -> list[str]:
    (folder / "images").mkdir()
    (folder / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(100))
    return ["check", f"{TINY}:conv_net", "--data", "images", "--require", "ra"]


def baseline_random_bytes(folder: Path) -> list[str]:
    (folder / "base.json").write_bytes(os.urandom(512))
    return ["check", "bundled/fc-digits", "--baseline", "base.json"]


def baseline_not_a_report(folder: Path) -> list[str]:
    (folder / "base.json").write_text(json.dumps({"verdict": {"ra": "present"}}))
    return ["check", "bundled/fc-digits", "--baseline", "base.json"]


def baseline_with_text_metrics(folder: Path) -> list[str]:
    report = {"verdict": {"ra": "present", "nc": "present"}, "settings": {"k": 16, "align_k": 16, "tau": 0.01},
              "metrics": {"ra1": {"mean_linearity": "high"}, "ra2": {"mean_score": 1.0},
                          "ra3": {"share_rank_le_classes": 1.0, "sites": []},
                          "ra4": {"L_times_mean_sigma1": 1.0}, "nc": None}}
    (folder / "base.json").write_text(json.dumps(report))
    return ["check", "bundled/fc-digits", "--baseline", "base.json"]


def baseline_other_settings(folder: Path) -> list[str]:
    report = {"verdict": {"ra": "present", "nc": "present"}, "settings": {"k": 4, "align_k": 4, "tau": 0.01},
              "metrics": {"ra1": {"mean_linearity": 1.0}, "ra2": {"mean_score": 1.0},
                          "ra3": {"share_rank_le_classes": 1.0, "sites": []},
                          "ra4": {"L_times_mean_sigma1": 1.0}, "nc": None}}
    (folder / "base.json").write_text(json.dumps(report))
    return ["check", "bundled/fc-digits", "--baseline", "base.json"]


def missing_baseline(folder: Path) -> list[str]:
    return ["check", "bundled/fc-digits", "--baseline", "base.json"]


def broken_config(folder: Path) -> list[str]:
    (folder / "ra-probe.toml").write_text("require = [ra\n")
    return ["check", "bundled/fc-digits"]


def config_unknown_key(folder: Path) -> list[str]:
    (folder / "ra-probe.toml").write_text('requires = ["ra"]\n')
    return ["check", "bundled/fc-digits"]


def config_wrong_type(folder: Path) -> list[str]:
    (folder / "ra-probe.toml").write_text('fail-below-ra2 = "high"\nrequire = ["ra"]\n')
    return ["check", "bundled/fc-digits"]


def bad_require(folder: Path) -> list[str]:
    return ["check", "bundled/fc-digits", "--require", "rank"]


def no_rule(folder: Path) -> list[str]:
    return ["check", "bundled/fc-digits"]


CASES = [truncated_safetensors, random_bytes, random_torch_file, wrong_shapes, other_architecture,
         missing_model_file, empty_npz, npz_with_nan, npz_wrong_shape, npz_random_bytes, missing_data,
         empty_image_folder, corrupt_image, baseline_random_bytes, baseline_not_a_report, baseline_with_text_metrics,
         baseline_other_settings, missing_baseline, broken_config, config_unknown_key, config_wrong_type,
         bad_require, no_rule]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_malformed_input_is_one_line_and_exit_2(cli, tmp_path, case):
    args = case(tmp_path)
    before = set(tmp_path.rglob("*"))
    code, out, err = cli(*args)
    assert code == 2, (out, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err + out
    assert set(tmp_path.rglob("*")) == before  # no report (nor anything else) written


def test_a_real_process_exits_2_with_one_line(tmp_path):
    import subprocess
    import sys

    (tmp_path / "random.safetensors").write_bytes(os.urandom(4096))
    done = subprocess.run([sys.executable, "-c", "from ra_probe.cli import main; main()", "check",
                           "random.safetensors", "--arch", "bundled/fc-digits", "--require", "ra"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: cannot read weights random.safetensors") and done.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["random.safetensors"]
