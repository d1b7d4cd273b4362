"""Every headline number of a probe with its confidence interval, and verdicts that read them: on the
bundled trained model (64 samples: decided) and on too few samples to decide."""
from __future__ import annotations

import ra_probe


def test_the_trained_model_has_an_interval_for_every_headline_number(bundled_reports):
    report = bundled_reports["fc-digits"]
    metrics = report["metrics"]
    # --samples auto: RA decided after its first round of 8 samples; NC measured on all 64
    assert metrics["uncertainty"]["samples"] == 8 and metrics["sampling"]["stopped"] == "decided"
    assert metrics["nc"]["samples"] == 64
    for section, name in (("ra1", "mean_linearity"), ("ra2", "mean_score"), ("ra4", "L_times_mean_sigma1"),
                          ("ra3", "share_rank_le_classes"), ("nc", "nc1"), ("nc", "nc3")):
        low, high = metrics[section][f"{name}_ci"]
        assert low <= metrics[section][name] <= high, (section, name)
    group = metrics["ra2"]["groups"][0]
    assert group["score_ci"][0] <= group["score"] <= group["score_ci"][1]
    assert group["matrix_ci"][0][0] is None and group["matrix_ci"][0][1][0] <= group["matrix"][0][1]
    lows, highs = report["sites"][0]["singular_values_ci"]
    assert all(lo <= s <= hi for lo, s, hi in zip(lows, report["sites"][0]["singular_values"], highs))
    low, high = metrics["null"]["ratio_ci"]["ra2"]
    assert 4 < low <= metrics["null"]["ratio"]["ra2"] <= high  # the contrast with init, decided
    checks = report["verdict"]["evidence"]["ra"]["checks"]
    assert report["verdict"]["ra"] == "present" and all(c["passed"] and c["ci"] for c in checks)
    control = bundled_reports["fc-digits-lowwd"]
    assert control["verdict"]["ra"] == "absent"  # its contrast with init is decided too: far below 4×
    assert control["metrics"]["null"]["ratio_ci"]["ra2"][1] < 4


def test_nc_on_two_or_three_samples_a_class_is_not_called_collapsed(bundled_reports):
    """Twelve samples (five classes of two or three) bias NC toward collapse: NC1 0.019 where 64 samples
    give 0.048. It is undetermined, with how many samples would do."""
    small = ra_probe.probe("bundled/fc-digits", samples=12, k=4, null="none")
    assert small.verdict["nc"] == "undetermined"
    assert small["metrics"]["nc"]["nc1"] is None and "5 samples a class" in small["metrics"]["nc"]["undetermined"]
    assert bundled_reports["fc-digits"]["verdict"]["nc"] == "present"


def test_intervals_are_the_same_for_the_same_seed():
    first = ra_probe.probe("bundled/fc-digits", samples=16, k=4, null="none", resamples=200)
    again = ra_probe.probe("bundled/fc-digits", samples=16, k=4, null="none", resamples=200)
    other = ra_probe.probe("bundled/fc-digits", samples=16, k=4, null="none", resamples=200, seed=5)
    assert first["metrics"]["ra2"]["mean_score_ci"] == again["metrics"]["ra2"]["mean_score_ci"]
    assert first["metrics"]["ra2"]["mean_score_ci"] != other["metrics"]["ra2"]["mean_score_ci"]
    assert first["settings"]["resamples"] == 200 and first["metrics"]["uncertainty"]["resamples"] == 200


def test_collapse_is_contrasted_with_the_random_init(bundled_reports):
    """NC at random init on the same samples: the trained model's NC1 is a small fraction of it, while a
    random init measured against another draw is no more collapsed than its control: not present, even
    where fixed thresholds pass (NC2 does at init on digits)."""
    trained = bundled_reports["fc-digits"]
    contrast = next(c for c in trained["verdict"]["evidence"]["nc"]["checks"] if c["name"] == "NC1 vs init")
    assert contrast["passed"] and contrast["ci"][1] < 0.25
    assert trained["metrics"]["null"]["nc"]["nc1"] > 5 * trained["metrics"]["nc"]["nc1"]
    at_init = ra_probe.probe("bundled/fc-digits", pretrained=False, k=4)
    assert at_init.verdict["nc"] == "absent"
    assert "does not stand out" in at_init["verdict"]["evidence"]["nc"]["reason"]


def test_auto_samples_stop_when_decided_and_say_why():
    """--samples auto: the trained model's RA is decided after the first round of 8 (and its contrast with
    the init after 2 at init), the same for the same seed; a threshold its interval straddles keeps the
    rounds going to the cap; a spent budget stops them; NC is measured on every sample taken."""
    first = ra_probe.probe("bundled/fc-digits", k=4, resamples=200)
    again = ra_probe.probe("bundled/fc-digits", k=4, resamples=200)
    sampling = first["metrics"]["sampling"]
    assert sampling == {"mode": "auto", "available": 64, "measured": 8, "rounds": [8], "stopped": "decided",
                        "null_measured": 2, "null_stopped": "decided", "null_rounds": [2]}
    assert again["metrics"]["sampling"] == sampling and again["metrics"]["ra2"] == first["metrics"]["ra2"]
    assert first["metrics"]["uncertainty"]["samples"] == 8 and first["metrics"]["nc"]["samples"] == 64
    score = first["metrics"]["ra2"]["mean_score"]  # a threshold on it: its interval straddles it after 8
    straddled = ra_probe.probe("bundled/fc-digits", k=4, resamples=200, null="none",
                               ra2_min=round(score, 4))["metrics"]["sampling"]
    assert straddled["rounds"][:2] == [8, 16] and straddled["stopped"] in ("decided", "max_samples")
    assert straddled["stopped"] == "decided" or straddled["rounds"] == [8, 16, 32, 64]
    spent = ra_probe.probe("bundled/fc-digits", k=4, resamples=200, null="none", budget=1e-6,
                           ra2_min=round(score, 4))
    assert spent["metrics"]["sampling"]["stopped"] == "budget" and spent["metrics"]["sampling"]["measured"] == 8
    fixed = ra_probe.probe("bundled/fc-digits", k=4, resamples=200, samples=12, null="none")
    assert fixed["metrics"]["sampling"] == {"mode": "fixed", "available": 12, "measured": 12, "stopped": "fixed"}
