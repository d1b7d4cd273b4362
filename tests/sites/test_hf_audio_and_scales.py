"""Tiny transformers models beyond text and plain ViT, saved and loaded back through the local-folder
source: a speech encoder-decoder (Whisper) probed on synthetic log-mel features with decoder tokens,
and told in one line what it needs when the data gives text; BEiT's layer-scaled branches; Swin's
windowed layers, which share ViT's layout."""
from __future__ import annotations

import math

import pytest
import torch
import transformers as tf
from tiny_models import saved

from ra_probe import Settings, probe
from ra_probe.errors import UserError
from ra_probe.load.data import Samples, load_samples
from ra_probe.load.models import load_model


def whisper(folder) -> str:
    config = tf.WhisperConfig(vocab_size=40, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                              decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=4,
                              max_source_positions=6, max_target_positions=8, pad_token_id=0, bos_token_id=0,
                              eos_token_id=0, decoder_start_token_id=0, architectures=["WhisperModel"])
    return saved(config, folder)


def test_a_speech_model_is_probed_on_synthetic_log_mel_features_and_decoder_tokens(tmp_path):
    loaded = load_model(whisper(tmp_path))
    # 6 positions after a stride-2 convolution: 12 frames of 4 mel bins
    assert (loaded.modality, loaded.input_shape) == ("audio", (4, 12))
    samples = load_samples("synthetic", loaded, limit=2)
    assert {k: tuple(v.shape) for k, v in samples.inputs.items()} == {"input_features": (2, 4, 12),
                                                                      "decoder_input_ids": (2, 8)}
    report = probe(loaded, samples, Settings(k=2, samples=2, batch_size=2, null="none"))
    assert report["skipped"] == []
    assert [s["name"] for s in report["sites"]] == \
           [f"encoder.layers.{i}.{b}" for i in (0, 1) for b in ("self_attn", "fc1")] + \
           [f"decoder.layers.{i}.{b}" for i in (0, 1) for b in ("self_attn", "encoder_attn", "fc1")]
    for site in report["sites"]:
        assert site["verify_error"] < 1e-5
        assert site["singular_values"][0] > 0 and all(math.isfinite(s) for s in site["singular_values"])
    # pre-norm layers: the sum goes on to the next add, the norm after it belongs to the next branch, so
    # no site has a post-op and each stack's sites chain into one group (before: LN as post, 8 groups)
    assert [(s["post"], s["group"]) for s in report["sites"]] == [(None, 0)] * 4 + [(None, 1)] * 6


def test_a_speech_model_given_text_is_one_line_naming_what_it_needs(tmp_path):
    loaded = load_model(whisper(tmp_path))
    ids = torch.randint(0, 40, (2, 5))
    text = Samples({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, None, "text")
    # before: AttributeError ('NoneType' object has no attribute 'shape') from the first forward
    with pytest.raises(UserError, match="^data 'text' does not fit the model: the model also takes input_features, "
                                        "decoder_input_ids, which the data does not give$"):
        probe(loaded, text, Settings(k=2, samples=2, null="none"))


def test_beit_layer_scaled_branches_are_verified_sites(tmp_path):
    config = tf.BeitConfig(image_size=16, patch_size=8, num_channels=1, hidden_size=16, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=32, layer_scale_init_value=0.5,
                           architectures=["BeitModel"])
    loaded = load_model(saved(config, tmp_path))
    report = probe(loaded, load_samples("synthetic", loaded, limit=2), Settings(k=2, samples=2, null="none"))
    assert report["skipped"] == [] and len(report["sites"]) == 4  # before, transformers 5: 4 skipped, λ left out
    assert all(site["verify_error"] < 1e-5 for site in report["sites"])


def test_swin_layers_with_the_vit_layout_are_left_to_the_detector_that_sees_their_windows(tmp_path):
    config = tf.SwinConfig(image_size=16, patch_size=2, num_channels=1, embed_dim=8, depths=[1, 1], num_heads=[1, 2],
                           window_size=4, architectures=["SwinModel"])
    loaded = load_model(saved(config, tmp_path))
    report = probe(loaded, load_samples("synthetic", loaded, limit=2), Settings(k=2, samples=2, null="none"))
    # before, transformers 5: the ViT adapter's attention branch, without the windows, could not run on stage 0
    assert report["skipped"] == [] and len(report["sites"]) == 4
    assert report["sites"][0]["input_shape"] == [64, 8]  # 8×8 tokens, in 4 windows of 4×4
    assert all(site["verify_error"] < 1e-5 for site in report["sites"])
