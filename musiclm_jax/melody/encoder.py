"""The melody embedder: a ViT over log-mel frames, one 192-d unit vector per 4 s of audio.

MusicLM conditions on melody with a ViT "on mel frames" (12 layers, 6 heads, width 512, FF 1024)
trained with a semi-hard triplet loss on same-melody pairs; it embeds 4 s windows into 192-d, three
per 10 s clip (3 s hop). The paper says no more; this module's choices:

* Front end: the project's `LogMelFrontEnd` with a melody-friendly default (`MELODY_FRONT_END`:
  n_fft 2048 so that 11.7 Hz STFT bins resolve the low notes of a hummed tune, 10 ms hop,
  128 Slaney mel bands from 30 Hz to 8 kHz, where melodies and their first harmonics live; the
  paper's "mel frames"), or `PitchFrontEnd`: the same STFT's power on a semitone grid (two bins
  per semitone, C2 to C8), on which a transposition is a shift of the frequency axis. Either is
  standardised per window (`mulan.audio.standardize_per_clip`: zero mean and unit variance over
  the window's frames and bands, so loudness and gain never matter and nothing depends on the
  rest of the batch).
* Augmentation (training only, `pitch_shift_bins`, needs `PitchFrontEnd`): every window is
  transposed by a random shift of the frequency axis. The embedded corpus has a few hundred
  melodies; without it a small model learns to tell the training melodies apart by their
  absolute pitches and does not generalise to new ones (measured: see README.md, Melody).
* Tokens ("mel frames"): `patch_time` consecutive frames of the whole band (`patch_freq=None`,
  the default) are one token: a 4 s window is 401 frames -> 101 tokens of 4 frames, so the
  sequence stays short and every token sees the whole spectrum of its 40 ms (what a pitch
  detector needs). With `patch_freq` set, tokens are ViT-style time x frequency patches in
  time-major order with a learned embedding per frequency patch.
* Positions: T5 relative position biases over the time-patch distance, shared by all layers:
  the embedding is shift-invariant in time and any window length works.
* Layers: `musiclm_jax.nn.DecoderLayer` (pre-LayerNorm self-attention + GELU MLP, logical axis
  names 'embed', 'heads', 'kv', 'mlp') called without a mask, which makes it a bidirectional
  encoder layer. Its `TransformerConfig` has no vocabulary here (vocab_size=1 is a placeholder).
* Pooling: the mean of the final LayerNorm's token states, then a bias-free projection to
  `output_dim` (192) and L2 normalisation.

Windows: `embed_windows` cuts clips into windows of `window_seconds` every `hop_seconds` and
embeds each: `num_windows(samples) = 1 + (samples - window) // hop` whole windows (the tail that
is less than a hop past the last window is not embedded); a clip shorter than one window is one
zero-padded window. 10 s -> windows starting at 0, 3 and 6 s -> 3 embeddings; 4 s -> 1.

Key: the training pairs (musiclm_jax/melody/data.py) are renderings of one melody in different
keys and registers, so the embedding is trained to be transposition-invariant: "the same melody"
means the same intervals and rhythm, whatever the key (see data.py for why).

Typical use:

  encoder = MelodyEncoder.tiny()
  variables = encoder.init(jax.random.key(0), jnp.zeros((1, encoder.window_samples)))
  emb = encoder.apply(variables, wav_10s, method=MelodyEncoder.embed_windows)  # [B, 3, 192]
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Union

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from musiclm_jax.audio.features import LogMelFrontEnd, log_compress, magnitude_spectrogram
from musiclm_jax.mulan.audio import standardize_per_clip
from musiclm_jax.mulan.losses import l2_normalize
from musiclm_jax.nn.attention import DenseGeneral, RelativePositionBiases
from musiclm_jax.nn.transformer import DecoderLayer, LayerNorm, TransformerConfig

Array = jax.Array
Dtype = Any

SAMPLE_RATE = 24000
EMBED_DIM = 192
MELODY_FRONT_END = LogMelFrontEnd(n_fft=2048, hop_length=240, n_mels=128, fmin=30.0,
                                  fmax=8000.0)
_TOKEN_AXES = ('batch', 'length', 'embed')


def num_windows(num_samples: int, window_samples: int, hop_samples: int) -> int:
  """Whole windows of a clip: 1 + (samples - window) // hop, and 1 for a clip shorter than one."""
  if window_samples <= 0 or hop_samples <= 0:
    raise ValueError(f'window ({window_samples}) and hop ({hop_samples}) must be positive')
  return 1 + max(0, int(num_samples) - int(window_samples)) // int(hop_samples)


def frame_windows(audio: Array, window_samples: int, hop_samples: int) -> Array:
  """[batch, samples] -> [batch, num_windows, window_samples] (see `num_windows`).

  Window k covers samples [k * hop, k * hop + window); a clip shorter than one window is
  zero-padded at the end to one window.
  """
  audio = jnp.asarray(audio)
  if audio.ndim != 2:
    raise ValueError(f'audio must be [batch, samples], got shape {audio.shape}')
  samples = audio.shape[1]
  if samples < window_samples:
    audio = jnp.pad(audio, ((0, 0), (0, window_samples - samples)))
  n = num_windows(samples, window_samples, hop_samples)
  index = np.arange(n)[:, None] * hop_samples + np.arange(window_samples)[None, :]
  return audio[:, index]


@functools.lru_cache(maxsize=16)
def pitch_filterbank(sample_rate: int, n_fft: int, min_midi: float, max_midi: float,
                     bins_per_semitone: int) -> np.ndarray:
  """[n_fft // 2 + 1, bins] triangles on a semitone grid, each summing to 1 (see PitchFrontEnd).

  Bin b is centred at MIDI min_midi + b / bins_per_semitone. Its triangle spans one bin spacing
  on either side in log frequency, widened to at least one STFT bin where the grid is finer
  than the STFT (low notes): there it interpolates between the nearest STFT bins.
  """
  num_bins = int(round((max_midi - min_midi) * bins_per_semitone)) + 1
  midi = min_midi + np.arange(num_bins) / bins_per_semitone
  centre = 440.0 * 2.0 ** ((midi - 69.0) / 12.0)
  if centre[-1] >= sample_rate / 2:
    raise ValueError(f'max_midi={max_midi} ({centre[-1]:.0f} Hz) is not below Nyquist '
                     f'({sample_rate / 2:.0f} Hz)')
  step = 2.0 ** (1.0 / (12.0 * bins_per_semitone))
  half_width = np.maximum(centre * (step - 1.0), sample_rate / n_fft)
  freqs = np.arange(n_fft // 2 + 1) * sample_rate / n_fft
  weights = np.maximum(0.0, 1.0 - np.abs(freqs[:, None] - centre[None, :]) / half_width[None])
  return (weights / weights.sum(axis=0, keepdims=True)).astype(np.float32)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PitchFrontEnd:
  """Log power on a semitone grid (a constant-Q-like spectrogram from one STFT), for melody.

  On this axis a transposition by k semitones is a shift by k * bins_per_semitone bins, for
  every harmonic at once (on the mel axis it is not: Slaney mels are linear below 1 kHz), which
  is what `MelodyEncoder.pitch_shift_bins` augmentation relies on. Default grid: C2 (65 Hz) to C8
  (4.2 kHz), two bins per semitone (145 bins), from a 2048-point STFT (11.7 Hz resolution; below
  about 200 Hz the grid is finer than the STFT and neighbouring bins interpolate, so low notes
  are told apart by their harmonics).

  Attributes:
    sample_rate: expected input rate (Hz).
    n_fft: STFT size.
    hop_length: samples between frames.
    min_midi: pitch of the lowest bin.
    max_midi: pitch of the highest bin.
    bins_per_semitone: grid resolution.
    log_floor: floor of the power before the natural log.
  """
  sample_rate: int = 24000
  n_fft: int = 2048
  hop_length: int = 480
  min_midi: float = 36.0
  max_midi: float = 108.0
  bins_per_semitone: int = 2
  log_floor: float = 1e-5

  @property
  def num_bins(self) -> int:
    return int(round((self.max_midi - self.min_midi) * self.bins_per_semitone)) + 1

  @property
  def frame_rate(self) -> float:
    return self.sample_rate / self.hop_length

  def __call__(self, audio: Array) -> Array:
    """[..., samples] -> float32 [..., frames, num_bins] natural-log power."""
    power = magnitude_spectrogram(audio, self.n_fft, self.hop_length, power=2.0)
    bank = pitch_filterbank(self.sample_rate, self.n_fft, float(self.min_midi),
                            float(self.max_midi), int(self.bins_per_semitone))
    pitch = jnp.einsum('...tf,fb->...tb', power, jnp.asarray(bank),
                       precision=jax.lax.Precision.HIGHEST)
    return log_compress(pitch, 'log', self.log_floor)


FrontEnd = Union[LogMelFrontEnd, PitchFrontEnd]


def shift_frequency(x: Array, shifts: Array) -> Array:
  """Moves each example's spectrogram [b, frames, bins] up by shifts[b] bins (down if < 0).

  Bins moved in from outside take the example's minimum (its silence level).
  """
  bins = x.shape[-1]
  source = jnp.arange(bins)[None, :] - shifts[:, None]               # [b, bins]
  inside = (source >= 0) & (source < bins)
  moved = jnp.take_along_axis(x, jnp.clip(source, 0, bins - 1)[:, None, :], axis=-1)
  floor = jnp.min(x, axis=(-2, -1), keepdims=True)
  return jnp.where(inside[:, None, :], moved, floor)


def interval_features(log_spectrogram: Array, lags: tuple[int, ...], max_bins: int) -> Array:
  """Transposition-invariant features of a semitone-grid spectrogram: how frame t relates to t+lag.

  Each frame's log power above its mean (ReLU), scaled to unit norm, is a pitch salience s_t;
  the features of frame t are, for each lag and each shift k in [-max_bins, max_bins],
  sum_f s_t(f) s_{t+lag}(f + k): large when the note `lag` frames later is k bins above this
  one's (k = 0 while a note is held). Moving the whole spectrogram along the frequency axis
  (a transposition) leaves them unchanged, up to what falls off the edges of the grid.

  Args:
    log_spectrogram: [b, frames, bins] on a log-frequency grid (`PitchFrontEnd`).
    lags: frame distances compared.
    max_bins: largest shift compared, in bins.

  Returns:
    float32 [b, frames, len(lags) * (2 * max_bins + 1)]; frames past the end compare with
    silence (zeros).
  """
  x = log_spectrogram.astype(jnp.float32)
  x = jax.nn.relu(x - jnp.mean(x, axis=-1, keepdims=True))
  x = x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), 1e-12))
  _, frames, bins = x.shape
  padded = jnp.pad(x, ((0, 0), (0, max(lags)), (max_bins, max_bins)))
  out = []
  for lag in lags:
    later = padded[:, lag:lag + frames]                          # [b, frames, bins + 2 m]
    out += [jnp.sum(x * later[:, :, j:j + bins], axis=-1) for j in range(2 * max_bins + 1)]
  return jnp.stack(out, axis=-1)


@gin.configurable
class MelodyEncoder(nn.Module):
  """ViT over log-mel frames -> an L2-normalised `output_dim` vector per window.

  The defaults are the paper's sizes (12 layers, 6 heads, width 512, FF 1024, 192-d output;
  head_dim 64, so attention is 384 wide: 512 does not split into 6 heads). See the module
  docstring for the design.

  Attributes:
    front_end: the log-mel front end (its sample rate is the expected input rate).
    window_seconds: length of an embedded window (4 s in the paper).
    hop_seconds: hop between windows in `embed_windows` (3 s in the paper).
    patch_time: frames per token.
    patch_freq: mel bands per token; None: the whole band (one token per `patch_time` frames).
    embed_dim: model width.
    num_layers: transformer layers.
    num_heads: attention heads.
    head_dim: per-head width.
    mlp_dim: feed-forward width.
    output_dim: embedding width (192 in the paper).
    dropout_rate: dropout on sub-layer outputs and attention weights ('dropout' rng).
    features: 'spectrogram' (tokens from the standardised front-end output) or 'intervals'
      (tokens from `interval_features` of a `PitchFrontEnd` output: transposition-invariant by
      construction).
    interval_lags: frame distances of 'intervals'.
    max_interval_bins: largest shift of 'intervals', in bins (24 = an octave at 2 bins per
      semitone).
    pitch_shift_bins: training augmentation: each window's spectrogram is moved along the
      frequency axis by a random whole number of bins in [-pitch_shift_bins, pitch_shift_bins]
      ('augment' rng; off when deterministic). A transposition only with a `PitchFrontEnd`.
    relative_num_buckets: T5 relative position buckets.
    relative_max_distance: distance (in time patches) at which buckets saturate.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  front_end: FrontEnd = MELODY_FRONT_END
  window_seconds: float = 4.0
  hop_seconds: float = 3.0
  patch_time: int = 4
  patch_freq: Optional[int] = None
  embed_dim: int = 512
  num_layers: int = 12
  num_heads: int = 6
  head_dim: int = 64
  mlp_dim: int = 1024
  output_dim: int = EMBED_DIM
  dropout_rate: float = 0.0
  features: str = 'spectrogram'
  interval_lags: tuple[int, ...] = (5, 10, 20)
  max_interval_bins: int = 24
  pitch_shift_bins: int = 0
  relative_num_buckets: int = 32
  relative_max_distance: int = 128
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @classmethod
  def tiny(cls, **overrides) -> 'MelodyEncoder':
    """A small encoder for CPU tests: 64 mels, 2 layers of width 64, 8-frame tokens, 192-d."""
    fields = dict(front_end=dataclasses.replace(MELODY_FRONT_END, n_mels=64), patch_time=8,
                  embed_dim=64, num_layers=2, num_heads=2, head_dim=32, mlp_dim=128)
    fields.update(overrides)
    return cls(**fields)

  @property
  def sample_rate(self) -> int:
    return int(self.front_end.sample_rate)

  @property
  def window_samples(self) -> int:
    """Samples per embedded window."""
    return int(round(self.window_seconds * self.sample_rate))

  @property
  def hop_samples(self) -> int:
    """Samples between window starts in `embed_windows`."""
    return int(round(self.hop_seconds * self.sample_rate))

  def num_windows(self, num_samples: int) -> int:
    """Embeddings `embed_windows` gives for a clip of `num_samples` samples."""
    return num_windows(num_samples, self.window_samples, self.hop_samples)

  def _transformer_config(self) -> TransformerConfig:
    return TransformerConfig(vocab_size=1, embed_dim=self.embed_dim, num_layers=self.num_layers,
                             num_heads=self.num_heads, head_dim=self.head_dim,
                             mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
                             activation='gelu', dtype=self.dtype, param_dtype=self.param_dtype,
                             relative_num_buckets=self.relative_num_buckets,
                             relative_max_distance=self.relative_max_distance)

  def _patches(self, mel: Array) -> Array:
    """[b, frames, mels] -> [b, time patches, freq patches, patch_time, patch_freq]."""
    batch, frames, mels = mel.shape
    patch_freq = self.patch_freq or mels
    nt, nf = -(-frames // self.patch_time), -(-mels // patch_freq)
    # Zero is each window's mean after standardisation: the padding adds nothing.
    mel = jnp.pad(mel, ((0, 0), (0, nt * self.patch_time - frames), (0, nf * patch_freq - mels)))
    x = mel.reshape(batch, nt, self.patch_time, nf, patch_freq)
    return jnp.transpose(x, (0, 1, 3, 2, 4))

  @nn.compact
  def __call__(self, audio: Array, deterministic: bool = True) -> Array:
    """Embeds windows.

    Args:
      audio: float32 [batch, samples] at `front_end.sample_rate`; normally one window
        (`window_samples`), but any length of at least one STFT frame works.
      deterministic: disables dropout when true.

    Returns:
      float32 [batch, output_dim] unit vectors.
    """
    audio = jnp.asarray(audio)
    if audio.ndim != 2:
      raise ValueError(f'audio must be [batch, samples], got shape {audio.shape}')
    if self.features not in ('spectrogram', 'intervals'):
      raise ValueError(f"MelodyEncoder.features must be 'spectrogram' or 'intervals', got "
                       f'{self.features!r}')
    pitch_grid = isinstance(self.front_end, PitchFrontEnd)
    if (self.features == 'intervals' or self.pitch_shift_bins) and not pitch_grid:
      raise ValueError(f'MelodyEncoder.features={self.features!r}, pitch_shift_bins='
                       f'{self.pitch_shift_bins} needs a PitchFrontEnd: on the mel axis a '
                       'shift is no transposition')
    mel = standardize_per_clip(self.front_end(audio.astype(jnp.float32)))
    if self.pitch_shift_bins and not deterministic:
      shifts = jax.random.randint(self.make_rng('augment'), (mel.shape[0],),
                                  -self.pitch_shift_bins, self.pitch_shift_bins + 1)
      mel = shift_frequency(mel, shifts)
    if self.features == 'intervals':
      mel = standardize_per_clip(interval_features(mel, tuple(self.interval_lags),
                                                   self.max_interval_bins))
    patches = self._patches(mel).astype(self.dtype)
    batch, nt, nf = patches.shape[:3]
    x = DenseGeneral(self.embed_dim, kernel_axes=('conv_height', 'conv_width', 'embed'),
                     axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
                     name='patch_embedding')(patches)  # [b, nt, nf, embed]
    if nf > 1:
      freq = self.param('freq_embedding', nn.with_logical_partitioning(
          nn.initializers.normal(stddev=0.02), (None, 'embed')), (nf, self.embed_dim),
          self.param_dtype)
      x = x + freq.astype(self.dtype)[None, None]
    bias = RelativePositionBiases(
        num_heads=self.num_heads, num_buckets=self.relative_num_buckets,
        max_distance=self.relative_max_distance, bidirectional=True, dtype=self.dtype,
        param_dtype=self.param_dtype, name='relpos_bias')(nt, nt)  # [1, heads, nt, nt]
    if nf > 1:  # tokens are time-major: token k sits in time patch k // nf
      bias = jnp.repeat(jnp.repeat(bias, nf, axis=2), nf, axis=3)
    x = nn.with_logical_constraint(x.reshape(batch, nt * nf, self.embed_dim), _TOKEN_AXES)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    config = self._transformer_config()
    for i in range(self.num_layers):
      # No mask: every token attends to every other (a bidirectional encoder layer).
      x = DecoderLayer(config, name=f'layer_{i}')(x, None, bias, deterministic, False)
    x = LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name='final_norm')(x)
    pooled = jnp.mean(x.astype(jnp.float32), axis=1)
    out = DenseGeneral(self.output_dim, kernel_axes=('embed', 'mlp'), dtype=self.dtype,
                       param_dtype=self.param_dtype, name='projection')(pooled)
    return nn.with_logical_constraint(l2_normalize(out.astype(jnp.float32)), ('batch', None))

  def embed_windows(self, audio: Array, deterministic: bool = True) -> Array:
    """Clips [batch, samples] -> [batch, num_windows(samples), output_dim] unit vectors.

    Windows of `window_seconds` every `hop_seconds` (see the module docstring): a 10 s clip
    gives 3 embeddings, of the windows starting at 0, 3 and 6 s.
    """
    windows = frame_windows(audio, self.window_samples, self.hop_samples)
    batch, n, samples = windows.shape
    emb = self(windows.reshape(batch * n, samples), deterministic=deterministic)
    return emb.reshape(batch, n, -1)
