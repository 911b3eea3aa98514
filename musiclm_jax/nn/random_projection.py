"""A BEST-RQ random-projection quantizer (Chiu et al., 2022): audio -> frozen discrete tokens."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

Array = jax.Array


@gin.configurable
class RandomProjectionQuantizer(nn.Module):
  """Frames audio, projects each frame's log spectrum at random and picks the nearest code.

  BEST-RQ's targets: a projection matrix and a codebook drawn at random and never trained. Here
  the frame features are Hann-windowed log-magnitude spectra (the front end needs no learned or
  external mel filterbank), standardised per frame over frequency so the tokens do not depend on
  loudness (a gain is a constant offset of a log spectrum). Each standardised frame is projected
  to `dim` values, l2-normalised, and assigned the codeword with the largest cosine similarity
  (the nearest of the l2-normalised codebook). Both arrays are ordinary Flax params, so a random
  tokenizer is checkpointed, fingerprinted and restored like a trained one.

  At 24 kHz the default hop of 480 samples gives 50 frames per second; a clip of N samples gives
  N // hop frames.

  Attributes:
    frame_size: samples per analysis window (>= hop).
    hop: samples between frames.
    dim: projection dimension (BEST-RQ uses 16).
    codebook_size: codes per codebook.
    num_codebooks: independent projections and codebooks; with more than one, tokens get a last
      axis of this size.
    log_floor: added to spectral magnitudes before the log (silence maps to a finite value).
  """
  frame_size: int = 960
  hop: int = 480
  dim: int = 16
  codebook_size: int = 1024
  num_codebooks: int = 1
  log_floor: float = 1e-5

  @property
  def num_bins(self) -> int:
    return self.frame_size // 2 + 1

  def num_frames(self, num_samples: int) -> int:
    return num_samples // self.hop

  def features(self, audio: Array) -> Array:
    """Per-frame standardised log spectra [batch, frames, frame_size // 2 + 1] of [batch, samples].
    """
    if self.frame_size < self.hop:
      raise ValueError(f'frame_size={self.frame_size} must be at least hop={self.hop}')
    audio = jnp.asarray(audio, jnp.float32)
    frames = self.num_frames(audio.shape[-1])
    if frames < 1:
      raise ValueError(f'{audio.shape[-1]} samples are fewer than one hop ({self.hop})')
    # Frame t covers samples [t * hop, t * hop + frame_size); the tail is zero-padded so that
    # every one of the N // hop frames is complete.
    needed = (frames - 1) * self.hop + self.frame_size
    audio = jnp.pad(audio, ((0, 0), (0, max(0, needed - audio.shape[-1]))))
    index = jnp.arange(frames)[:, None] * self.hop + jnp.arange(self.frame_size)[None, :]
    window = jnp.hanning(self.frame_size + 2)[1:-1].astype(jnp.float32)  # no zero end points
    spectrum = jnp.abs(jnp.fft.rfft(audio[:, index] * window, axis=-1))
    logs = jnp.log(spectrum + self.log_floor)
    mean = jnp.mean(logs, axis=-1, keepdims=True)
    std = jnp.std(logs, axis=-1, keepdims=True)
    return (logs - mean) / (std + 1e-5)

  @nn.compact
  def tokenize(self, audio: Array) -> Array:
    """Tokens int32 [batch, frames] (or [batch, frames, num_codebooks]) of audio [batch, samples].
    """
    feats = self.features(audio)
    projection = self.param(
        'projection',
        nn.with_logical_partitioning(nn.initializers.xavier_uniform(in_axis=-2, out_axis=-1),
                                     ('codebook_levels', 'embed', 'kv')),
        (self.num_codebooks, self.num_bins, self.dim), jnp.float32)
    codebook = self.param(
        'codebook',
        nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0),
                                     ('codebook_levels', 'codebook', 'kv')),
        (self.num_codebooks, self.codebook_size, self.dim), jnp.float32)
    projected = jnp.einsum('btf,nfd->btnd', feats, jnp.asarray(projection))
    projected = projected / (jnp.linalg.norm(projected, axis=-1, keepdims=True) + 1e-12)
    codebook = jnp.asarray(codebook)
    codebook = codebook / (jnp.linalg.norm(codebook, axis=-1, keepdims=True) + 1e-12)
    # For unit vectors the nearest codeword in l2 is the one with the largest dot product.
    tokens = jnp.argmax(jnp.einsum('btnd,nkd->btnk', projected, codebook), axis=-1)
    tokens = tokens.astype(jnp.int32)
    return tokens[..., 0] if self.num_codebooks == 1 else tokens

  def __call__(self, audio: Array) -> Any:
    return self.tokenize(audio)
