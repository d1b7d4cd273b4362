"""Size of the HTML report of a ResNet-50 run (16 sites, the largest group 5 sites: 20 heat maps of
K×K): the target is "under a few MB", checked here as a ratio to a 3 MB budget.

    python benchmarks/html_size.py [--samples 2] [--k 16] [--size 224] [--device cpu]

Random-init timm ResNet-50 on synthetic data: the figures' size depends on the number of sites, groups,
k, K and projected samples, not on the weights or the image size (--size 64 runs the same 16 sites
fast on a CPU). Prints the JSON and HTML sizes, the share of each figure, and the ratio."""
from __future__ import annotations

import argparse
import json
import re
import time

import torch

from ra_probe import Settings, probe
from ra_probe.load.data import load_samples
from ra_probe.load.models import load_model
from ra_probe.report.html import render_report

BUDGET = 3_000_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--size", type=int, default=224, help="input images size × size")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    loaded = load_model("timm/resnet50", pretrained=False)
    loaded.input_shape = (3, args.size, args.size)
    for module in loaded.module.modules():  # undo zero_init_last: nonzero branches, as in a trained net
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(module.weight)
    settings = Settings(k=args.k, samples=args.samples, batch_size=args.samples, device=args.device)
    started = time.perf_counter()
    report = probe(loaded, load_samples("synthetic", loaded, limit=args.samples), settings)
    probed = time.perf_counter() - started
    page = render_report(report)
    size = len(page.encode())
    print(f"resnet50: {len(report['sites'])} sites, {len(report['metrics']['ra2']['groups'])} groups with ≥ 2 sites, "
          f"k = {args.k}, {args.samples} samples of {args.size}×{args.size}, probe {probed:.0f} s")
    print(f"JSON {len(json.dumps(report).encode()) / 1e6:.2f} MB, HTML {size / 1e6:.2f} MB")
    for fid, inner in re.findall(r'<figure id="([^"]+)"[^>]*>(.*?)</figure>', page, flags=re.S):
        print(f"  {fid:24s} {len(inner.encode()) / 1e3:8.1f} kB")
    print(f"HTML size / {BUDGET / 1e6:.0f} MB budget = {size / BUDGET:.2f}")


if __name__ == "__main__":
    main()
