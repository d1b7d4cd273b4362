"""The records of the sites stage are built once (frozen), and the adapter contract documented on
`Site` is what a third-party adapter writes: the docstring's example, run as it is, gets its sites
measured by a probe."""
from __future__ import annotations

import dataclasses
import inspect
import textwrap

import pytest
import torch
from torch import nn

import ra_probe
from ra_probe.sites import Group, Site, SiteCall, SiteReport, Tap, VerifiedSite
from ra_probe.sites.registry import _RUNTIME


def documented_example() -> str:
    """The code block of `Site`'s docstring: the indented lines after the line that ends with '::'."""
    lines = inspect.getdoc(Site).splitlines()
    start = next(i for i, line in enumerate(lines) if line.rstrip().endswith("::")) + 1
    block = []
    for line in lines[start:]:
        if line.strip() and not line.startswith("    "):
            break
        block.append(line)
    return textwrap.dedent("\n".join(block))


def records() -> tuple[Site, VerifiedSite, Group, SiteReport]:
    site = Site("block", "block", lambda x, ctx: x, Tap("block", "input"), Tap("block", "output"))
    verified = VerifiedSite(SiteCall(site, 0, "block", "test"), (4,), (4,), 0.0)
    group = Group(0, (verified,), "first site")
    return site, verified, group, SiteReport("test", (group,))


@pytest.mark.parametrize("index,field", [(0, "name"), (0, "branch"), (0, "call"), (1, "verify_error"),
                                         (1, "in_shape"), (2, "index"), (2, "sites"), (2, "start"),
                                         (3, "groups"), (3, "skipped")])
def test_assigning_to_a_field_of_a_site_record_raises(index, field):
    record = records()[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(record, field, None)


def test_a_site_report_lists_its_groups_sites_in_order_with_why_each_group_starts():
    site, verified, group, report = records()
    second = Group(1, (verified, verified), "shape changes")
    report = SiteReport("test", (group, second))
    assert len(report.sites) == 3
    assert [(d["group"], d["group_start"]) for d in report.describe()] == [(0, "first site"), (1, "shape changes"),
                                                                            (1, None)]


def test_a_third_party_adapter_written_as_documented_gets_its_sites_measured():
    example = documented_example()
    assert "class GatedAdapter" in example and "register_adapter" in example
    namespace: dict = {}
    try:
        exec(compile(example, "<Site docstring>", "exec"), namespace)  # noqa: S102 - the documented example
        block = namespace["GatedBlock"]
        torch.manual_seed(0)
        model = nn.Sequential(block(8), block(8), nn.Linear(8, 3)).eval()
        report = ra_probe.probe(model, torch.randn(6, 8), samples=6, k=2, null="none")
    finally:
        _RUNTIME.clear()
    assert report["model"]["adapter"] == "gated" and report["skipped"] == []
    assert [(s["name"], s["post"], s["group"]) for s in report.sites] == [("0", "relu", 0), ("1", "relu", 0)]
    assert all(s["verify_error"] < 1e-6 and s["singular_values"][0] > 0 for s in report.sites)
