"""Coverage of the model zoo: `ra-probe` run as a user runs it on the smallest model of every timm
family and on tiny configs of transformers architectures with residual blocks, offline, at random
init, each in its own process with a time limit.

    python benchmarks/zoo.py [--timm-only | --hf-only] [--family resnet --family vit ...] [--limit N]
                             [--timeout 180] [--jobs 2] [--samples 1] [--json zoo.json]

Per model: the small probe `ra-probe MODEL --data synthetic --samples 1 --k 2 --tol 0.1 --null none` (coverage,
not precision: a loose tolerance, and no null, which measures the same sites of the same random init again;
`--samples 3` also solves several samples at once, whose batch the solver narrows as samples converge;
`ra-probe sites MODEL` when the probe fails, to count what was found), then one row: sites found (verified + skipped),
verified, skipped with their reasons, probed (exit 0 with every verified site measured), the probe's
peak memory (its report's measured peak resident set), and the error line. A model counts as covered
when it is probed with at least one site, or when it is reported to have no residual connection and
its family is one whose blocks do not add a skip. Any output that shows a Python traceback is an error.
The summary gives families covered / total per category. The smallest model of a timm family is the
one with the fewest parameters (counted on the meta device, cached in the system's temporary folder)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CACHE = Path(tempfile.gettempdir()) / "ra-probe-zoo-sizes.json"
# families whose smallest model adds no skip (dense concatenation, plain stacks): "no residual connections
# found" is their right answer (inception_resnet_v2, xception, tresnet and hardcorenas do add skips)
NOT_RESIDUAL = {"densenet", "rdnet", "inception_v3", "inception_v4", "vgg", "vovnet", "selecsls"}
TEXT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64)
SEQ2SEQ = {"d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 2,
           "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64}
# raw-waveform encoders: a small two-layer conv feature encoder (stride 10) in front of the transformer
WAVE = {"conv_dim": [16, 16], "conv_stride": [5, 2], "conv_kernel": [10, 3], "num_conv_pos_embeddings": 16,
        "num_conv_pos_embedding_groups": 2}
# transformers architectures with residual blocks: (category, model type, model class, config overrides)
HF = [
    ("encoder", "bert", "BertModel", {}), ("encoder", "roberta", "RobertaModel", {}),
    ("encoder", "electra", "ElectraModel", {"embedding_size": 32}),
    ("encoder", "deberta-v2", "DebertaV2Model", {}), ("encoder", "distilbert", "DistilBertModel",
                                                     {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64}),
    ("encoder", "albert", "AlbertModel", {"embedding_size": 16}), ("encoder", "mpnet", "MPNetModel", {}),
    ("encoder", "xlm-roberta", "XLMRobertaModel", {}),
    ("decoder", "gpt2", "GPT2Model", {"n_embd": 32, "n_layer": 2, "n_head": 2}),
    ("decoder", "gpt_neox", "GPTNeoXModel", {}), ("decoder", "opt", "OPTModel", {"ffn_dim": 64,
                                                                                 "word_embed_proj_dim": 32}),
    ("decoder", "llama", "LlamaModel", {"num_key_value_heads": 1}),
    ("decoder", "mistral", "MistralModel", {"num_key_value_heads": 1}),
    ("decoder", "qwen2", "Qwen2Model", {"num_key_value_heads": 1}), ("decoder", "gemma", "GemmaModel",
                                                                     {"num_key_value_heads": 1, "head_dim": 16}),
    ("decoder", "phi", "PhiModel", {}), ("decoder", "falcon", "FalconModel", {}),
    ("decoder", "bloom", "BloomModel", {"n_layer": 2, "n_head": 2}),
    ("decoder", "gptj", "GPTJModel", {"n_embd": 32, "n_layer": 2, "n_head": 2, "rotary_dim": 8}),
    ("decoder", "cohere", "CohereModel", {"num_key_value_heads": 1}),
    ("encoder-decoder", "bart", "BartModel", {"d_model": 32, "encoder_layers": 2, "decoder_layers": 2,
                                              "encoder_attention_heads": 2, "decoder_attention_heads": 2,
                                              "encoder_ffn_dim": 64, "decoder_ffn_dim": 64}),
    ("encoder-decoder", "t5", "T5EncoderModel", {"d_model": 32, "d_kv": 16, "d_ff": 64, "num_layers": 2,
                                                  "num_heads": 2}),
    ("encoder-decoder", "mt5", "MT5Model", {"d_model": 32, "d_kv": 16, "d_ff": 64, "num_layers": 2, "num_heads": 2}),
    ("encoder-decoder", "pegasus", "PegasusModel", SEQ2SEQ), ("encoder-decoder", "mbart", "MBartModel", SEQ2SEQ),
    ("encoder-decoder", "marian", "MarianModel", SEQ2SEQ),
    ("vision", "vit", "ViTModel", {"image_size": 32, "patch_size": 8}),
    ("vision", "deit", "DeiTModel", {"image_size": 32, "patch_size": 8}),
    ("vision", "beit", "BeitModel", {"image_size": 32, "patch_size": 8}),
    ("vision", "dinov2", "Dinov2Model", {"image_size": 32, "patch_size": 8}),
    ("vision", "swin", "SwinModel", {"image_size": 32, "patch_size": 4, "embed_dim": 16, "depths": [1, 1],
                                     "num_heads": [1, 2], "window_size": 4}),
    ("vision", "convnext", "ConvNextModel", {"hidden_sizes": [8, 16], "depths": [1, 1], "num_stages": 2}),
    ("vision", "resnet", "ResNetModel", {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1]}),
    ("vision", "regnet", "RegNetModel", {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1],
                                         "groups_width": 8}),
    ("vision", "clip_vision_model", "CLIPVisionModel", {"image_size": 32, "patch_size": 8}),
    ("audio", "whisper", "WhisperModel", {"d_model": 32, "encoder_layers": 2, "encoder_attention_heads": 2,
                                          "decoder_layers": 2, "decoder_attention_heads": 2, "decoder_ffn_dim": 64,
                                            "encoder_ffn_dim": 64, "num_mel_bins": 8, "max_source_positions": 16}),
    ("audio", "wav2vec2", "Wav2Vec2Model", WAVE), ("audio", "hubert", "HubertModel", WAVE),
    ("audio", "wavlm", "WavLMModel", {**WAVE, "num_buckets": 16, "max_bucket_distance": 32}),
    ("audio", "data2vec-audio", "Data2VecAudioModel", WAVE),
]


def timm_families(only: set[str]) -> list[tuple[str, str]]:
    """(family, smallest model) for every timm model module, or for those in `only`."""
    import timm
    import torch

    sizes = json.loads(CACHE.read_text()) if CACHE.exists() else {}
    out = []
    for family in sorted(timm.list_modules()):
        if only and family not in only:
            continue
        names = timm.list_models(module=family)
        for name in names:
            if name not in sizes:
                try:
                    with torch.device("meta"):
                        sizes[name] = sum(p.numel() for p in timm.create_model(name).parameters())
                except Exception:  # noqa: BLE001 - a model that cannot be built is not a candidate
                    sizes[name] = float("inf")
        CACHE.write_text(json.dumps(sizes))
        if names:
            # timm's test_* models are cut-down variants for its own tests: the smallest real model instead
            out.append((family, min(names, key=lambda n: (n.startswith("test_"), sizes[n], n))))
    return out


def hf_folder(model_type: str, cls: str, overrides: dict, root: Path) -> Path:
    """A tiny random-init transformers model saved to a folder the CLI loads."""
    import torch
    import transformers as tf

    default = tf.AutoConfig.for_model(model_type)
    # a text size the overrides set under the config's own name (Swin's num_heads for num_attention_heads)
    # is left to them: transformers 5 applies the alias last
    named = {default.attribute_map.get(key, key) for key in overrides} | set(overrides)
    small = {key: value for key, value in TEXT.items() if hasattr(default, key)
             and default.attribute_map.get(key, key) not in named}
    # special tokens inside the tiny vocabulary (transformers 5 checks them when the config is made)
    tokens = {key: 0 for key, value in default.to_dict().items()
              if key.endswith("token_id") and isinstance(value, int) and value >= TEXT["vocab_size"]}
    config = tf.AutoConfig.for_model(model_type, **{**small, **tokens, **overrides})  # derived fields follow
    config.architectures = [cls]
    torch.manual_seed(0)
    folder = root / model_type
    getattr(tf, cls)(config).save_pretrained(folder)
    return folder


CLI = [str(Path(sys.executable).parent / "ra-probe")]
SITES = [sys.executable, __file__]


def run(args: list[str], timeout: float, command: list[str] = CLI) -> tuple[int | None, str, str, float]:
    start = time.time()
    try:
        done = subprocess.run([*command, *args], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "0"})
        return done.returncode, done.stdout, done.stderr, time.time() - start
    except subprocess.TimeoutExpired:
        return None, "", "", time.time() - start


def measure(category: str, family: str, ref: str, extra: list[str], timeout: float, folder: Path,
            threads: list[str], samples: int = 1) -> dict:
    """One model: the small probe, and `sites` when the probe fails."""
    report = folder / f"{family}.json"
    code, out, err, seconds = run([ref, *extra, "--data", "synthetic", "--samples", str(samples), "--k", "2", "--json",
                                   str(report), "--html", str(folder / f"{family}.html"), "--force", "--quiet",
                                   "--no-cache", "--tol", "0.1", "--null", "none", *threads], timeout)
    row = {"category": category, "family": family, "model": ref, "seconds": round(seconds, 1), "found": 0,
           "verified": 0, "skipped": [], "probed": False, "error": None, "traceback": "Traceback" in out + err}
    if code is None:
        row["error"] = f"time limit ({timeout:.0f} s)"
        return row
    if code == 0:
        data = json.loads(report.read_text())
        row.update(verified=len(data["sites"]), skipped=[f"{s['name']}: {s['reason']}" for s in data["skipped"]],
                   probed=True, peak_gb=round((data["timings"]["peak_bytes"] or 0) / 1e9, 2))
    else:
        row["error"] = (err.strip().splitlines() or [f"exit {code}"])[-1][:200]
        code, out, err, _ = run(["--sites", ref, *(["--sites-no-pretrained"] if extra else [])], timeout, SITES)
        row["traceback"] |= "Traceback" in out + err
        if code == 0:
            found = json.loads(out.strip().splitlines()[-1])
            row.update(verified=found["verified"], skipped=found["skipped"])
    row["found"] = row["verified"] + len(row["skipped"])
    return row


def sites_only(ref: str, pretrained: bool) -> None:
    """`ra-probe sites` as data: the verified sites and the skipped ones, as one JSON line."""
    from ra_probe.api import find_sites

    report = find_sites(ref, "synthetic", **({} if pretrained else {"pretrained": False}))
    print(json.dumps({"verified": len(report.sites), "skipped": [f"{s.name}: {s.reason}" for s in report.skipped]}))


def covered(row: dict) -> bool:
    if row["traceback"] or row["error"]:
        return False
    return row["verified"] > 0 or (row["family"] in NOT_RESIDUAL and not row["skipped"])


def print_table(rows: list[dict]) -> None:
    print(f"{'category':16} {'family':26} {'model':40} {'found':>5} {'verif':>5} {'skip':>5} {'probed':>6}  note")
    for r in rows:
        note = r["error"] or ("traceback in output" if r["traceback"] else "") or \
            ("; ".join(sorted({s.split(': ', 1)[1] for s in r["skipped"]}))[:120] if r["skipped"] else "")
        print(f"{r['category']:16} {r['family']:26} {r['model'][:40]:40} {r['found']:5} {r['verified']:5} "
              f"{len(r['skipped']):5} {'yes' if r['probed'] else 'no':>6}  {'OK ' if covered(r) else '-- '}{note}")
    print("\nfamilies covered / total by category:")
    for category in dict.fromkeys(r["category"] for r in rows):
        mine = [r for r in rows if r["category"] == category]
        print(f"  {category:16} {sum(map(covered, mine))} / {len(mine)}")
    print(f"  {'all':16} {sum(map(covered, rows))} / {len(rows)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timm-only", action="store_true")
    parser.add_argument("--hf-only", action="store_true")
    parser.add_argument("--family", action="append", default=[], help="a timm module or transformers model type")
    parser.add_argument("--limit", type=int, default=None, help="at most this many models")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per model and command")
    parser.add_argument("--jobs", type=int, default=1, help="models measured at once (one thread each when > 1)")
    parser.add_argument("--samples", type=int, default=1, help="samples per probe")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    parser.add_argument("--sites", help=argparse.SUPPRESS)  # the worker of one `sites` count
    parser.add_argument("--sites-no-pretrained", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sites:
        return sites_only(args.sites, not args.sites_no_pretrained)
    only = set(args.family)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        jobs = []
        if not args.hf_only:
            jobs += [("timm", family, f"timm/{name}", ["--no-pretrained"]) for family, name in timm_families(only)]
        if not args.timm_only:
            for category, model_type, cls, overrides in HF:
                if not only or model_type in only:
                    jobs.append((f"hf {category}", model_type, (model_type, cls, overrides), []))
        jobs = jobs[:args.limit]
        threads = ["--threads", "1"] if args.jobs > 1 else []

        building = threading.Lock()  # transformers' lazy imports are not thread-safe: two jobs at once
        # building their models raised AttributeError for a class the other was importing

        def one(job: tuple) -> dict:
            category, family, ref, extra = job
            if isinstance(ref, tuple):
                try:
                    with building:
                        ref = str(hf_folder(*ref, folder))
                except Exception as exc:  # noqa: BLE001 - a config this script cannot build: say so
                    return {"category": category, "family": family, "model": ref[1], "seconds": 0, "found": 0,
                            "verified": 0, "skipped": [], "probed": False, "traceback": False,
                            "error": f"tiny config not built here: {type(exc).__name__}"}
            row = measure(category, family, ref, extra, args.timeout, folder, threads, args.samples)
            row["model"] = row["model"] if extra else f"{family} (tiny config)"
            return row

        with ThreadPoolExecutor(args.jobs) as pool:  # each job is a process of its own
            for r in pool.map(one, jobs):
                rows.append(r)
                peak = f", peak {r['peak_gb']:.2f} GB" if r.get("peak_gb") else ""
                print(f"[{len(rows)}/{len(jobs)}] {r['family']}: {r['verified']} sites, {len(r['skipped'])} skipped, "
                      f"{'probed' if r['probed'] else r['error']} ({r['seconds']} s{peak})", file=sys.stderr, flush=True)
                if args.json:
                    args.json.write_text(json.dumps(rows, indent=1))
    print_table(rows)


if __name__ == "__main__":
    main()
