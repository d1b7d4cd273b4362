"""A Llama-architecture model of a billion parameters probed with part of its weights offloaded to
disk, against the same model loaded whole: time split, peak memory and the probe's estimate of it.

    python benchmarks/big.py [--layers 18] [--hidden 2048] [--intermediate 5504] [--vocab 32000]
                             [--in-memory 6] [--samples 2] [--tokens 6] [--k 4] [--skip-whole]

The model is built from a config at random init (no download) and saved (float32 safetensors) to a
temporary folder. Each load runs in a process of its own: with `--device-map`, the embeddings, the
head and the first `--in-memory` layers in CPU memory and the other layers on disk (read from the
saved files, one block at a time while its site is measured); then whole, without a device map. A
probe: `--samples` sentences of `--tokens` random token ids, top `--k`, `--tokens last`, no null.

Peak memory is the process's peak resident set (VmHWM) from the end of the load to the end of the
probe (the peak is reset after loading): what the probe itself needs. The estimate
(`pipeline.measure.PeakEstimate`) counts the weights in memory, the largest offloaded block made
resident at once, and the chunk's samples; it leaves out the interpreter and its libraries (the
resident set before loading, with what a probe imports on first use: `base`), so the ratio is
(peak − base) / estimate."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

GB = 1e9


def config(args: argparse.Namespace):
    import transformers as tf

    heads = args.hidden // 128
    return tf.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                          num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
                          max_position_embeddings=256, bos_token_id=0, eos_token_id=0, tie_word_embeddings=False,
                          architectures=["LlamaForCausalLM"])


def build(folder: Path, args: argparse.Namespace) -> int:
    """The model at random init, saved to `folder`; its parameter count."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config(args))
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def offloading_map(args: argparse.Namespace) -> dict[str, str]:
    layers = {f"model.layers.{i}": "cpu" if i < args.in_memory else "disk" for i in range(args.layers)}
    return {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", **layers, "model.norm": "cpu", "lm_head": "cpu"}


def memory_now(field: str) -> int:
    """VmRSS or VmHWM of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def probe_once(folder: str, offload: bool, args: argparse.Namespace) -> dict:
    """In this process: load (offloaded or whole), probe, and what it took."""
    import torch._dynamo  # noqa: F401 - loaded on first use by accelerate's hooks and torch.func: part of base

    from ra_probe import Settings
    from ra_probe.load.inputs import as_samples
    from ra_probe.load.models import load_model
    from ra_probe.pipeline.run import run

    base = memory_now("VmRSS")
    tick = time.perf_counter()
    loaded = load_model(folder, device_map=offloading_map(args) if offload else None)
    load_seconds = time.perf_counter() - tick
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on: the probe's
    ids = torch.randint(1, args.vocab, (args.samples, args.tokens), generator=torch.Generator().manual_seed(0))
    samples = as_samples({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, loaded, limit=args.samples)
    settings = Settings(k=args.k, samples=args.samples, batch_size=args.samples, tokens="last", null="none")
    outcome = run(loaded, samples, settings)
    timings = [site["timing"] for site in outcome.sites.values()]
    estimate = outcome.measured.peak
    return {"load": load_seconds, "probe": outcome.seconds, "svd": sum(t["seconds"] for t in timings),
            "alignment": sum(t["align_seconds"] for t in timings), "base": base, "peak": memory_now("VmHWM"),
            "estimate": estimate.total, "weights": estimate.weights, "resident_block": estimate.resident_block,
            "spectra": {name: site["singular_values"] for name, site in outcome.sites.items()}}


def in_a_process(folder: str, offload: bool) -> dict:
    """`probe_once` in a new process (its peak memory its own), with this run's arguments."""
    command = [sys.executable, __file__, *sys.argv[1:], "--child", folder] + (["--offload"] if offload else [])
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the {'offloaded' if offload else 'whole'} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def row(name: str, r: dict) -> str:
    other = r["probe"] - r["svd"] - r["alignment"]
    return (f"{name:<10} {r['load']:6.1f} {r['probe']:7.1f} {r['svd']:6.1f} {r['alignment']:6.1f} {other:6.1f}  "
            f"{r['weights'] / GB:7.2f} {r['block'] / GB:6.2f} {r['estimate'] / GB:8.2f} {r['base'] / GB:5.2f} "
            f"{r['peak'] / GB:6.2f} {(r['peak'] - r['base']) / r['estimate']:6.2f}")


def largest_gap(a: dict, b: dict) -> float:
    """The largest relative difference of two runs' singular values."""
    return max(abs(x - y) / abs(y) for name in b for x, y in zip(a[name], b[name]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--hidden", type=int, default=2048, help="a multiple of 128 (heads of 128)")
    parser.add_argument("--intermediate", type=int, default=5504)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--in-memory", type=int, default=6, help="layers kept in CPU memory; the rest on disk")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=6, help="tokens per sentence")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--skip-whole", action="store_true", help="no run of the whole model")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--offload", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(probe_once(args.child, args.offload, args)))
        return
    with tempfile.TemporaryDirectory(prefix="ra-probe-big-") as folder:
        tick = time.perf_counter()
        params = build(Path(folder), args)
        size = sum(f.stat().st_size for f in Path(folder).iterdir())
        print(f"llama, {args.layers} layers, hidden {args.hidden}, MLP {args.intermediate}, vocab {args.vocab}: "
              f"{params / 1e9:.2f}B parameters, {size / GB:.1f} GB float32 on disk (built and saved in "
              f"{time.perf_counter() - tick:.0f} s); {args.in_memory} layers in memory, {args.layers - args.in_memory} "
              f"on disk; {args.samples} sentences of {args.tokens} tokens, k = {args.k}, --tokens last, null off")
        runs = {"offloaded": in_a_process(folder, True)}
        if not args.skip_whole:
            runs["whole"] = in_a_process(folder, False)
    print(f"{'':<10} {'load':>6} {'probe':>7} {'SVDs':>6} {'align':>6} {'other':>6}  {'weights':>7} {'block':>6} "
          f"{'estimate':>8} {'base':>5} {'peak':>6} {'ratio':>6}")
    print(f"{'':<10} {'s':>6} {'s':>7} {'s':>6} {'s':>6} {'s':>6}  {'GB':>7} {'GB':>6} {'GB':>8} {'GB':>5} "
          f"{'GB':>6} {'':>6}")
    for name, result in runs.items():
        print(row(name, result))
    print("ratio = (peak − base) / estimate; peak: the probe's peak resident set (after loading)")
    if "whole" in runs:
        print(f"largest relative difference of the singular values, offloaded against whole: "
              f"{largest_gap(runs['offloaded']['spectra'], runs['whole']['spectra']):.1e}")


if __name__ == "__main__":
    main()
