"""Inputs every loaded model takes: raw waveforms for wav2vec2-style speech encoders (one second at the
sampling rate, or fewer samples where a small feature encoder would make a second very long), and the
decoder's tokens for encoder–decoders that do not derive them (Pegasus, T5), on synthetic data and on a
text file. Tiny transformers models built from configs, saved and loaded back through the folder source."""
from __future__ import annotations

import math

import pytest
import torch
import transformers as tf
from tiny_models import saved

from ra_probe import Settings, probe
from ra_probe.load.data import load_samples
from ra_probe.load.models import load_model

LAYERS = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
# a feature encoder of two convolutions, kernels 10 and 3, strides 5 and 2
WAVE = dict(conv_dim=[8, 8], conv_kernel=[10, 3], conv_stride=[5, 2], num_conv_pos_embeddings=4,
            num_conv_pos_embedding_groups=2)
SEQ2SEQ = dict(vocab_size=40, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
               decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=16)


def wave_model(family: str, folder) -> str:
    config = {"wav2vec2": tf.Wav2Vec2Config, "hubert": tf.HubertConfig}[family](
        **LAYERS, **WAVE, architectures=[{"wav2vec2": "Wav2Vec2Model", "hubert": "HubertModel"}[family]])
    return saved(config, folder)


def measured(report: dict, sites: int) -> None:
    assert report["skipped"] == [] and len(report["sites"]) == sites
    for site in report["sites"]:
        assert site["verify_error"] < 1e-5
        assert site["singular_values"][0] > 0 and all(math.isfinite(s) for s in site["singular_values"])


@pytest.mark.parametrize("family", ["wav2vec2", "hubert"])
def test_a_waveform_encoder_is_probed_on_synthetic_raw_audio(family, tmp_path):
    loaded = load_model(wave_model(family, tmp_path))
    # one second at 16 kHz would be 1600 frames of this stride-10 encoder: the samples of 50 frames instead,
    # its receptive field (3 frames of the second conv: (3 - 1) * 5 + 10 = 20 samples) and 49 strides
    assert (loaded.modality, loaded.input_shape) == ("audio", (20 + 49 * 10,))
    samples = load_samples("synthetic", loaded, limit=2)
    assert list(samples.inputs) == ["input_values"] and samples.inputs["input_values"].shape == (2, 510)
    # before: "the model also takes input_values, which the data does not give"
    report = probe(loaded, samples, Settings(k=2, samples=2, null="none"))
    measured(report, 5)  # the convolutional position embedding's add, and two sites per layer
    assert [s["input_shape"] for s in report["sites"][1:]] == [[50, 16]] * 4


def test_a_waveform_encoder_takes_one_second_at_its_feature_extractors_sampling_rate(tmp_path):
    folder = wave_model("wav2vec2", tmp_path)
    tf.Wav2Vec2FeatureExtractor(sampling_rate=400).save_pretrained(folder)
    assert load_model(folder).input_shape == (400,)  # one second: fewer samples than 50 frames take


def pegasus(folder) -> str:
    return saved(tf.PegasusConfig(**SEQ2SEQ, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                                  architectures=["PegasusModel"]), folder)


def t5(folder) -> str:
    return saved(tf.T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, pad_token_id=0,
                             eos_token_id=1, architectures=["T5Model"]), folder)


@pytest.mark.parametrize("build, sites", [(pegasus, 10), (t5, 10)])
def test_an_encoder_decoder_gets_its_decoders_tokens_on_synthetic_data(build, sites, tmp_path):
    loaded = load_model(build(tmp_path))
    samples = load_samples("synthetic", loaded, limit=2)
    ids, decoder = samples.inputs["input_ids"], samples.inputs["decoder_input_ids"]
    # the start token (both start with the pad token, 0), then the ids shifted right
    assert decoder.shape == ids.shape == (2, 16)
    assert decoder[:, 0].tolist() == [0, 0] and torch.equal(decoder[:, 1:], ids[:, :-1])
    # before: "the model also takes decoder_input_ids, which the data does not give"
    measured(probe(loaded, samples, Settings(k=2, samples=2, null="none")), sites)  # encoder 2 × 2, decoder 2 × 3


WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "residual", "branch", "aligns", "sites"]


@pytest.mark.parametrize("build", [pegasus, t5])
@pytest.mark.parametrize("side", ["right", "left"])
def test_an_encoder_decoder_reads_a_text_file_with_its_decoders_tokens_at_the_real_tokens(build, side, tmp_path):
    folder = build(tmp_path / "model")
    tf.BertTokenizer(vocab={word: i for i, word in enumerate(WORDS)}, padding_side=side,
                     model_input_names=["input_ids", "attention_mask"]).save_pretrained(folder)
    data = tmp_path / "lines.txt"
    data.write_text("the residual branch\nresidual\n")
    loaded = load_model(folder)
    samples = load_samples(str(data), loaded)
    ids, decoder = samples.inputs["input_ids"], samples.inputs["decoder_input_ids"]
    # [CLS] the residual branch [SEP], and [CLS] residual [SEP] padded by two; the decoder reads the start
    # token and then each line's real tokens shifted right, where its real tokens are
    pad = [0, 0]
    assert ids.tolist() == [[2, 5, 6, 7, 3], [2, 6, 3] + pad if side == "right" else pad + [2, 6, 3]]
    assert decoder.tolist() == [[0, 2, 5, 6, 7], [0, 2, 6] + pad if side == "right" else pad + [0, 2, 6]]
    report = probe(loaded, samples, Settings(k=2, samples=2, batch_size=2, null="none"))
    measured(report, 10)
    assert report["data"]["tokens"] == [5, 3]
