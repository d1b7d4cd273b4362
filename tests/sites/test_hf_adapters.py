"""Tiny Hugging Face models built from configs, saved to a temporary folder and loaded back through
the local-folder source: every site found, verified and measured; text data through a tokenizer."""
from __future__ import annotations

import math

import pytest
import transformers as tf
from tiny_models import hf_config, saved

from ra_probe import Settings, probe
from ra_probe.cli import main
from ra_probe.load.data import Samples, load_samples
from ra_probe.load.models import load_model

SHAPES = {"resnet": (1, 32, 32)}  # HF ResNet configs name no image size (224 by default): keep it small
SITES = {"bert": (4, "hf-bert"), "gpt2": (2, "hf-gpt2"), "llama": (2, "hf-llama"), "vit": (4, "hf-vit"),
         "resnet": (2, "hf-resnet")}  # sites found (decoders: one per block), adapter
CONFIGS = {family: (hf_config(family), *SITES[family]) for family in SITES}


@pytest.mark.parametrize("family", list(CONFIGS))
def test_tiny_hf_model_from_a_folder_all_sites_found_verified_and_measured(family, tmp_path):
    config, count, adapter = CONFIGS[family]
    loaded = load_model(saved(config, tmp_path), input_shape=SHAPES.get(family))
    samples = load_samples("synthetic", loaded, limit=2)
    report = probe(loaded, samples, Settings(k=3, samples=2, batch_size=2))
    assert report["model"]["adapter"] == adapter
    assert report["skipped"] == []
    assert len(report["sites"]) == count
    for site in report["sites"]:
        assert site["verify_error"] < 1e-5
        assert site["singular_values"][0] > 0 and all(math.isfinite(s) for s in site["singular_values"])
        assert site["max_residual"] < 1e-3
    null = report["metrics"]["null"]  # the architecture rebuilt from its config, at random init
    assert null["status"] == "measured" and null["sites"] == count and "from its config" in null["init"]
    assert report["model"]["pretrained"] is True


def test_text_file_goes_through_the_model_tokenizer(tmp_path):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "residual", "branch", "aligns", "sites"]
    (tmp_path / "vocab.txt").write_text("\n".join(words))
    config = CONFIGS["bert"][0]
    folder = saved(config, tmp_path / "model")
    tf.BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(folder)  # transformers 5 ignores vocab_file=
    data = tmp_path / "lines.txt"
    data.write_text("the residual branch\n\nthe sites aligns\nresidual\n")
    samples = load_samples(str(data), load_model(folder))
    assert isinstance(samples, Samples) and len(samples) == 3  # the empty line is not an example
    ids = samples.inputs["input_ids"]
    assert ids.shape == (3, 5) and ids[:, 0].tolist() == [2, 2, 2]  # [CLS] first, padded to the longest
    assert ids.tolist() == [[2, 5, 6, 7, 3], [2, 5, 9, 8, 3], [2, 6, 3, 0, 0]]  # the words' own ids, not [UNK]
    assert samples.inputs["attention_mask"].tolist() == [[1] * 5, [1] * 5, [1, 1, 1, 0, 0]]


def test_sites_command_names_the_adapter_and_every_site(tmp_path, capsys):
    folder = saved(CONFIGS["gpt2"][0], tmp_path)
    main(["sites", folder])  # a decoder's default: one site per block
    out = capsys.readouterr().out
    assert "hf-gpt2" in out and "transformer.h.1" in out
    assert not any(f"transformer.h.{i}.{part}" in out for i in (0, 1) for part in ("attn", "mlp"))
    main(["sites", folder, "--sites", "sublayer"])
    out = capsys.readouterr().out
    assert all(f"transformer.h.{i}.{part}" in out for i in (0, 1) for part in ("attn", "mlp"))


def test_sites_command_says_when_there_is_no_residual_connection(capsys):
    main(["sites", "bundled/fc-digits-noskip"])
    assert "no residual connections found" in capsys.readouterr().out


def test_adapters_command_lists_the_families(capsys):
    main(["adapters"])
    out = capsys.readouterr().out
    assert "hf-llama" in out and "timm-swin" in out and "generic" in out
