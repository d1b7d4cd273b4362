"""The default probe (`--samples auto`: rounds until the verdict is decided) against a fixed number of
samples (`--samples 64`, the former default), back to back in one process on the same models: the
bundled trained model, a trained-like ResNet-18 (its blocks' last BatchNorms scaled by decay^c, as in
probe_cost.py) and the same ResNet-18 at random init, on synthetic images labelled at random (ten
classes). Prints, for each model and mode: the samples whose Jacobians were measured (model + null),
the wall seconds, the verdicts and RA2's interval; then the time ratio fixed / auto and whether every
verdict the fixed run decided is the same.

    python benchmarks/adaptive.py [--image-size 224] [--fixed 64] [--k 8] [--models bundled,trained,init]
"""
from __future__ import annotations

import argparse
import time

import torch
from models import trained_like  # beside this script

import ra_probe


def resnet(decay: float | None, image_size: int):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10, zero_init_last=False).eval()
    if decay is not None:
        trained_like(model, decay)
    model.input_shape = (3, image_size, image_size)
    return model


def data_of(name: str, image_size: int, n: int):
    if name == "bundled":
        return None
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(n, 3, image_size, image_size, generator=generator),
            torch.arange(n) % 10)


def one(model, data, settings: dict) -> dict:
    tick = time.perf_counter()
    report = ra_probe.probe(model, data, cache=False, **settings) if data is not None else \
        ra_probe.probe(model, cache=False, **settings)
    sampling = report["metrics"]["sampling"]
    return {"seconds": time.perf_counter() - tick, "ra": report.verdict["ra"], "nc": report.verdict["nc"],
            "measured": sampling["measured"], "null": report["metrics"]["null"].get("samples"),
            "stopped": sampling["stopped"], "ra2": report["metrics"]["ra2"]["mean_score"],
            "ra2_ci": report["metrics"]["ra2"].get("mean_score_ci")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--fixed", type=int, default=64, help="samples of the fixed run (and the auto run's cap)")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--decay", type=float, default=0.7)
    parser.add_argument("--models", default="bundled,trained,init")
    args = parser.parse_args()
    models = {"bundled": lambda: "bundled/fc-digits", "trained": lambda: resnet(args.decay, args.image_size),
              "init": lambda: resnet(None, args.image_size)}
    rows = []
    for name in args.models.split(","):
        data = data_of(name, args.image_size, args.fixed)
        common = {"k": args.k} if name != "bundled" else {}
        fixed = one(models[name](), data, {**common, "samples": args.fixed})
        auto = one(models[name](), data, {**common, "samples": "auto", "max_samples": args.fixed})
        rows.append((name, fixed, auto))
        for mode, r in (("fixed", fixed), ("auto", auto)):
            ci = "–" if not r["ra2_ci"] else f"[{r['ra2_ci'][0]:.3g}, {r['ra2_ci'][1]:.3g}]"
            print(f"{name:8s} {mode:5s} samples {r['measured']:3d} + null {r['null']!s:>2s}  {r['seconds']:8.1f} s  "
                  f"RA {r['ra']:12s} NC {r['nc']:12s} RA2 {r['ra2']:.3g} {ci}  (stopped: {r['stopped']})", flush=True)
    print()
    for name, fixed, auto in rows:
        same = all(fixed[key] == auto[key] for key in ("ra", "nc") if fixed[key] != "undetermined")
        print(f"{name:8s} fixed / auto time {fixed['seconds'] / auto['seconds']:.2f}x, samples "
              f"{fixed['measured']} -> {auto['measured']}, decided verdicts the same: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
