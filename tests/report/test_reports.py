"""Reports: the JSON Schema, the HTML report and its figures, `compare`, default output paths,
and the committed reference reports of the bundled models — all checked on reports regenerated here."""
from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest

from ra_probe.cli import main
from ra_probe.errors import UserError
from ra_probe.report.compare import compare, family_of
from ra_probe.report.files import read_report_file
from ra_probe.report.html import render_comparison, render_report
from ra_probe.report.schema import SCHEMA_VERSION, schema, schema_errors
from ra_probe.scripts.reference_reports import FOLDER, MODELS

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / FOLDER
# The schema's structure (descriptions aside) per version: editing the schema without a new
# schema_version fails here. Record the new fingerprint when you bump the version.
SCHEMA_FINGERPRINTS = {"1.2": "df573a095b2e20a6bd648698ff2ea81163ff2da9469559bc3a2da4ef0a737f10",
                       "1.3": "dffdcbdb4979b68fecab8b5cc75201a588103cbdf5f46781d9439b60a23938b5",
                       "1.4": "13c11dbb7c831ef7c5b11a8e1f959478ebb88090b6060ebc35d862a3911e3c7f",
                       "1.5": "06c1ccc3f176775c182a83c9f9f9e3208689d6fabc3cf9381d0f2ddef05d911b",
                       "1.6": "dfe1f29589b0384c06665b3fb8372c2dffdd669aee94598b80efd29555739078",
                       "1.7": "0eb2d86f10057a9f79b60ff525ba64263ca669a7ab1bdb20ba37b50774179bf7",
                       "2.0": "8570a5ddc14d8e6e7234fb769b2e1f0e0aaae44a353581cb2414b04fd46e74a3"}


@pytest.fixture(scope="module")
def fresh(bundled_reports) -> dict[str, dict]:
    """The three bundled models probed in this session, with the reference settings."""
    return bundled_reports


@pytest.fixture(scope="module")
def page(fresh) -> str:
    return render_report(fresh["fc-digits"])


# --- JSON Schema ---------------------------------------------------------------------------------------

def _structure(node):
    if isinstance(node, dict):
        return {k: _structure(v) for k, v in node.items() if k not in ("description", "title", "$comment")}
    if isinstance(node, list):
        return [_structure(v) for v in node]
    return node


def test_schema_version_changes_with_the_schema():
    assert schema()["properties"]["schema_version"]["const"] == SCHEMA_VERSION
    fingerprint = hashlib.sha256(json.dumps(_structure(schema()), sort_keys=True).encode()).hexdigest()
    assert SCHEMA_FINGERPRINTS.get(SCHEMA_VERSION) == fingerprint, (
        f"report.schema.json changed: bump schema_version and record {fingerprint!r} in SCHEMA_FINGERPRINTS")


def test_every_report_is_valid(fresh):
    for name, report in fresh.items():
        assert schema_errors(report) == [], name
        assert json.loads(json.dumps(report, allow_nan=False)) == report  # plain JSON, no NaN
    for path in REFERENCE.glob("*.json"):
        assert schema_errors(json.loads(path.read_text())) == [], path


def test_schema_catches_shape_changes(fresh):
    report = copy.deepcopy(fresh["fc-digits"])
    report["sites"][0]["new_field"] = 1
    report["metrics"]["ra2"]["groups"][0]["score"] = "high"
    del report["verdict"]["thresholds"]
    errors = schema_errors(report)
    assert len(errors) == 3
    assert any(e.startswith("sites/0:") and "new_field" in e for e in errors)
    assert any(e.startswith("metrics/ra2/groups/0/score:") for e in errors)
    assert any(e.startswith("verdict:") and "thresholds" in e for e in errors)


def test_load_report_refuses_bad_files(tmp_path, fresh):
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"schema_version": "7.0"}))
    invalid = copy.deepcopy(fresh["fc-digits-noskip"])
    invalid["verdict"]["ra"] = "maybe"
    (tmp_path / "invalid.json").write_text(json.dumps(invalid))
    for name, message in (("broken.json", "not a JSON report"), ("other.json", "schema_version 7.0"),
                          ("invalid.json", "verdict/ra"), ("missing.json", "no such report")):
        with pytest.raises(UserError, match=re.escape(message)):
            read_report_file(tmp_path / name)


# --- reference reports ------------------------------------------------------------------------------------

def test_reports_of_bundled_models_name_no_path_of_this_machine(fresh):
    # the committed references must read the same from any checkout
    for name in MODELS:
        assert str(ROOT) not in json.dumps(fresh[name]), name


def test_the_references_show_ra_in_the_trained_model_only(fresh):
    """The contrast the references exist to show. (What a probe of fc-digits reports is checked against
    numbers computed without ra-probe's code in test_reference_values.py.)"""
    assert [fresh[n]["verdict"]["ra"] for n in MODELS] == ["present", "absent", "not_applicable"]
    assert fresh["fc-digits"]["metrics"]["ra2"]["mean_score"] > 10 * fresh["fc-digits-lowwd"]["metrics"]["ra2"]["mean_score"]


# --- HTML --------------------------------------------------------------------------------------------------

class _Tables(HTMLParser):
    """Every <table id=...> of a page as rows of cell texts (header row included)."""

    def __init__(self, page: str):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._table = self._cell = None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and "id" in attrs:
            self._table = self.tables.setdefault(attrs["id"], [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._table[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _figures(page: str) -> dict[str, tuple[str, str]]:
    """figure id → (its attributes, its inner HTML)."""
    return {m.group(1): (m.group(2), m.group(3))
            for m in re.finditer(r'<figure id="([^"]+)"([^>]*)>(.*?)</figure>', page, flags=re.S)}


def _svg(inner: str) -> ET.Element:
    return ET.fromstring(inner[inner.index("<svg"):inner.index("</svg>") + len("</svg>")])


def _texts(svg: ET.Element) -> list[str]:
    return ["".join(t.itertext()) for t in svg.iter("{http://www.w3.org/2000/svg}text")]


def _number(cell: str) -> float | None:
    """A cell's value: "–" is none; "0.9956 [0.9951–0.9962]" is its value and interval."""
    return None if cell == "–" else float(cell.split(" [")[0].rstrip("+×"))


def _close(cell: str, value, rel=1e-3) -> bool:
    number = _number(cell)
    return number is None if value is None else math.isclose(number, value, rel_tol=rel, abs_tol=1e-12)


def test_html_figures_exist_and_carry_the_site_names(fresh, page):
    report = fresh["fc-digits"]
    names = [s["name"] for s in report["sites"]]
    group = report["metrics"]["ra2"]["groups"][0]
    figures = _figures(page)
    assert set(figures) == {"fig-spectra", "fig-alignment-0", "fig-heatmaps-0", "fig-trajectories-0", "fig-sigma1",
                            "fig-nc"}
    for fid in ("fig-spectra", "fig-alignment-0", "fig-heatmaps-0", "fig-trajectories-0", "fig-sigma1"):
        attrs, inner = figures[fid]
        assert json.loads(re.search(r'data-sites="([^"]+)"', attrs).group(1).replace("&#34;", '"')) == names, fid
    for fid in ("fig-spectra", "fig-alignment-0", "fig-heatmaps-0", "fig-sigma1"):
        texts = _texts(_svg(figures[fid][1]))
        assert all(name in texts for name in names), fid  # legend entries, tick labels, row/column titles
    spectra = _texts(_svg(figures["fig-spectra"][1]))
    assert f"C = {report['metrics']['ra3']['classes']}" in spectra
    # the a_ij matrix prints every score of the JSON, the heat map grid holds m(m−1) K×K images
    matrix_texts = _texts(_svg(figures["fig-alignment-0"][1]))
    assert [f"{v:.2f}" for row in group["matrix"] for v in row] == [t for t in matrix_texts if re.fullmatch(r"\d\.\d\d", t)]
    maps = {e.get("id") for e in _svg(figures["fig-heatmaps-0"][1]).iter() if e.get("id", "").startswith("heatmap-")}
    assert maps == {f"heatmap-0-{i}-{j}" for i in range(len(names)) for j in range(len(names)) if i != j}
    # RA1: one line per projected sample, PC axes labelled with the explained variance of the JSON
    projection = report["metrics"]["ra1"]["groups"][0]["projection"]
    trajectory = _texts(_svg(figures["fig-trajectories-0"][1]))
    assert f"PC1 ({100 * projection['explained_variance'][0]:.1f}%)" in trajectory
    assert f"group 0: {names[0]} → {names[-1]}" in trajectory
    nc = _texts(_svg(figures["fig-nc"][1]))
    assert f"{report['metrics']['nc']['nc1']:.3g}" in nc


def test_html_tables_match_the_json(fresh, page):
    report = fresh["fc-digits"]
    tables = _Tables(page).tables
    ra3 = {s["site"]: s for s in report["metrics"]["ra3"]["sites"]}
    header, *rows = tables["spectra"]
    assert header[:6] == ["site", "group", "method", "σ₁", "σ₂", "σ₃"]
    assert [r[0] for r in rows] == [s["name"] for s in report["sites"]]
    for row, site in zip(rows, report["sites"]):
        assert all(_close(row[3 + i], site["singular_values"][i]) for i in range(3)), row
        rank = ra3[site["name"]]
        assert row[6] == f"≥{rank['rank_at_least']}" if rank["rank_median"] is None else _close(row[6], rank["rank_median"])
        assert _close(row[7], rank["gap_mean"])
    (_, ra_row), ra1, ra2 = tables["ra-groups"], report["metrics"]["ra1"]["groups"][0], report["metrics"]["ra2"]["groups"][0]
    assert [_close(c, v) for c, v in zip(ra_row[2:], (ra1["linearity"], ra1["lss"], ra1["step_cv"], ra1["step_cos"],
                                                       ra2["score"]))] == [True] * 5
    nc = report["metrics"]["nc"]
    for label, cell in tables["nc"][1:]:
        key = {"NC1": "nc1", "NC2 equinorm μ": "nc2_equinorm_means", "NC2 equinorm w": "nc2_equinorm_weights",
               "NC2 equiangular": "nc2_equiangular", "NC3": "nc3", "NC4": "nc4"}[label]
        assert _close(cell, nc[key]), label
    for key in ("ra", "nc"):
        checks = report["verdict"]["evidence"][key]["checks"]
        assert [(r[0], _close(r[1], c["value"])) for r in tables[f"evidence-{key}"][1:] for c in checks
                if c["name"] == r[0]] == [(c["name"], True) for c in checks]
    assert [r[0] for r in tables["sites"][1:]] == [s["name"] for s in report["sites"]]
    assert dict(tables["settings"])["k"] == str(report["settings"]["k"])
    assert dict(tables["environment"])["torch"] == report["environment"]["torch"]
    assert re.search(r'class="badge present">present<', page)  # the verdict at the top


def test_html_is_self_contained_and_small(fresh, page):
    for text in (page, render_report(fresh["fc-digits-noskip"])):
        assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//|url\(\s*["\']?(https?:)?//|@import|<script|<link',
                             text, flags=re.I)
    assert len(page.encode()) < 1_000_000


def test_html_of_a_model_without_residual_sites(fresh):
    report = fresh["fc-digits-noskip"]
    page = render_report(report)
    assert set(_figures(page)) == {"fig-nc"}
    assert "no residual connections found" in page
    assert "sites" not in _Tables(page).tables and "nc" in _Tables(page).tables


def test_html_of_branches_that_are_exactly_zero(fresh):
    # timm's random init zeroes the last BatchNorm of every ResNet block: nothing to put on a log axis
    report = copy.deepcopy(fresh["fc-digits"])
    for site in report["sites"]:
        site["singular_values"] = [0.0] * len(site["singular_values"])
    for site in report["metrics"]["ra4"]["sites"]:
        site["sigma1_mean"] = 0.0
    figures = _figures(render_report(report))
    for fid in ("fig-spectra", "fig-sigma1"):
        assert "all zero (branches exactly zero?)" in _texts(_svg(figures[fid][1]))
    rows = compare([("a.json", report), ("b.json", fresh["fc-digits-noskip"])])["reports"]
    assert "<svg" in render_comparison({"reports": rows, "files": [], "table": [], "families": []})


def test_html_renders_in_headless_chromium(tmp_path, page):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    import matplotlib.image

    html, png = tmp_path / "fc-digits.html", tmp_path / "fc-digits.png"
    html.write_text(page, encoding="utf-8")
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={png}", "--window-size=1400,3000",
                    html.as_uri()], check=True, capture_output=True, timeout=120)
    pixels = matplotlib.image.imread(png)[..., :3]
    assert pixels.shape[:2] == (3000, 1400)
    # the green "present" badges (#1e7b34) of the verdict at the top, and figures drawn far down the page
    green = (abs(pixels - [0x1e / 255, 0x7b / 255, 0x34 / 255]).max(axis=2) < 0.05)
    assert green[:400].sum() > 200
    inked = (pixels.min(axis=2) < 0.5).any(axis=1)
    assert inked[2000:].any() and inked.mean() > 0.2


def _run(args: list[str]) -> int:
    """The exit code of `ra-probe ARGS` (main returns on success, exits otherwise)."""
    try:
        main(args)
    except SystemExit as exc:
        return exc.code or 0
    return 0


# --- compare -----------------------------------------------------------------------------------------------

def test_compare_shows_ra_in_the_trained_model_only(capsys, tmp_path):
    files = [str(REFERENCE / f"{name}.json") for name in MODELS]
    assert _run(["compare", *files, "--html", str(tmp_path / "c.html")]) == 0
    out = capsys.readouterr().out
    verdicts = next(line for line in out.splitlines() if "RA verdict" in line)
    assert re.search(r"present.*absent.*not_applicable", verdicts)
    tables = _Tables((tmp_path / "c.html").read_text()).tables["compare"]
    assert tables[0][1:] == [f"bundled/{name}" for name in MODELS]
    ra = dict((r[0], r[1:]) for r in tables)["RA verdict"]
    assert ra[0] == "present" and ra[1].startswith("absent (RA2 is 1.6")  # lowwd: not above its random init
    assert _run(["compare", *files, "--html", str(tmp_path / "c.html")]) == 2  # never overwrite without --force


def _scaled(report: dict, name: str, depth: int, sigma1: float) -> dict:
    """A copy of `report` for a model `name` with `depth` sites of top singular value `sigma1`."""
    out = copy.deepcopy(report)
    out["model"]["name"] = name
    out["metrics"]["ra4"]["sites"] = [{"site": f"b{i}", "depth": i + 1, "sigma1_mean": sigma1, "sigma1_std": 0.0}
                                      for i in range(depth)]
    out["metrics"]["ra4"]["depth"] = depth
    return out


def test_compare_fits_the_depth_slope_within_a_family(fresh):
    base = fresh["fc-digits"]
    reports = [(f"r{L}.json", _scaled(base, f"zoo/resnet{L}", L, 3.0 / L)) for L in (4, 8, 16)]
    reports.append(("other.json", _scaled(base, "zoo/vit_tiny", 24, 0.5)))
    result = compare(reports)
    assert family_of("timm/resnet50") == family_of("timm/resnet18") == "timm/resnet"
    [family] = result["families"]
    assert family["family"] == "zoo/resnet" and family["depths"] == [4, 8, 16]
    assert math.isclose(family["slope"], -1.0, abs_tol=1e-9)
    page = render_comparison(result)
    assert "fig-compare-slopes" in _figures(page)
    assert _Tables(page).tables["slopes"][1][-1] == "-1"


# --- CLI outputs -------------------------------------------------------------------------------------------



def test_default_report_paths_and_no_overwrite(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["bundled/fc-digits-noskip", "--samples", "8", "--quiet"]
    assert _run(args) == 0  # no path: both reports under ./reports
    written = sorted(p.name for p in (tmp_path / "reports").iterdir())
    assert [Path(n).suffix for n in written] == [".html", ".json"]
    assert all(re.fullmatch(r"bundled-fc-digits-noskip-\d{8}-\d{6}\.(json|html)", n) for n in written)
    assert schema_errors(json.loads((tmp_path / "reports" / written[1]).read_text())) == []

    assert _run([*args, "--json", "one.json"]) == 0  # a path given: that file only
    assert (tmp_path / "one.json").exists() and len(list((tmp_path / "reports").iterdir())) == 2
    assert _run([*args, "--html", "one.html", "--out", "elsewhere"]) == 0  # --out: the other format there
    assert (tmp_path / "one.html").exists() and [p.suffix for p in (tmp_path / "elsewhere").iterdir()] == [".json"]

    before = (tmp_path / "one.json").read_text()
    capsys.readouterr()
    assert _run([*args, "--json", "one.json"]) == 2
    assert "one.json exists; pass --force" in capsys.readouterr().err
    assert (tmp_path / "one.json").read_text() == before
    assert _run([*args, "--json", "one.json", "--force"]) == 0


def test_a_deep_report_grows_linearly_and_renders_without_warnings():
    import warnings

    import torch
    from tiny_models import DeepMLP

    from ra_probe import probe
    from ra_probe.metrics.ra import heatmap_pairs

    torch.manual_seed(0)
    reports = {depth: probe(DeepMLP(depth), torch.randn(2, 6), samples=2, k=4, null="none") for depth in (20, 40)}
    size = {depth: len(report.to_json()) for depth, report in reports.items()}
    assert size[40] < 2.2 * size[20]  # linear in depth: the K×K maps of neighbours and of 8 spread sites
    group = reports[40]["metrics"]["ra2"]["groups"][0]
    names = group["sites"]
    assert len(names) == 40 and len(group["matrix"]) == 40  # a_ij keeps every pair
    assert set(group["heatmaps"]) == {f"{i}|{j}" for i, j in heatmap_pairs(names)}
    assert len(group["heatmaps"]) == 8 * 7 + 2 * 39  # the spread sites of 40 are never neighbours
    assert f"{names[0]}|{names[1]}" in group["heatmaps"] and f"{names[0]}|{names[2]}" not in group["heatmaps"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a library warning (matplotlib's layout) fails the test
        page = reports[40].to_html()
    maps = set(re.findall(r'id="(heatmap-0-\d+-\d+)"', page))
    assert len(maps) == 8 * 7 and "8 of 40 sites, evenly spread" in page
