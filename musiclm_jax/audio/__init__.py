"""Audio I/O (load, resample, save, bad-input checks) and JAX spectral front-ends."""
from __future__ import annotations

import importlib

from musiclm_jax.audio.io import (  # noqa: F401
    DEFAULT_SAMPLE_RATE,
    REASONS,
    AudioError,
    AudioInfo,
    AudioLimits,
    SkipCounter,
    audio_info,
    load_audio,
    loudness_db,
    normalize_loudness,
    resample,
    save_wav,
)

# The front-ends import JAX; loaded on first use so that data-only processes (decode and
# resample workers) importing this package for `load_audio` do not pay for it.
_FEATURES = ('LogMelFrontEnd', 'stft', 'magnitude_spectrogram', 'mel_filterbank',
             'mel_spectrogram', 'log_mel_spectrogram', 'log_compress', 'hz_to_mel', 'mel_to_hz')


def __getattr__(name: str):
  if name in _FEATURES:
    return getattr(importlib.import_module('musiclm_jax.audio.features'), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = [
    'DEFAULT_SAMPLE_RATE', 'REASONS', 'AudioError', 'AudioInfo', 'AudioLimits', 'SkipCounter',
    'audio_info', 'load_audio', 'loudness_db', 'normalize_loudness', 'resample', 'save_wav',
    *_FEATURES,
]
