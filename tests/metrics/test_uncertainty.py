"""Confidence intervals: the bootstrap's coverage on populations with known values, its strata, and
verdict checks that are decided only by intervals clear of their thresholds."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from ra_probe.metrics.results import Check, NCResults
from ra_probe.metrics.uncertainty import interval, resamples, samples_to_decide
from ra_probe.metrics.verdict import Thresholds, _check, _overall, nc_verdict


@pytest.mark.parametrize("population", ["normal", "exponential"])
def test_intervals_of_a_mean_cover_the_true_mean_at_about_their_level(population):
    """Over 400 samples of 40 draws each, the 90 % interval of the mean holds the true mean about 90 % of
    the time (a percentile bootstrap runs a little short on a skewed population at this size)."""
    gen = torch.Generator().manual_seed(0)
    covered, trials, level = 0, 400, 0.9
    for trial in range(trials):
        if population == "normal":
            draws, truth = 2.0 + torch.randn(40, generator=gen, dtype=torch.float64), 2.0
        else:
            draws, truth = -torch.rand(40, generator=gen, dtype=torch.float64).log(), 1.0
        boot = resamples(len(draws), None, 1000, level, seed=trial)
        low, high = interval(boot.means(draws), level)
        covered += low <= truth <= high
    assert 0.84 <= covered / trials <= 0.95


def test_resamples_keep_every_class_as_often_as_the_data_does():
    strata = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    boot = resamples(len(strata), strata, 200, 0.95, seed=3)
    assert boot.stratified and boot.index.shape == (200, 9)
    for row in boot.index:
        assert torch.equal(torch.bincount(strata[row], minlength=3), torch.tensor([3, 2, 4]))
        assert torch.equal(strata[row], strata)  # a sample's stand-in comes from its own class


def test_a_class_of_one_sample_does_not_freeze_the_resamples():
    """Eight samples of eight classes: within-class resamples would repeat the data itself (an interval
    of width zero); they are drawn from all the samples instead."""
    values = torch.arange(8, dtype=torch.float64)
    boot = resamples(8, torch.arange(8), 500, 0.95, seed=0)
    assert not boot.stratified
    low, high = interval(boot.means(values), 0.95)
    assert low < 3.5 < high and high - low > 1.0


def test_resamples_are_seeded_and_one_sample_has_none():
    assert torch.equal(resamples(5, None, 10, 0.95, 7).index, resamples(5, None, 10, 0.95, 7).index)
    assert not torch.equal(resamples(5, None, 10, 0.95, 7).index, resamples(5, None, 10, 0.95, 8).index)
    assert resamples(1, None, 10, 0.95, 0) is None


def test_an_undefined_resample_leaves_the_interval_unknown():
    values = torch.tensor([0.5, float("nan"), float("nan"), float("nan")], dtype=torch.float64)
    boot = resamples(4, None, 500, 0.95, 0)
    assert interval(boot.means(values), 0.95) is None  # some resamples hold only undefined samples


def test_a_check_is_decided_only_by_an_interval_clear_of_its_threshold():
    assert _check("RA2", 0.7, 0.5, True, "a", [0.6, 0.8], 20).passed is True
    assert _check("RA2", 0.3, 0.5, True, "a", [0.2, 0.4], 20).passed is False
    assert _check("NC1", 0.1, 0.5, False, "n", [0.05, 0.2], 20).passed is True
    open_check = _check("RA2", 0.55, 0.5, True, "a", [0.45, 0.65], 20)
    assert open_check.passed is None and "0.5" in open_check.undetermined
    # the half-width 0.1 must shrink below the distance 0.05: four times the samples
    assert open_check.samples_to_decide == 80 == samples_to_decide(0.55, [0.45, 0.65], 0.5, 20)
    assert _check("RA2", 0.9, 0.5, True, "a", None, 1).passed is None  # one sample decides nothing


def test_the_verdict_is_undetermined_while_an_open_check_could_turn_it():
    def check(passed, undetermined=None):
        return Check("RA2", 0.5, None, 0.5, passed, "rule", undetermined)

    passed, failed, open_ = check(True), check(False), check(None, "straddles")
    assert _overall([passed, passed]) == "present"
    assert _overall([passed, open_]) == "undetermined"
    assert _overall([failed, open_]) == "undetermined"
    assert _overall([passed, failed, open_]) == "partial"  # whatever the open check does
    assert _overall([failed, failed]) == "absent"
    assert _overall([check(None)]) == "not_applicable"


def test_nc_from_too_few_samples_a_class_is_undetermined_not_collapsed():
    values = dict.fromkeys(f.name for f in dataclasses.fields(NCResults))
    nc = NCResults(**{**values, "undetermined": "NC needs at least 5 samples a class on average",
                      "classifier_classes": 10})
    assert nc_verdict(nc, Thresholds()).status == "undetermined"
