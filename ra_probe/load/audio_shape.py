"""The per-sample input shape of a speech model (log-mel features or a raw waveform), from its config."""
from __future__ import annotations

import math
from typing import Any

from torch import nn

# frames of a raw-waveform encoder's synthetic input: one second of wav2vec2's 20 ms frames
WAVEFORM_FRAMES = 50


def audio_shape(module: nn.Module, config: Any, extractor: Any) -> tuple[int, ...] | None:
    """The per-sample shape of a speech model's input; None when the config does not say.
    Log-mel features (Whisper's): (mel bins, frames), as many frames as its positions times the stride of
    the convolutions in front of them. A raw waveform (wav2vec2, HuBERT, WavLM...): (samples,), one second
    at the feature extractor's sampling rate (16 kHz without one), cut to the samples whose convolutional
    feature encoder gives `WAVEFORM_FRAMES` frames when a second gives more (a small encoder's stride)."""
    kernels, strides = getattr(config, "conv_kernel", None), getattr(config, "conv_stride", None)
    if kernels and strides:
        second = getattr(extractor, "sampling_rate", None) or 16000
        length = 1  # samples for one frame, then for WAVEFORM_FRAMES: each conv's (L - 1) * stride + kernel
        for kernel, stride in reversed(list(zip(kernels, strides))):
            length = (length - 1) * stride + kernel
        return (min(second, length + (WAVEFORM_FRAMES - 1) * math.prod(strides)),)
    bins, positions = getattr(config, "num_mel_bins", None), getattr(config, "max_source_positions", None)
    if not (isinstance(bins, int) and isinstance(positions, int)):
        return None
    stride = 1
    for conv in (m for m in module.modules() if isinstance(m, nn.Conv1d)):
        stride *= conv.stride[0]
    return bins, positions * stride
