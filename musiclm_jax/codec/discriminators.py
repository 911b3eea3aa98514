"""SoundStream's adversarial critics: an STFT discriminator and multi-scale MelGAN wave ones."""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from musiclm_jax.audio import features

Array = jax.Array
Dtype = Any
# What every discriminator returns: logits [batch, frames] and the intermediate activations
# (each [batch, ...]) that the feature-matching loss compares between real and fake audio.
DiscriminatorOutput = tuple[Array, list[Array]]

# LeakyReLU slope of MelGAN and SoundStream.
_LEAK = 0.2


def _leaky_relu(x: Array) -> Array:
  return nn.leaky_relu(x, negative_slope=_LEAK)


def _constrain_batch(x: Array) -> Array:
  """Shards the leading (batch) axis over the data axes; every other axis stays whole.

  Channels are left unsharded on purpose: the discriminators are small, and resharding their
  activations between convolutions would cost more than it saves.
  """
  return nn.with_logical_constraint(x, ('batch',) + (None,) * (x.ndim - 1))


def _conv(features_out: int,
          kernel_size: Sequence[int],
          strides: Sequence[int],
          padding: Any,
          *,
          shard_in: bool = True,
          shard_out: bool = True,
          groups: int = 1,
          dtype: Dtype = jnp.float32,
          name: Optional[str] = None) -> nn.Conv:
  """A 1D or 2D convolution whose kernel and bias carry logical axis names.

  Args:
    features_out: output channels.
    kernel_size: (width,) for 1D, (height, width) = (time, freq) for 2D.
    strides: per spatial axis.
    padding: as nn.Conv ('SAME', 'VALID' or explicit pairs).
    shard_in: name the kernel's input-channel axis 'conv_in' (sharded over fsdp). Off for the
      first layer, whose one or two input channels cannot be split, and grouped convs.
    shard_out: name the output-channel axis 'conv_out' (sharded over model). Off for the final
      one-channel logit layers.
    groups: feature_group_count (MelGAN's grouped convolutions).
    dtype: compute dtype (parameters stay float32).
    name: submodule name.

  Returns:
    An unbound nn.Conv.
  """
  spatial = ('conv_height', 'conv_width')[-len(kernel_size):]
  kernel_axes = spatial + ('conv_in' if shard_in else None, 'conv_out' if shard_out else None)
  bias_axes = ('conv_out' if shard_out else None,)
  return nn.Conv(
      features_out,
      kernel_size=tuple(kernel_size),
      strides=tuple(strides),
      padding=padding,
      feature_group_count=groups,
      dtype=dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), kernel_axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, bias_axes),
      name=name)


@gin.configurable
class STFTDiscriminator(nn.Module):
  """SoundStream's STFT discriminator: a 2D conv net over the complex spectrogram.

  The waveform's STFT (Hann window, centred, zero padded) is split into real and imaginary
  parts, the two input channels of a 2D conv net over [time, freq]. The Nyquist bin is dropped
  so that F = n_fft / 2 frequency bins remain (SoundStream's W / 2). A 7x7 conv is followed by
  residual blocks, each `x + conv3x3(lrelu(x))` and then a conv with kernel (st + 2, sf + 2)
  and stride (st, sf) alternating between (1, 2) and (2, 2) on (time, freq). A last conv whose
  kernel spans all remaining frequency bins (SoundStream's fully connected layer over
  frequency) gives one logit per downsampled frame.

  Attributes:
    n_fft: STFT window and FFT size (SoundStream: 1024 samples).
    hop_length: STFT hop (SoundStream: 256 samples).
    channels: channels of the first conv; block i has channels * channel_mults[i].
    channel_mults: per-block channel multipliers; their number is the number of blocks.
    strides: per-block (time, freq) strides.
    dtype: compute dtype of the convolutions (the STFT is always float32).
  """
  n_fft: int = 1024
  hop_length: int = 256
  channels: int = 32
  channel_mults: Sequence[int] = (1, 2, 4, 4, 8, 8)
  strides: Sequence[Sequence[int]] = ((1, 2), (2, 2), (1, 2), (2, 2), (1, 2), (2, 2))
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, audio: Array) -> DiscriminatorOutput:
    """Scores a waveform batch.

    Args:
      audio: [batch, samples] float waveform.

    Returns:
      logits [batch, frames'] with frames' = ceil((1 + samples // hop_length) / 2 ** k) for the
      k time strides of 2, and the feature maps [batch, time, freq, channels] of the first
      conv and of every block.
    """
    if len(self.channel_mults) != len(self.strides):
      raise ValueError(f'channel_mults {self.channel_mults} and strides {self.strides} must '
                       'have one entry per block')
    spec = features.stft(audio, self.n_fft, self.hop_length)[..., :self.n_fft // 2]
    x = jnp.stack([jnp.real(spec), jnp.imag(spec)], axis=-1)  # [batch, frames, freq, 2]
    x = _constrain_batch(x.astype(self.dtype))
    x = _conv(self.channels, (7, 7), (1, 1), 'SAME', shard_in=False, dtype=self.dtype,
              name='conv_in')(x)
    x = _constrain_batch(x)
    feature_maps = [x]
    for i, (mult, stride) in enumerate(zip(self.channel_mults, self.strides)):
      h = _conv(x.shape[-1], (3, 3), (1, 1), 'SAME', dtype=self.dtype,
                name=f'block{i}_residual')(_leaky_relu(x))
      x = x + h
      kernel = tuple(s + 2 for s in stride)
      x = _conv(self.channels * mult, kernel, tuple(stride), 'SAME', dtype=self.dtype,
                name=f'block{i}_down')(_leaky_relu(x))
      x = _constrain_batch(x)
      feature_maps.append(x)
    logits = _conv(1, (1, x.shape[2]), (1, 1), 'VALID', shard_out=False, dtype=self.dtype,
                   name='conv_out')(_leaky_relu(x))  # [batch, frames', 1, 1]
    logits = _constrain_batch(logits[:, :, 0, 0].astype(jnp.float32))
    return logits, feature_maps


@gin.configurable
class WaveDiscriminator(nn.Module):
  """MelGAN's waveform discriminator (Kumar et al., 2019), used by SoundStream at 3 scales.

  conv k15 (reflection padded) -> `num_downsamples` grouped convs with kernel
  10 * downsample_factor + 1, stride downsample_factor -> conv k5 -> conv k3 to one channel,
  with LeakyReLU(0.2) between. Channels grow by downsample_factor per downsampling conv (then
  2x for the k5 conv), capped at `max_channels`; each grouped conv has groups of
  `group_channels` input channels (MelGAN: in_channels // 4 groups), which keeps the wide
  layers cheap. No weight normalisation (SoundStream does not specify one).

  Attributes:
    channels: channels of the first conv (MelGAN: 16).
    max_channels: cap on channels (MelGAN: 1024).
    num_downsamples: number of strided grouped convs (MelGAN: 4).
    downsample_factor: stride of each (MelGAN: 4); total downsampling factor ** num_downsamples.
    group_channels: input channels per group in the grouped convs.
    dtype: compute dtype.
  """
  channels: int = 16
  max_channels: int = 1024
  num_downsamples: int = 4
  downsample_factor: int = 4
  group_channels: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, audio: Array) -> DiscriminatorOutput:
    """Scores a waveform batch.

    Args:
      audio: [batch, samples] float waveform (samples > 7 for the reflection padding).

    Returns:
      logits [batch, ceil(samples / downsample_factor ** num_downsamples)] and the feature
      maps [batch, time, channels] after every conv but the last.
    """
    x = _constrain_batch(audio.astype(self.dtype)[..., None])  # [batch, samples, 1]
    x = jnp.pad(x, ((0, 0), (7, 7), (0, 0)), mode='reflect')
    x = _conv(self.channels, (15,), (1,), 'VALID', shard_in=False, dtype=self.dtype,
              name='conv_in')(x)
    x = _constrain_batch(_leaky_relu(x))
    feature_maps = [x]
    f = self.downsample_factor
    for i in range(self.num_downsamples):
      in_ch = x.shape[-1]
      out_ch = min(in_ch * f, self.max_channels)
      # gcd keeps the group count a divisor of both channel counts for any configuration.
      groups = math.gcd(in_ch, out_ch, max(1, in_ch // self.group_channels))
      # A grouped kernel's input axis holds only in_ch / groups (MelGAN: 4) channels: too few
      # to split over fsdp, so only its output channels are sharded.
      x = _conv(out_ch, (10 * f + 1,), (f,), ((5 * f, 5 * f),), groups=groups,
                shard_in=groups == 1, dtype=self.dtype, name=f'down{i}')(x)
      x = _constrain_batch(_leaky_relu(x))
      feature_maps.append(x)
    x = _conv(min(x.shape[-1] * 2, self.max_channels), (5,), (1,), ((2, 2),),
              dtype=self.dtype, name='conv_post')(x)
    x = _constrain_batch(_leaky_relu(x))
    feature_maps.append(x)
    logits = _conv(1, (3,), (1,), ((1, 1),), shard_out=False, dtype=self.dtype,
                   name='conv_out')(x)
    logits = _constrain_batch(logits[..., 0].astype(jnp.float32))
    return logits, feature_maps


def downsample_audio(audio: Array) -> Array:
  """MelGAN's 2x downsampling between scales: AvgPool1d(4, stride 2, padding 1), no pad count.

  Args:
    audio: [batch, samples].

  Returns:
    [batch, samples // 2]; edge windows average only the real samples they cover.
  """
  pooled = nn.avg_pool(audio[..., None], (4,), strides=(2,), padding=((1, 1),),
                       count_include_pad=False)
  return pooled[..., 0]


@gin.configurable
class MultiScaleWaveDiscriminator(nn.Module):
  """WaveDiscriminators on the waveform at 1x, 2x, 4x, ... downsampling (MelGAN, SoundStream).

  Each scale has its own parameters (submodules scale_0, scale_1, ...).

  Attributes:
    num_scales: number of scales (SoundStream: 3).
    discriminator: template for every scale; None for a (gin-configured) WaveDiscriminator().
  """
  num_scales: int = 3
  discriminator: Optional[WaveDiscriminator] = None

  @nn.compact
  def __call__(self, audio: Array) -> list[DiscriminatorOutput]:
    """[batch, samples] -> one (logits, feature_maps) per scale, finest first."""
    template = (self.discriminator if self.discriminator is not None
                else WaveDiscriminator(parent=None))
    outputs = []
    x = audio
    for i in range(self.num_scales):
      if i:
        x = downsample_audio(x)
      outputs.append(template.clone(parent=self, name=f'scale_{i}')(x))
    return outputs


@gin.configurable
class CodecDiscriminators(nn.Module):
  """All of a codec's discriminators: SoundStream's STFT one and the multi-scale wave ones.

  Attributes:
    use_stft: run the STFT discriminator.
    num_wave_scales: wave discriminator scales; 0 disables them.
    stft: the STFT discriminator; None for a (gin-configured) STFTDiscriminator().
    wave: template of each wave scale; None for a (gin-configured) WaveDiscriminator().
  """
  use_stft: bool = True
  num_wave_scales: int = 3
  stft: Optional[STFTDiscriminator] = None
  wave: Optional[WaveDiscriminator] = None

  @property
  def num_discriminators(self) -> int:
    """Number of (logits, feature_maps) pairs returned."""
    return int(self.use_stft) + self.num_wave_scales

  @nn.compact
  def __call__(self, audio: Array) -> list[DiscriminatorOutput]:
    """Scores a waveform batch.

    Args:
      audio: [batch, samples] float waveform.

    Returns:
      A list of `num_discriminators` (logits [batch, frames], feature_maps) pairs: the STFT
      discriminator's first (if used), then the wave scales, finest first.
    """
    if self.num_discriminators == 0:
      raise ValueError('CodecDiscriminators: use_stft is False and num_wave_scales is 0')
    outputs = []
    if self.use_stft:
      stft = self.stft if self.stft is not None else STFTDiscriminator(parent=None)
      outputs.append(stft.clone(parent=self, name='stft_discriminator')(audio))
    if self.num_wave_scales:
      outputs.extend(MultiScaleWaveDiscriminator(
          num_scales=self.num_wave_scales, discriminator=self.wave,
          name='wave_discriminators')(audio))
    return outputs
