"""A probe's cost said before it is spent: the prediction's arithmetic on hand-made timings, its line
and the hint that cuts a long probe, and the prediction against the time a real 224-px ResNet took."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ra_probe.pipeline.cost import Calibration, duration, peak_bytes, predict, seconds, shares, size
from ra_probe.pipeline.measure import ChunkCost, GroupMeasurement, PeakEstimate
from ra_probe.pipeline.settings import Settings
from ra_probe.report.schema import schema_errors

# overhead 2 s; 8 samples at 10 s; the null: set up in 1 s, 4 samples at 20 s
CAL = Calibration(elapsed=33.0, overhead=2.0, sample=10.0, sizes=[1.0] * 8, null_sample=20.0,
                  null_sizes=[1.0] * 4, null_setup=1.0, peak_bytes=2_100_000_000)


def test_the_whole_probe_is_its_overhead_and_every_sample_at_its_first_samples_cost():
    assert seconds(CAL) == pytest.approx(2 + 8 * 10 + 1 + 4 * 20)
    assert seconds(CAL, samples=2) == pytest.approx(2 + 2 * 10 + 1 + 2 * 20)  # the null takes the first samples
    assert seconds(CAL, null=False) == pytest.approx(2 + 8 * 10)
    text = Calibration(elapsed=12.0, overhead=2.0, sample=10.0, sizes=[1.0, 2.0, 0.5])  # tokens against the first
    assert seconds(text) == pytest.approx(2 + 10 * 3.5)
    halved = Calibration(elapsed=12.0, overhead=2.0, sample=10.0, sizes=[1.0] * 4, shares=(0.5, 0.25))
    assert seconds(halved, keep=(0.5, 0.5)) == pytest.approx(2 + 4 * 10 * (1 - 0.25 - 0.125))


def test_shares_of_a_chunk_are_its_krylov_and_alignment_seconds():
    group = GroupMeasurement(0, method={"a": "block", "b": "dense"},
                             timing={"a": {"seconds": 3.0, "align_seconds": 1.0}, "b": {"seconds": 2.0, "align_seconds": 0.5}})
    assert shares(ChunkCost(torch.tensor([0]), 10.0, groups=[group])) == pytest.approx((0.3, 0.15))
    served = ChunkCost(torch.tensor([0]), 0.1, cached_seconds=9.9, served=1, groups=[group])  # as first measured
    assert shares(served) == pytest.approx((0.3, 0.15))


def test_the_line_and_the_cuts_with_their_factors():
    prediction = predict(CAL, Settings(k=16, samples=8, device="cpu"))
    assert prediction.seconds == pytest.approx(163.0)
    assert prediction.line() == ("predicted: ~3 min, peak ~2.1 GB (8 samples + 4 null; measured 1 sample in 10 s, "
                                 "1 at random init in 20 s)")
    factors = dict(prediction.cuts)
    assert factors["--samples 2"] == pytest.approx(163 / 63)
    assert factors["--null none"] == pytest.approx(163 / 82)
    assert "--k 8" not in factors  # no share of the time in Krylov solves: a smaller k saves nothing
    assert prediction.hint(long_after=100) == ("to cut it: --samples 2 (÷2.6), --null none (÷2), "
                                               + ("--device cuda (a GPU is here)" if torch.cuda.is_available()
                                                  else "a GPU (--device cuda)"))
    assert prediction.hint(long_after=200) is None and prediction.hint() is None  # LONG_SECONDS is 180
    krylov = Calibration(elapsed=12.0, overhead=2.0, sample=10.0, sizes=[1.0] * 2, shares=(0.8, 0.2))
    factors = dict(predict(krylov, Settings(k=16, device="cpu")).cuts)
    assert factors["--k 8"] == pytest.approx(22 / (2 + 2 * 10 * (1 - 0.4 - 0.1)))  # products follow max(k, 8), RA2 K
    assert "--k 4" not in dict(predict(krylov, Settings(k=8, device="cpu")).cuts)  # below 8 the solver saves nothing
    bound = predict(Calibration(elapsed=1.0, overhead=1.0, sample=10.0, sizes=[1.0] * 4, cached=True), Settings())
    assert bound.line().startswith("predicted: at most ~41 s") and bound.upper_bound


def test_peak_is_what_was_in_use_plus_the_larger_measurement():
    model, null = PeakEstimate(100, 10, 5, 4), PeakEstimate(100, 0, 5, 2)
    assert peak_bytes(1000, 0, model, None) == 1000 + 10 + 5 * 4
    assert peak_bytes(1000, 0, model, null) == 1000 + 100 + 10  # the null's weights are new
    assert peak_bytes(1000, 100, model, null) == 1000 + 100 + 110  # the model's weights copied (float64, a GPU)
    assert peak_bytes(None, 0, model, null) is None


def test_durations_and_sizes_read_at_a_glance():
    assert [duration(s) for s in (2.34, 13.2, 840, 3 * 3600)] == ["~2.3 s", "~13 s", "~14 min", "~3.0 h"]
    assert size(650_000_000) == "650 MB" and size(2_100_000_000) == "2.1 GB"


# every prediction is long, so the hint shows; a process of its own, so the peak measured is the probe's
LONG_PROBE = """
import sys
from ra_probe.pipeline import cost
cost.LONG_SECONDS = 0.0
from ra_probe.cli import main
main(sys.argv[1:])
"""


def test_a_resnet_at_224_px_takes_about_the_time_predicted(tmp_path):
    """Its branches are zero (timm's zero_init_last) and its random init's are not: the null costs ~10× a
    sample of the model, and is measured before it is predicted."""
    done = subprocess.run([sys.executable, "-c", LONG_PROBE, "timm/resnet10t", "--no-pretrained", "--data", "synthetic",
                           "--samples", "2", "--null-samples", "2", "--k", "2", "--tol", "1e-2", "--threads", "1",
                           "--no-cache", "--json", "r.json"], cwd=tmp_path, capture_output=True, text=True)
    err = done.stderr
    assert done.returncode == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    timings, prediction = report["timings"], report["timings"]["prediction"]
    assert schema_errors(report) == []
    assert 0.5 < timings["total_seconds"] / prediction["seconds"] < 2, timings
    assert 0.5 < timings["peak_bytes"] / prediction["peak_bytes"] < 2, timings
    lines = [line for line in err.splitlines() if not line.startswith("[")]
    assert lines[0] == f"predicted: {duration(prediction['seconds'])}, peak ~{size(prediction['peak_bytes'])} " \
                       f"(2 samples + 2 null; {prediction['basis']})"
    assert lines[1].startswith("to cut it: --null none (÷") and "--device cuda" in lines[1]
    assert err.index("random init: layer1.0, chunk 1/2") < err.index("predicted:") < err.index("layer1.0, chunk 2/2 (")


def test_the_first_samples_warm_up_is_not_extrapolated():
    """The null's first sample is the probe's first and pays the process's first calls; the model's, on
    the same architecture after it, does not: its seconds per product price the null's samples when they
    are fewer."""
    warm = Calibration(elapsed=2.0, overhead=1.0, sample=0.2, sizes=[1.0] * 10, null_sample=1.0,
                       null_sizes=[1.0] * 2, products=100, null_products=150)
    assert warm.per_sample == 0.2 and warm.null_per_sample == pytest.approx(0.3)
    assert seconds(warm) == pytest.approx(1.0 + 0.2 * 10 + 0.3 * 2)
    assert "0.3 s at the model's time per product" in predict(warm, Settings(device="cpu")).basis
    slower = Calibration(elapsed=2.0, overhead=1.0, sample=1.0, sizes=[1.0] * 10, null_sample=0.5,
                         null_sizes=[1.0] * 2, products=100, null_products=150)
    assert slower.null_per_sample == 0.5  # never more than the null's own first sample
    assert Calibration(elapsed=2.0, overhead=1.0, sample=1.0, sizes=[1.0]).null_per_sample == 0.0  # no null
