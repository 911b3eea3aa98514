"""Causal Fourier encoder and decoder for SoundStream: STFT in, ConvNeXt blocks at the frame rate, STFT out.

The SEANet decoder has to learn to *make* a waveform with a stack of transposed convolutions at
rising sample rates, which costs most of the codec's compute and, on a small CPU budget, learns
slowly: the tiny codec trained on it learned to output an average spectrum. Vocos (Siuzdak,
2023) predicts the short-time Fourier transform instead, all at the frame rate, and lets an
inverse FFT make the waveform: each output frame says how loud every frequency is and at what
phase, so the spectral envelope a mel loss asks for is one linear layer away.

The encoder is the mirror image: causal STFT frames (each window ends at its own hop) ->
compressed magnitude and phase features -> ConvNeXt blocks -> the latent. Both sides do all
their learned work at the frame rate (50 Hz), so they cost a small fraction of SEANet's
sample-rate convolutions, and the encoder sees the spectrum the losses measure.

The decoder keeps SoundStream's causality, so chunked decoding stays exact with left context
only: latent frame t (hop [t * H, (t + 1) * H) of the audio) makes H / h STFT frames of hop h,
and each STFT frame's window of n_fft = 4 h samples starts at its own hop (as a causal
transposed convolution places its kernel), so output sample s depends on latent frames
<= s // H only.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from musiclm_jax.codec.seanet import ACTIVATION_AXES
from musiclm_jax.codec.seanet import CausalConv1d

Array = jax.Array
Dtype = Any
# Window length over STFT hop: four hops overlap at every sample (Vocos uses 4 as well).
OVERLAP = 4
# Largest magnitude a bin may take (Vocos clips exp(x) at 100); bounds the output on bad input.
MAX_LOG_MAGNITUDE = math.log(100.0)


class CausalConvNeXtBlock(nn.Module):
  """x + scale * W2 gelu(W1 LayerNorm(causal depthwise conv(x))), over [batch, frames, dim].

  The depthwise convolution is written as kernel_size shifted multiply-adds (one per tap), which
  XLA:CPU runs as plain fused elementwise work (grouped convolutions are slow there).
  """
  dim: int
  kernel_size: int = 7
  mlp_ratio: int = 3
  layer_scale: float = 0.1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k = self.kernel_size
    taps = self.param('depthwise_kernel',
                      nn.with_logical_partitioning(nn.initializers.lecun_normal(
                          in_axis=0, out_axis=1), ('conv_width', 'conv_out')),
                      (k, self.dim), self.param_dtype).astype(self.dtype)
    bias = self.param('depthwise_bias',
                      nn.with_logical_partitioning(nn.initializers.zeros, ('conv_out',)),
                      (self.dim,), self.param_dtype).astype(self.dtype)
    frames = x.shape[1]
    padded = jnp.pad(x, ((0, 0), (k - 1, 0), (0, 0)))
    # Tap i looks i frames back.
    y = sum(padded[:, k - 1 - i:k - 1 - i + frames] * taps[k - 1 - i] for i in range(k))
    y = y + bias
    y = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name='norm',
                     scale_init=nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)))(y)
    y = nn.Dense(self.dim * self.mlp_ratio, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                          ('embed', 'mlp')),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('mlp',)),
                 name='wi')(y)
    y = nn.gelu(y)
    y = nn.Dense(self.dim, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                          ('mlp', 'embed')),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)),
                 name='wo')(y)
    scale = self.param('layer_scale', nn.with_logical_partitioning(
        nn.initializers.constant(self.layer_scale), ('embed',)), (self.dim,), self.param_dtype)
    return nn.with_logical_constraint(x + y * scale.astype(self.dtype),
                                      ('batch', 'length', 'embed'))


def _check_stft_hop(owner: str, stft_hop: int, hop_length: int) -> None:
  if stft_hop < 1 or hop_length % stft_hop:
    raise ValueError(f'{owner}: stft_hop={stft_hop} must divide the hop length {hop_length}')


def _convnext_stack(x: Array, dim: int, num_layers: int, kernel_size: int, **kw) -> Array:
  """`num_layers` causal ConvNeXt blocks (block_i) and a LayerNorm (output_norm), called inside
  the owning module's compact __call__, so the submodules are the caller's."""
  for i in range(num_layers):
    x = CausalConvNeXtBlock(dim, kernel_size, layer_scale=1.0 / num_layers, name=f'block_{i}',
                            **kw)(x)
  return nn.LayerNorm(name='output_norm', **kw,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)))(x)


def overlap_add(frames: Array, hop: int) -> Array:
  """Causal overlap-add: [batch, F, n * hop] -> [batch, F * hop].

  Frame f covers samples [f * hop, f * hop + n * hop); what runs past F * hop is dropped, as in
  a causal transposed convolution.
  """
  batch, num, width = frames.shape
  n = width // hop
  pieces = jnp.reshape(frames, (batch, num, n, hop))
  out = pieces[:, :, 0]
  for i in range(1, min(n, num)):
    out = out + jnp.pad(pieces[:, :num - i, i], ((0, 0), (i, 0), (0, 0)))
  return jnp.reshape(out, (batch, num * hop))


def hann_window(n: int) -> np.ndarray:
  """Periodic Hann window of n samples (float32)."""
  return (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)).astype(np.float32)


class _FourierCodecNet(nn.Module):
  """The fields the Fourier encoder and decoder share (see each for what they mean there)."""
  hop_length: int
  embedding_dim: int
  dim: int = 256
  num_layers: int = 8
  kernel_size: int = 7
  stft_hop: int = 240
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def n_fft(self) -> int:
    return OVERLAP * self.stft_hop

  @property
  def subframes(self) -> int:
    """STFT frames per latent frame."""
    return self.hop_length // self.stft_hop


class FourierDecoder(_FourierCodecNet):
  """Causal Vocos-style decoder: [batch, frames, D] -> audio [batch, frames * hop_length].

  Causal input convolution (kernel_size taps) to `dim` -> `num_layers` causal ConvNeXt blocks
  -> LayerNorm -> one linear layer to, per latent frame, hop_length / stft_hop STFT frames of
  log-magnitude and phase (n_fft / 2 + 1 bins each, n_fft = 4 stft_hop) -> inverse real FFT,
  periodic Hann window, causal overlap-add (see module docstring). Everything before the FFT runs
  at the latent frame rate, so the decoder costs a small fraction of SEANet's.

  Attributes:
    hop_length: audio samples per latent frame (the encoder's product of strides).
    embedding_dim: input dimension D.
    dim: width of the ConvNeXt blocks.
    num_layers: ConvNeXt blocks.
    kernel_size: taps of the input and depthwise convolutions (in latent frames).
    stft_hop: samples per STFT frame; divides hop_length. The window is 4 stft_hop.
    dtype: compute dtype of the blocks (the FFT runs in float32).
    param_dtype: parameter dtype.
  """

  @property
  def context_frames(self) -> int:
    """Frames before frame t that the output hop of frame t depends on."""
    # Each convolution reaches kernel_size - 1 frames back; the first sample of hop t is covered
    # by STFT frames from t * u - (OVERLAP - 1) on, which come from latent frame
    # t - ceil((OVERLAP - 1) / u).
    return ((self.kernel_size - 1) * (1 + self.num_layers) +
            -(-(OVERLAP - 1) // self.subframes))

  @property
  def receptive_field(self) -> int:
    """Input frames that one output hop depends on (its own and the context)."""
    return self.context_frames + 1

  @nn.compact
  def __call__(self, z: Array) -> Array:
    """Decodes [batch, frames, D] into float32 audio [batch, frames * hop_length]."""
    _check_stft_hop('FourierDecoder', self.stft_hop, self.hop_length)
    if z.ndim != 3 or z.shape[-1] != self.embedding_dim:
      raise ValueError(f'expected [batch, frames, {self.embedding_dim}], got {z.shape}')
    batch, frames, _ = z.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.with_logical_constraint(z.astype(self.dtype), ('batch', 'length', 'embed'))
    x = CausalConv1d(self.dim, self.kernel_size, kernel_axes=('conv_width', 'conv_in', 'embed'),
                     name='input_conv', **kw)(x)
    x = _convnext_stack(x, self.dim, self.num_layers, self.kernel_size, **kw)
    bins = self.n_fft // 2 + 1
    u = self.subframes
    head = nn.Dense(u * 2 * bins, dtype=jnp.float32, param_dtype=self.param_dtype,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                             ('embed', 'conv_out')),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                           ('conv_out',)),
                    name='stft_head')(x.astype(jnp.float32))
    head = jnp.reshape(head, (batch, frames * u, 2, bins))
    magnitude = jnp.exp(jnp.minimum(head[:, :, 0], MAX_LOG_MAGNITUDE))
    phase = head[:, :, 1]
    spectrum = jax.lax.complex(magnitude * jnp.cos(phase), magnitude * jnp.sin(phase))
    stft_frames = jnp.fft.irfft(spectrum, n=self.n_fft, axis=-1) * hann_window(self.n_fft)
    audio = overlap_add(stft_frames, self.stft_hop)
    return nn.with_logical_constraint(audio, ('batch', 'length'))


def causal_stft(audio: Array, hop: int) -> Array:
  """Complex STFT [batch, samples / hop, 2 hop + 1] whose frame f ends with hop f.

  Frame f is the periodic-Hann-windowed samples [(f - 3) hop, (f + 1) hop) (zeros before the
  start), so it depends on no sample after its own hop. `samples` must be a multiple of hop.
  """
  batch, samples = audio.shape
  if samples % hop:
    raise ValueError(f'causal_stft: {samples} samples are not whole hops of {hop}')
  frames = samples // hop
  hops = jnp.reshape(jnp.pad(audio, ((0, 0), ((OVERLAP - 1) * hop, 0))),
                     (batch, frames + OVERLAP - 1, hop))
  windows = jnp.concatenate([hops[:, i:i + frames] for i in range(OVERLAP)], axis=-1)
  return jnp.fft.rfft(windows * hann_window(OVERLAP * hop), axis=-1)


class FourierEncoder(_FourierCodecNet):
  """Causal STFT encoder: audio [batch, frames * hop_length] -> [batch, frames, D] float32.

  causal_stft (hop stft_hop, window 4 stft_hop) -> per bin log(|S| + 1e-5) and the power-law
  compressed complex value S / |S|^0.7 (its phase, weighted towards loud bins) -> the
  hop_length / stft_hop STFT frames of each latent frame concatenated -> one linear layer to
  `dim` -> `num_layers` causal ConvNeXt blocks -> LayerNorm -> linear to D. Latent frame t
  depends on samples before the end of its hop only.

  Attributes:
    hop_length: audio samples per latent frame.
    embedding_dim: output dimension D.
    dim: width of the ConvNeXt blocks.
    num_layers: ConvNeXt blocks.
    kernel_size: taps of the depthwise convolutions (in latent frames).
    stft_hop: samples per STFT frame; divides hop_length.
    dtype: compute dtype of the blocks (the FFT runs in float32).
    param_dtype: parameter dtype.
  """

  @property
  def receptive_field(self) -> int:
    """Audio samples that one frame's latent depends on (ending with its hop)."""
    return (self.hop_length * (1 + (self.kernel_size - 1) * self.num_layers) +
            (OVERLAP - 1) * self.stft_hop)

  @property
  def context_frames(self) -> int:
    """Whole frames of left context that make chunked encoding exact."""
    return -(-(self.receptive_field - self.hop_length) // self.hop_length)

  @nn.compact
  def __call__(self, audio: Array) -> Array:
    _check_stft_hop('FourierEncoder', self.stft_hop, self.hop_length)
    batch, samples = audio.shape
    if samples % self.hop_length:
      raise ValueError(f'FourierEncoder: {samples} samples are not whole hops of '
                       f'{self.hop_length}')
    frames = samples // self.hop_length
    spectrum = causal_stft(audio.astype(jnp.float32), self.stft_hop)
    magnitude = jnp.abs(spectrum)
    compressed = spectrum * jnp.power(magnitude + 1e-5, -0.7)
    features = jnp.concatenate([jnp.log(magnitude + 1e-5), jnp.real(compressed),
                                jnp.imag(compressed)], axis=-1)
    features = jnp.reshape(features, (batch, frames, -1))
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Dense(self.dim, kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ('conv_in', 'embed')),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)),
                 name='input_proj', **kw)(features.astype(self.dtype))
    x = nn.with_logical_constraint(x, ('batch', 'length', 'embed'))
    x = _convnext_stack(x, self.dim, self.num_layers, self.kernel_size, **kw)
    z = nn.Dense(self.embedding_dim, kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ('embed', 'conv_out')),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('conv_out',)),
                 name='output_proj', **kw)(x)
    return nn.with_logical_constraint(z.astype(jnp.float32), ('batch', 'length', 'embed'))
