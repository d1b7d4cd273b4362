"""ra-probe's solver against its peers, side by side in one run on one device.

    python benchmarks/peers.py [--device cuda] [--samples 4] [--k 10] [--tol 1e-3] [--widths 2,4] [--quick]

Peers:
  - scipy.sparse.linalg.svds with ARPACK and with PROPACK over a `LinearOperator` that applies J or Jᵀ
    to one vector of one sample at a time, as a user would write it (`torch.func.jvp` and a saved
    `torch.func.vjp` of the site's branch); on sites large enough for ra-probe to linearize J·v,
    also over ra-probe's own one-vector products, to compare the solvers on equal products;
  - randomized SVD with q power iterations and oversampling (Halko, Martinsson & Tropp), the method of
    the Residual Alignment paper, batched over the samples like ra-probe.
Sites: a small conv ResNet trained here on scikit-learn's digits, timm resnet18 layer1 at 112 px (random
init, zero_init_last=False), timm vit_tiny_patch16_224 block 6 MLP, and the FFN of a 4-layer BERT (hidden
128, random init). Per site and method: products, seconds and branch forwards per sample, the largest
singular-value error against a float64 reference (relative to σ₁), the time over the best scipy peer's as
a user writes it (goal: ≤ 0.5 on every site), and over the best scipy peer's on the products ra-probe
uses; with `--widths`, ra-probe's block solver at those block widths too. ra-probe's seconds are split
into products, orthogonalization, Ritz checks and the rest. Then the whole probe of a resnet50 at 224 px
(random init, zero_init_last=False) in network forwards per sample, split into products,
orthogonalization, RA2 alignment and the rest.
"""
from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
from contextlib import ExitStack, contextmanager

import numpy as np
import scipy.sparse.linalg as sla
import timm
import torch
from engine import digits_trained
from threadpoolctl import threadpool_limits

from ra_probe import Settings
from ra_probe.engine import JacobianOperator, krylov_svd, solve
from ra_probe.engine import krylov as engine_krylov
from ra_probe.engine import operators as engine_operators
from ra_probe.engine.operators import batch_rows
from ra_probe.load.data import Samples, load_samples
from ra_probe.pipeline.measure import measure
from ra_probe.pipeline.prepare import prepared
from ra_probe.sites.capture import capture
from ra_probe.sites.discover import discover

GOAL = 0.5  # ra-probe's time over the best scipy peer's, on every site
# the prepared models stay prepared for the rest of the run: an ExitStack dropped at once would be
# collected, close `prepared` and put the model back in training mode (BatchNorm on batch statistics)
PREPARED = ExitStack()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def stopwatch(device: torch.device, out: dict, key: str):
    sync(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        sync(device)
        out[key] = out.get(key, 0.0) + time.perf_counter() - start


# ---------------------------------------------------------------- sites

def conv_digits(args, device):
    module, x = digits_trained("resnet18", 32, 2 if args.quick else 4, args.samples)
    return "resnet18 digits 32px layer1.1 (trained)", module, x, "layer1.1"


def resnet18_layer1(args, device):
    torch.manual_seed(0)
    module = timm.create_model("resnet18", pretrained=False, zero_init_last=False, exportable=True)
    return "resnet18 112px layer1.1", module, torch.randn(args.samples, 3, 112, 112), "layer1.1"


def vit_mlp(args, device):
    torch.manual_seed(0)
    module = timm.create_model("vit_tiny_patch16_224", pretrained=False, exportable=True)
    return "vit_tiny blocks.6.mlp", module, torch.randn(args.samples, 3, 224, 224), "blocks.6.mlp"


def bert_ffn(args, device):
    import transformers as tf

    from ra_probe.load.models import load_model

    config = tf.BertConfig(vocab_size=1000, max_position_embeddings=64, hidden_size=128, num_hidden_layers=4,
                           num_attention_heads=2, intermediate_size=512,
                           architectures=["BertForSequenceClassification"])
    torch.manual_seed(0)
    folder = tempfile.mkdtemp()
    tf.BertForSequenceClassification(config).save_pretrained(folder)
    loaded = load_model(folder)
    samples = load_samples("synthetic", loaded, limit=args.samples)
    return "bert-tiny layer.2 FFN", loaded.module, samples.inputs, "bert.encoder.layer.2.mlp"


SITES = [conv_digits, resnet18_layer1, vit_mlp, bert_ffn]


def site_operator(module, x, name: str, device, dtype=torch.float32):
    """The prepared model's site `name`: its branch, captured input and context on `device`."""
    settings = Settings(device=str(device), dtype={torch.float32: "float32", torch.float64: "float64"}[dtype])
    model = PREPARED.enter_context(prepared(module, settings))
    inputs = x.to(device, dtype) if isinstance(x, torch.Tensor) else {k: v.to(device) for k, v in x.items()}
    samples = Samples(inputs.cpu() if isinstance(inputs, torch.Tensor) else {k: v.cpu() for k, v in inputs.items()},
                      None, "bench")
    sites = discover(model, samples, settings.resolved_device(), settings.resolved_dtype()).sites
    site = next(s for s in sites if s.name == name)
    record = capture(model, inputs, [site]).sites[site.name]
    return site, record


# ---------------------------------------------------------------- peers

def scipy_svds(site, record, k: int, tol: float, solver: str, seed: int, linearize: bool = False):
    """svds per sample over a LinearOperator of one-vector products; returns S (B, k), products. The
    products are `torch.func.jvp` and a saved `torch.func.vjp`, as a user would write them, or with
    `linearize` ra-probe's own (J·v from its linearized program)."""
    values, products = [], 0
    for b in range(record.x.shape[0]):
        ctx = batch_rows(record.ctx, slice(b, b + 1), record.x.shape[0])
        op = JacobianOperator(site.branch, record.x[b:b + 1], ctx, vectors_per_call=1, linearize=linearize)
        _, m, n = op.shape

        def matvec(v, op=op):
            return op.matvec(torch.from_numpy(np.asarray(v, dtype=np.float32).reshape(1, n)).to(op.device)  # noqa: B023
                             ).reshape(m).cpu().numpy()  # noqa: B023

        def rmatvec(u, op=op):
            return op.rmatvec(torch.from_numpy(np.asarray(u, dtype=np.float32).reshape(1, m)).to(op.device)  # noqa: B023
                              ).reshape(n).cpu().numpy()  # noqa: B023

        linear = sla.LinearOperator((m, n), matvec=matvec, rmatvec=rmatvec, dtype=np.float32)
        extra = {"maxiter": 60 * k} if solver == "propack" else {}  # its default (10 k steps) stops short
        s = sla.svds(linear, k=k, tol=tol, solver=solver, return_singular_vectors=solver == "propack",
                     random_state=seed, **extra)
        s = s[1] if isinstance(s, tuple) else s
        values.append(torch.from_numpy(np.sort(np.asarray(s, dtype=np.float64))[::-1].copy()))
        products += op.products
    return torch.stack(values), products


def randomized_svd(op, k: int, *, power: int, oversample: int, seed: int) -> torch.Tensor:
    """Halko et al.: Q = orth((J Jᵀ)^q J Ω) with Ω of k + p Gaussian columns, re-orthonormalized after
    every product, then the SVD of Qᵀ J. Batched over the samples. Returns S (B, k)."""
    batch, m, n = op.shape
    g = torch.Generator().manual_seed(seed)
    omega = torch.randn(batch, n, k + oversample, generator=g).to(op.device, op.dtype)
    Q = torch.linalg.qr(op.matmat(omega))[0]
    for _ in range(power):
        Z = torch.linalg.qr(op.rmatmat(Q))[0]
        Q = torch.linalg.qr(op.matmat(Z))[0]
    return torch.linalg.svdvals(op.rmatmat(Q).mT)[:, :k]


# ---------------------------------------------------------------- one site

def compare_site(build, args, device) -> dict:
    label, module, x, name = build(args, device)
    reference_module = copy.deepcopy(module)  # prepared in float64 while `module` stays prepared in float32
    site, record = site_operator(module, x, name, device)
    batch = record.x.shape[0]
    with torch.no_grad():
        forward = min(_time(lambda: site.branch(record.x, record.ctx), device) for _ in range(3)) / batch
    ref_site, ref_record = site_operator(reference_module, x, name, device, torch.float64)
    reference = krylov_svd(JacobianOperator(ref_site.branch, ref_record.x, ref_record.ctx), args.k,
                           width=2 * args.k, tol=1e-7).S.double().cpu()
    sigma1 = reference[:, :1]
    rows = []

    def add(method, seconds, products, S):
        error = ((S.double().cpu()[:, :args.k] - reference).abs() / sigma1).max().item()
        rows.append(dict(method=method, seconds=seconds / batch, products=products / batch,
                         forwards=seconds / batch / forward, error=error))

    solves = []
    variants = [("ra-probe", None, "adaptive", None)] + [("ra-probe before", False, "always", None)] * args.before \
        + [(f"ra-probe width {w}", None, "adaptive", w) for w in args.widths]
    for label_, linearize, passes, width in variants:
        op = JacobianOperator(site.branch, record.x, record.ctx, linearize=linearize)
        op.matmat(torch.zeros(batch, op.shape[2], 1, device=device))  # warm-up (jvp; linearize traces later)
        op.products = 0
        t = {}
        with logged_solves(device) as solves_, time_split(device) as clock:
            with stopwatch(device, t, "s"):
                if width is None:
                    result = solve(op, args.k, tol=args.tol, seed=args.seed, reorthogonalize=passes)
                else:
                    result = engine_krylov.krylov_svd(op, args.k, width=width, tol=args.tol, seed=args.seed)
        add(f"{label_} ({result.method})", t["s"], result.products, result.S)
        solves.append((label_, t["s"], solves_, clock))
    large = record.x[0].numel() >= engine_operators.LINEARIZE_MIN_DIM  # where ra-probe's J·v is not jvp's
    for lin in [False, True] if large else [False]:
        for solver in ("arpack", "propack"):
            t = {}
            with stopwatch(device, t, "s"):
                S, products = scipy_svds(site, record, args.k, args.tol, solver, args.seed, linearize=lin)
            add(f"scipy {solver}" + (", our products" if lin else ""), t["s"], products, S)
    op = JacobianOperator(site.branch, record.x, record.ctx)
    t = {}
    with stopwatch(device, t, "s"):
        S = randomized_svd(op, args.k, power=args.power, oversample=args.oversample, seed=args.seed)
    add(f"randomized q={args.power} p={args.oversample}", t["s"], op.products, S)
    # the goal is against svds as a user writes it; the last column compares solvers on equal products
    best_scipy = min(r["seconds"] for r in rows if r["method"].startswith("scipy") and "our" not in r["method"])
    best_same = min(r["seconds"] for r in rows if r["method"].startswith("scipy") and ("our" in r["method"]) == large)
    for r in rows:
        r["ratio"], r["same"] = r["seconds"] / best_scipy, r["seconds"] / best_same
    print(f"\n{label}: {op.shape[2]:,} → {op.shape[1]:,} dims, {batch} samples, branch forward "
          f"{forward * 1e3:.2f} ms per sample")
    print(f"  {'method':30s} {'products':>9s} {'s/sample':>9s} {'forwards':>9s} {'max err/σ₁':>11s} "
          f"{'/best scipy':>11s} {'/same products':>14s}")
    for r in rows:
        print(f"  {r['method']:30s} {r['products']:9.0f} {r['seconds']:9.3f} {r['forwards']:9.0f} "
              f"{r['error']:11.1e} {r['ratio']:11.2f} {r['same']:14.2f}")
    for label_, seconds, solves_, clock in solves:
        parts = {key: clock.get(key, 0.0) for key in ("products", "orthogonalization", "Ritz checks")}
        parts["rest"] = seconds - sum(parts.values())
        print(f"  {label_}: " + ", ".join(f"{key} {value / batch:.3f} s ({100 * value / seconds:.0f}%)"
                                          for key, value in parts.items())
              + f"; its products alone take {parts['products'] / batch / best_scipy:.2f} × the best scipy peer")
        wider = [x for x in solves_ if x["width"] > solves_[0]["width"]] if solves_ else []
        if wider:
            products = sum(x["products"] for x in wider)
            counts = "+".join(str(x["samples"]) for x in wider)
            print(f"  {label_}: wider blocks for clusters: {counts} sample(s) at width "
                  f"{'/'.join(str(x['width']) for x in wider)}: {products / batch:.0f} products per sample "
                  f"({100 * products / sum(x['products'] for x in solves_):.0f}% of the products), "
                  f"{100 * sum(x['seconds'] for x in wider) / seconds:.0f}% of the time")
        else:
            print(f"  {label_}: no wider block")
    ours = rows[0]["ratio"]
    print(f"  goal ≤ {GOAL} × best scipy: {'met' if ours <= GOAL else 'NOT met'} ({ours:.2f})")
    return {"site": label, "ratio": ours}


@contextmanager
def logged_solves(device):
    """The block Krylov solves inside: width, samples, products, seconds of each (the first one, then
    the wider blocks that samples with clusters go on with)."""
    log, original = [], engine_krylov._block_gkl

    def logged(op, k, width, **kw):
        start = time.perf_counter()
        returned = original(op, k, width, **kw)
        sync(device)
        log.append(dict(width=width, samples=op.shape[0], products=returned[0].products,
                        seconds=time.perf_counter() - start))
        return returned
    engine_krylov._block_gkl = logged
    try:
        yield log
    finally:
        engine_krylov._block_gkl = original


@contextmanager
def time_split(device):
    """Seconds inside, by part: Jacobian products inside the Krylov solver ("products"; "other
    products" outside it: RA2, capture checks), its orthogonalization (Gram–Schmidt and QR) and its
    Ritz checks (the SVD of the projected matrix and the bounds)."""
    clock: dict[str, float] = {}
    state = {"in_solve": False}
    originals = (JacobianOperator.matmat, JacobianOperator.rmatmat, engine_krylov._orthonormal_extension,
                 engine_krylov.krylov_svd, engine_krylov._BlockGKL.check)

    def timed(fn, key_of):
        def wrapper(*a, **kw):
            with stopwatch(device, clock, key_of()):
                return fn(*a, **kw)
        return wrapper

    def krylov(*a, **kw):
        state["in_solve"] = True
        try:
            return originals[3](*a, **kw)
        finally:
            state["in_solve"] = False

    product_key = lambda: "products" if state["in_solve"] else "other products"  # noqa: E731
    JacobianOperator.matmat = timed(originals[0], product_key)
    JacobianOperator.rmatmat = timed(originals[1], product_key)
    engine_krylov._orthonormal_extension = timed(originals[2], lambda: "orthogonalization")
    engine_krylov.krylov_svd = krylov
    engine_krylov._BlockGKL.check = timed(originals[4], lambda: "Ritz checks")
    try:
        yield clock
    finally:
        (JacobianOperator.matmat, JacobianOperator.rmatmat, engine_krylov._orthonormal_extension,
         engine_krylov.krylov_svd, engine_krylov._BlockGKL.check) = originals


def _time(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


# ---------------------------------------------------------------- whole probe

def probe_split(args, device) -> None:
    """The whole probe of a resnet50 (all sites, SVDs and RA2) in network forwards per sample, and where
    the time goes: Jacobian products inside the solver, its orthogonalization (Gram–Schmidt and QR),
    RA2 alignment, and everything else (capture, Ritz SVDs, metrics)."""
    size, samples, k = (112, 1, 8) if args.quick else (224, args.probe_samples, 16)
    torch.manual_seed(0)
    module = timm.create_model("resnet50", pretrained=False, zero_init_last=False, exportable=True)
    settings = Settings(k=k, tol=args.tol, device=str(device), seed=args.seed)
    model = PREPARED.enter_context(prepared(module, settings))
    x = torch.randn(samples, 3, size, size)
    data = Samples(x, None, "synthetic")
    found = discover(model, data, settings.resolved_device(), settings.resolved_dtype())
    sites = found.sites
    xd = x.to(device, settings.resolved_dtype())
    with torch.no_grad():
        model(xd)
        network = min(_time(lambda: model(xd), device) for _ in range(3)) / samples

    def split(label: str) -> None:
        with time_split(device) as clock:
            with stopwatch(device, clock, "total"):
                measured = measure(model, found.groups, data, settings)
        timings = [measured.timing(s.name) for s in sites]
        ra2 = sum(t.get("align_seconds", 0.0) for t in timings)
        products = sum(t["products"] for t in timings) / samples
        methods = sorted({measured.method(s.name) for s in sites})
        unconverged = sum(t["samples"] - t["converged"] for t in timings)
        total = clock["total"]
        parts = {"products": clock.get("products", 0.0), "orthogonalization": clock.get("orthogonalization", 0.0),
                 "RA2": ra2}
        parts["rest"] = total - sum(parts.values())
        print(f"\n{label}whole probe: resnet50 {size}px, {len(sites)} sites, {samples} samples, k={k}, "
              f"tol={args.tol:g}, solvers {', '.join(methods)}: {total:.1f} s = "
              f"{total / samples / network:.0f} network forwards per sample ({network * 1e3:.0f} ms each); "
              f"{products:,.0f} SVD products per sample"
              + (f"; {unconverged} site-samples not converged" if unconverged else ""))
        print("  " + ", ".join(f"{key} {value / samples / network:.0f} ({100 * value / total:.0f}%)"
                               for key, value in parts.items()))

    split("")
    if args.before:
        linearize_min, krylov = engine_operators.LINEARIZE_MIN_DIM, engine_krylov.krylov_svd
        engine_operators.LINEARIZE_MIN_DIM = math.inf
        engine_krylov.krylov_svd = lambda *a, **kw: krylov(*a, **{**kw, "reorthogonalize": "always"})
        try:
            split("before: ")
        finally:
            engine_operators.LINEARIZE_MIN_DIM, engine_krylov.krylov_svd = linearize_min, krylov


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--power", type=int, default=4, help="randomized SVD: power iterations q")
    parser.add_argument("--oversample", type=int, default=10, help="randomized SVD: extra columns p")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of torch and of scipy's BLAS")
    parser.add_argument("--probe-samples", type=int, default=2, help="samples of the whole resnet50 probe")
    parser.add_argument("--sites", default=",".join(f.__name__ for f in SITES),
                        help="comma-separated subset of " + ", ".join(f.__name__ for f in SITES) + ", probe")
    parser.add_argument("--quick", action="store_true", help="a fast smoke run: 2 samples, a small probe")
    parser.add_argument("--widths", type=lambda text: [int(w) for w in text.split(",") if w], default=[],
                        help="also time ra-probe's block solver at these block widths (comma-separated)")
    parser.add_argument("--before", action="store_true",
                        help="also time the engine as before (jvp, two full Gram–Schmidt passes) in the same run")
    args = parser.parse_args()
    if args.quick:
        args.samples = min(args.samples, 2)
    torch.set_flush_denormal(True)  # as the CLI does
    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)  # ARPACK's and PROPACK's BLAS too: idle BLAS threads spin on shared cores
    device = torch.device(args.device)
    print(f"{device} ({torch.get_num_threads()} threads), k={args.k}, tol={args.tol:g}, float32, "
          f"reference: float64 block Krylov at tol 1e-7")
    chosen = args.sites.split(",")
    results = [compare_site(build, args, device) for build in SITES if build.__name__ in chosen]
    if results:
        worst = max(r["ratio"] for r in results)
        print(f"\ngoal ≤ {GOAL} × best scipy on every site: {'met' if worst <= GOAL else 'NOT met'} "
              f"(worst {worst:.2f})")
    if "probe" in chosen or args.sites == parser.get_default("sites"):
        probe_split(args, device)


if __name__ == "__main__":
    main()
