"""What a whole probe costs the process, this code against an earlier commit, side by side in one run.

    python benchmarks/probe_cost.py [--before 085c6b9] [--model resnet18] [--image-size 224]
                                    [--samples 8] [--k 8] [--rounds 1] [--threads N] [--null init]

Each probe runs in a fresh process, the variants alternating, `--rounds` times each: a timm model
(a ResNet, an EfficientNet) at 224 px (random init, `zero_init_last=False` where the model takes it,
trained-like decaying branch spectra as in benchmarks/engine.py), `--samples` random images in one chunk, top `--k`, every site, and the
null measurement (`--null init`: the architecture at random init on as many samples; none: off).
Variants:
  before   the earlier commit's `ra_probe` (exported with `git archive` into a temporary folder, first
           on the child's path), in a process set up as its command line did (subnormals flushed);
  library  this tree's, in a process whose malloc keeps its defaults (the library in a host process);
  cli      this tree's, in a process set up as its command line and sweep workers do (`host.own_process`);
  before-library, before-cli   the earlier commit's in the process of library, cli (a commit that has
           `host.own_process`), to compare the code alone.
Printed per probe: wall, user and sys seconds, minor page faults and products; then the medians, the
ratios before / variant, and sys time as a share of CPU time (target: below 10 %). Every variant must
report the same products and the same singular values to rounding.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def child(args: argparse.Namespace) -> None:
    """One probe in this process; prints one JSON line of what it cost."""
    import timm
    import torch

    sys.path.insert(0, str(HERE))
    from models import trained_like

    import ra_probe
    from ra_probe import probe

    if args.variant.removeprefix("before-") == "cli":
        from ra_probe.host import own_process

        own_process()
    else:
        torch.set_flush_denormal(True)  # as the earlier command line did
    torch.manual_seed(0)
    try:  # a ResNet's last BatchNorm of a block starts at zero unless told
        module = timm.create_model(args.model, pretrained=False, zero_init_last=False, exportable=True)
    except TypeError:  # a model without that option (EfficientNet)
        module = timm.create_model(args.model, pretrained=False, exportable=True)
    trained_like(module, args.decay)
    x = torch.randn(args.samples, 3, args.image_size, args.image_size)
    options = dict(samples=args.samples, k=args.k, batch_size=args.samples, device="cpu", cache=False, null=args.null)
    if args.threads:
        options["threads"] = args.threads
    usage0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    report = probe(module, x, **options)
    wall = time.perf_counter() - wall0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    values = [v for site in report.sites for v in site["singular_values"]]
    products = sum(site["timing"]["products"] for site in report.sites)
    print(json.dumps({"code": str(Path(ra_probe.__file__).parent.parent), "wall": wall,
                      "user": usage.ru_utime - usage0.ru_utime, "sys": usage.ru_stime - usage0.ru_stime,
                      "faults": usage.ru_minflt - usage0.ru_minflt, "products": products,
                      "sites": len(report.sites), "values": values}))


def run_child(variant: str, code: Path, args: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", "--variant", variant, "--model", args.model,
            "--image-size", str(args.image_size), "--samples", str(args.samples), "--k", str(args.k),
            "--decay", str(args.decay), "--null", args.null]
    if args.threads and variant != "before":  # a commit older than a before-* variant's may not know the setting
        argv += ["--threads", str(args.threads)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"probe with {code} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if Path(result["code"]).resolve() != code.resolve():
        raise SystemExit(f"the child ran {result['code']}, not {code}")
    return result


def export(commit: str, into: Path) -> Path:
    """The ra_probe package of `commit`, exported into `into`. Earlier commits kept the built-in adapters
    in a top-level `plugins` folder installed as `ra_probe.plugins`: it is put there."""
    into.mkdir()
    tree = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", commit], capture_output=True,
                          text=True, check=True).stdout.split()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "ra_probe",
                              *(["plugins"] if "plugins" in tree else [])], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    if (into / "plugins").is_dir():
        (into / "plugins").rename(into / "ra_probe" / "plugins")
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="085c6b9", help="the commit to compare with")
    parser.add_argument("--after", default=None, help="a commit for the library and cli variants (default: this "
                                                       "tree as it is)")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--decay", type=float, default=0.7, help="channel decay of the last BatchNorms (1: off)")
    parser.add_argument("--rounds", type=int, default=1, help="probes of each code, alternating")
    parser.add_argument("--null", default="init", help="the probe's null measurement: init (its default: the "
                                                        "architecture at random init, as many samples again) or none")
    parser.add_argument("--threads", type=int, default=None, help="threads of the current code's probe")
    parser.add_argument("--variants", default="before,library,cli",
                        help="which of before, library, cli, before-library, before-cli to run, in this order")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="cli", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory() as folder:
        variants = args.variants.split(",")
        before = export(args.before, Path(folder) / "before")
        after = ROOT if args.after is None else export(args.after, Path(folder) / "after")
        codes = {name: before if name.startswith("before") else after for name in variants}
        print(f"{args.model} at {args.image_size} px, {args.samples} samples in one chunk, k={args.k}, null {args.null}, "
              f"before = {args.before}, after = {args.after or 'this tree'}; {args.rounds} round(s), alternating")
        print(f"{'':8} {'wall s':>8} {'user s':>8} {'sys s':>8} {'sys %':>6} {'faults':>11} {'products':>9}")
        results: dict[str, list[dict]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, code in codes.items():
                result = run_child(name, code, args)
                results[name].append(result)
                share = result["sys"] / (result["user"] + result["sys"])
                print(f"{name:8} {result['wall']:8.1f} {result['user']:8.1f} {result['sys']:8.1f} {share:6.1%} "
                      f"{result['faults']:11,} {result['products']:9,}", flush=True)
    report(results)


def report(results: dict[str, list[dict]]) -> None:
    """Medians per variant, the ratios of the first variant's over each other's, and agreement."""
    keys = ("wall", "user", "sys", "faults")
    median = {name: {key: statistics.median(r[key] for r in runs) for key in keys} for name, runs in results.items()}
    first, *others = list(results)
    print(f"\nmedians{'':4}" + "".join(f"{name:>14}" for name in results)
          + "".join(f"{first + '/' + name:>18}" for name in others))
    for key in keys:
        print(f"  {key:9}" + "".join(f"{median[name][key]:14,.1f}" for name in results)
              + "".join(f"{median[first][key] / max(median[name][key], 1e-9):17.2f}x" for name in others))
    for name in results:
        m = median[name]
        print(f"  {name}: sys {m['sys'] / (m['user'] + m['sys']):.1%} of CPU time (target < 10 %), "
              f"products {results[name][0]['products']:,}, {results[name][0]['sites']} sites")
    reference = results[first][0]["values"]
    for name in others:
        worst = max(abs(a - b) / max(abs(a), 1e-30) for a, b in zip(reference, results[name][0]["values"]))
        print(f"  largest relative difference of a reported singular value, {first} vs {name}: {worst:.1e}")


if __name__ == "__main__":
    main()
