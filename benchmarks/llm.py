"""A 30-layer Llama-style language model, probed end to end: where the time goes (SVDs, RA2 alignment
and block coupling, report), the JSON size and the HTML time, in one run.

    python benchmarks/llm.py [--layers 30] [--hidden 576] [--samples 4] [--tokens 14] [--k 8]
                             [--site-level block] [--token-positions all] [--coupling-k 8] [--device cpu]
                             [--align-pairs auto] [--against-all]

The model is built from a config at random init (no download): the costs depend on the shapes (layers,
hidden size, tokens, k), not on the weights. The sentences are random token ids of equal length. The
target of the alignment: at most a quarter of the probe's time (`alignment / probe` printed last)."""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch
import transformers as tf

from ra_probe import Settings, probe
from ra_probe.engine import operators


def model(layers: int, hidden: int) -> torch.nn.Module:
    config = tf.LlamaConfig(vocab_size=2048, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                            num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 192,
                            max_position_embeddings=256, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=576, help="≥ 512; a multiple of 192")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=14, help="tokens per sentence")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--site-level", default="block", help="block | sublayer")
    parser.add_argument("--token-positions", default="all", help="all | last")
    parser.add_argument("--coupling-k", default="8")
    parser.add_argument("--device", default=None)
    parser.add_argument("--align-pairs", default="auto", help="all | partners per site | auto")
    parser.add_argument("--against-all", action="store_true", help="then the same probe measuring every pair: "
                                                                   "its time and how far the estimate is")
    parser.add_argument("--narrow", action="store_true", help="then the same probe with the alignment's products "
                                                              "in calls of the solver's chunk (the former way)")
    args = parser.parse_args()
    lm = model(args.layers, args.hidden)
    ids = torch.randint(1, 2048, (args.samples, args.tokens), generator=torch.Generator().manual_seed(0))
    settings = Settings(k=args.k, samples=args.samples, batch_size=args.samples, device=args.device, null="none",
                        site_level=args.site_level, tokens=args.token_positions, coupling_k=args.coupling_k,
                        align_pairs=int(args.align_pairs) if args.align_pairs.isdigit() else args.align_pairs)
    started = time.perf_counter()
    report = probe(lm, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, settings)
    probed = time.perf_counter() - started
    timings = report["timings"]
    svd, alignment = timings["sites_seconds"], timings["alignment_seconds"]
    tick = time.perf_counter()
    text = report.to_json()
    json_seconds = time.perf_counter() - tick
    tick = time.perf_counter()
    page = report.to_html()
    html_seconds = time.perf_counter() - tick
    params = sum(p.numel() for p in lm.parameters())
    print(f"llama-style, {args.layers} layers, hidden {args.hidden}, {params / 1e6:.0f}M parameters; "
          f"{args.samples} sentences of {args.tokens} tokens, k = {args.k}, --site-level {args.site_level}, "
          f"--tokens {args.token_positions}, --coupling-k {args.coupling_k}, {torch.get_num_threads()} threads")
    print(f"sites {len(report['sites'])}, groups {len(report['metrics']['ra2']['groups'])}, "
          f"products {timings['products']}")
    print(f"probe {probed:.1f} s: SVDs {svd:.1f} s, alignment + coupling {alignment:.1f} s, "
          f"rest (capture, summary, report) {probed - svd - alignment:.1f} s")
    print(f"JSON {len(text.encode()) / 1e6:.2f} MB in {json_seconds:.2f} s; HTML {len(page.encode()) / 1e6:.2f} MB "
          f"in {html_seconds:.1f} s")
    nc = report["metrics"]["nc"]
    print(f"NC on next tokens: {nc['classes']} classes used, {nc['classes_dropped']} dropped" if nc else "NC: none")
    group = report["metrics"]["ra2"]["groups"][0]
    print(f"RA2 pairs measured {group['pairs_measured']} of {group['pairs']}, score {group['score']:.4f}")
    print(f"alignment / probe = {alignment / probed:.2f} (target ≤ 0.25)")
    if args.against_all:
        started = time.perf_counter()
        exact = probe(lm, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                      dataclasses.replace(settings, align_pairs="all"))
        seconds, every = time.perf_counter() - started, exact["metrics"]["ra2"]["groups"][0]
        print(f"every pair: probe {seconds:.1f} s, alignment {exact['timings']['alignment_seconds']:.1f} s "
              f"({exact['timings']['alignment_seconds'] / seconds:.2f} of it); score {every['score']:.4f}, the "
              f"estimate's error {group['score'] - every['score']:+.4f}; this probe {probed / seconds:.2f}× its time")
    if args.narrow:
        operators.WIDE_ELEMENTS = 0  # every call as narrow as the solver's (--chunk)
        narrow = probe(lm, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, settings)["timings"]
        print(f"alignment in calls of {settings.vectors_per_call} vectors: {narrow['alignment_seconds']:.1f} s against "
              f"{alignment:.1f} s in wide calls (SVDs {narrow['sites_seconds']:.1f} s against {svd:.1f} s)")


if __name__ == "__main__":
    main()
