"""Engine benchmark: the ratios that say whether the matrix-free engine is fast, measured in
one run on one device.

    python benchmarks/engine.py [--device cuda] [--model resnet50] [--samples 2] [--k 10] [--tol 1e-3]

Prints, for a random-init timm model with trained-like (nonzero, decaying) branch spectra
(`zero_init_last=False`, and the last BatchNorm of every block scaling its channels by `decay`^c:
random init alone gives flat spectra that no Krylov solver resolves in few products):
  - one batched product (J·v, Jᵀ·u; one vector and a block of vectors per sample) over one forward of
    the same site (target ≤ 2×);
  - products per converged triplet and the whole probe (SVDs and RA2 alignment of every site) in
    network-forward equivalents per sample (target ≤ 60 for top-10 at tol 1e-3);
  - the speed-up of the batched block solver over one sample at a time with one vector per product
    call (blocks of 2) on one site, and over a dense Jacobian + SVD on the largest site
    whose Jacobian fits in memory.
"""
from __future__ import annotations

import argparse
import math
import time
from contextlib import ExitStack

import timm
import torch
from models import trained_like

from ra_probe import Settings
from ra_probe.engine import DenseOperator, JacobianOperator, dense_svd, krylov_svd
from ra_probe.load.data import Samples
from ra_probe.pipeline.measure import measure
from ra_probe.pipeline.prepare import prepared
from ra_probe.sites.capture import capture
from ra_probe.sites.discover import discover


def timed(fn, device: torch.device, repeat: int = 3) -> float:
    """Seconds of the fastest of `repeat` calls of `fn` after one warm-up call (CUDA synchronized): the
    minimum is the least disturbed by other work on a shared machine."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    best = float("inf")
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def digits_trained(name: str, size: int, epochs: int, samples: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """`name` trained on the bundled digits split (8×8 pixels upsampled to size×size, three channels) with
    SGD for `epochs` epochs on the CPU, and `samples` held-out test images."""
    import torch.nn.functional as F

    from ra_probe.load.bundled.digits import load_split

    def images(a):
        x = torch.from_numpy(a).reshape(-1, 1, 8, 8)
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)

    torch.manual_seed(0)  # the same model in every run: products compared across runs are of one model
    x_train, y_train, x_test, y_test = load_split()
    x_train, x_test, y_train = images(x_train), images(x_test), torch.from_numpy(y_train)
    module = timm.create_model(name, pretrained=False, num_classes=10, exportable=True)
    opt = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for _ in range(epochs):
        module.train()
        for idx in torch.randperm(len(x_train)).split(64):
            opt.zero_grad()
            F.cross_entropy(module(x_train[idx].contiguous()), y_train[idx]).backward()
            opt.step()
    module.eval()
    with torch.no_grad():
        accuracy = (module(x_test.contiguous()).argmax(1).numpy() == y_test).mean()
    print(f"trained {name} on digits at {size}px for {epochs} epochs: test accuracy {accuracy:.3f}")
    return module, x_test[:samples].contiguous()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=None, help="samples per chunk (default: automatic)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--site", default="layer1.1", help="the site of the per-product and solver comparisons")
    parser.add_argument("--decay", type=float, default=0.7, help="channel decay of the last BatchNorms (1: off)")
    parser.add_argument("--train-digits", type=int, default=0, metavar="EPOCHS",
                        help="instead of the decaying proxy, train the model on scikit-learn's digits (upsampled to "
                             "--image-size) for EPOCHS epochs and probe held-out digits: real trained spectra")
    parser.add_argument("--dense-limit", type=int, default=8192, help="largest dimension formed densely")
    args = parser.parse_args()
    torch.set_flush_denormal(True)  # as the CLI does, before torch's CPU threads start (engine.krylov)
    device = torch.device(args.device)
    torch.manual_seed(0)

    if args.train_digits:
        module, x = digits_trained(args.model, args.image_size, args.train_digits, args.samples)
        x = x.to(device)
    else:
        module = timm.create_model(args.model, pretrained=False, zero_init_last=False, exportable=True)
        trained_like(module, args.decay)
        x = torch.randn(args.samples, 3, args.image_size, args.image_size, device=device)
    settings = Settings(k=args.k, tol=args.tol, device=str(device), batch_size=args.batch_size, solver="auto",
                        dense_limit=0)
    held = ExitStack()  # kept until the run ends: a dropped one would put the model back at once
    model = held.enter_context(prepared(module, settings))
    samples = Samples(x.cpu(), None, "synthetic")
    found = discover(model, samples, settings.resolved_device(), settings.resolved_dtype())
    sites = found.sites
    captured = capture(model, x, sites)
    print(f"{args.model} at {args.image_size}px on {device} ({torch.get_num_threads()} threads), "
          f"{args.samples} samples, {len(sites)} sites, k={args.k}, tol={args.tol:g}, float32, TF32 off")

    with torch.no_grad():
        network = timed(lambda: model(x), device)
    print(f"\nnetwork forward (batch of {args.samples}): {network * 1e3:.1f} ms")

    # 1. one product over one forward of the same site
    site = next(s for s in sites if s.name == args.site)
    record = captured.sites[site.name]
    op = JacobianOperator(site.branch, record.x, record.ctx)
    _, m, n = op.shape
    with torch.no_grad():
        forward = timed(lambda: site.branch(record.x, record.ctx), device)
    print(f"\n[1] products at {site.name} ({n:,} dims), per vector and sample, over one forward of the site:")
    for width in (1, op.vectors_per_call):
        V = torch.randn(args.samples, n, width, device=device)
        U = torch.randn(args.samples, m, width, device=device)
        jv = timed(lambda: op.matmat(V), device) / width  # noqa: B023
        jtu = timed(lambda: op.rmatmat(U), device) / width  # noqa: B023
        print(f"    block of {width:2d}: J·v {jv / forward:.2f}×   Jᵀ·u {jtu / forward:.2f}×   (target ≤ 2×)")

    # 2. the whole probe in network forwards per sample
    start = time.perf_counter()
    measured = measure(model, found.groups, samples, settings)
    if device.type == "cuda":
        torch.cuda.synchronize()
    probe_seconds = time.perf_counter() - start
    timings = [measured.timing(s.name) for s in sites]
    svd_products = sum(t["products"] for t in timings)
    align_products = sum(t.get("align_products", 0) for t in timings)
    triplets = sum(t["converged"] for t in timings) * args.k
    svd_seconds = sum(t["seconds"] for t in timings)
    align_seconds = sum(t.get("align_seconds", 0.0) for t in timings)
    print(f"\n[2] whole probe ({measured.batch_size} samples per chunk): {probe_seconds:.1f} s = "
          f"{probe_seconds / network:.1f} network forwards per sample "
          f"(target ≤ 60); SVDs {svd_seconds:.1f} s, RA2 alignment {align_seconds:.1f} s")
    print(f"    products per converged triplet: {svd_products / max(triplets, 1):.1f} "
          f"({svd_products:,} SVD products, {triplets} converged triplets; RA2 {align_products:,} products)")
    unconverged = [s.name for s, t in zip(sites, timings) if t["converged"] < t["samples"]]
    if unconverged:
        print(f"    not converged within the basis: {', '.join(unconverged)}")

    # 3. speed-up over one vector of one sample at a time, on the same site
    def one_at_a_time():
        for b in range(args.samples):
            single = JacobianOperator(site.branch, record.x[b:b + 1], record.ctx, vectors_per_call=1)
            krylov_svd(single, args.k, width=2, tol=args.tol)

    def batched_block():
        krylov_svd(JacobianOperator(site.branch, record.x, record.ctx), args.k, tol=args.tol)

    slow, fast = timed(one_at_a_time, device, 1), timed(batched_block, device, 1)
    print(f"\n[3] {site.name}: batched block Krylov {fast:.2f} s vs one vector of one sample at a time "
          f"{slow:.2f} s: {slow / fast:.1f}× faster")

    # 4. speed-up over a dense Jacobian where one fits
    small = [s for s in sites if max(math.prod(s.in_shape), math.prod(s.out_shape)) <= args.dense_limit]
    if small:
        site = max(small, key=lambda s: math.prod(s.in_shape))
        record = captured.sites[site.name]
        dense = timed(lambda: dense_svd(DenseOperator(JacobianOperator(site.branch, record.x, record.ctx).dense()),
                                        args.k), device, 1)
        fast = timed(lambda: krylov_svd(JacobianOperator(site.branch, record.x, record.ctx), args.k,
                                        tol=args.tol), device, 1)
        print(f"\n[4] {site.name} ({math.prod(site.in_shape):,} dims): block Krylov {fast:.2f} s vs dense "
              f"Jacobian + SVD {dense:.2f} s: {dense / fast:.1f}× faster")
    else:
        print(f"\n[4] no site of at most {args.dense_limit} dims: a dense Jacobian does not fit "
              f"(run with a smaller --image-size to compare)")


if __name__ == "__main__":
    main()
