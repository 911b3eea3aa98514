"""MuLan audio towers on log-mel spectrograms: a ResNet (the paper's) and a spectrogram transformer.

Both towers take float32 audio [batch, samples] at the front-end's sample rate (24 kHz), compute
a log-mel spectrogram with their `front_end` field, standardise it per clip (zero mean, unit
variance over all frames and bins of that clip, so loudness and recording gain do not matter and
nothing depends on the other clips of the batch), and return one vector per clip [batch, width].

Normalisation inside the towers never uses batch statistics: BatchNorm's statistics would be
computed per device shard under data parallelism (or need a cross-device reduction every layer),
would differ between training and inference (running averages vs batch values), and would make
an embedding depend on which other clips share its batch. GroupNorm (default) and LayerNorm
normalise each clip on its own.

Parameters carry logical axis names of `standard_logical_axis_rules`: convolution kernels
('conv_height', 'conv_width', 'conv_in', 'conv_out') with None for the 1-channel input of the
first convolution (a size-1 dimension cannot be sharded), norms ('norm',), transformer weights
('embed', 'heads', 'kv', 'mlp').

Typical use:

  tower = ResNetAudioTower.tiny()                      # or ResNetAudioTower() (ResNet-50)
  variables = tower.init(jax.random.key(0), audio)     # audio [batch, samples]
  features = tower.apply(variables, audio)             # [batch, tower.output_dim]
"""
from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from musiclm_jax.audio.features import LogMelFrontEnd
from musiclm_jax.nn.attention import DenseGeneral, MultiHeadAttention, RelativePositionBiases
from musiclm_jax.nn.transformer import LayerNorm

Array = jax.Array
Dtype = Any

_IMAGE_AXES = ('batch', None, None, 'conv_out')  # [batch, time, freq, channels]
_TOKEN_AXES = ('batch', 'length', 'embed')


def standardize_per_clip(mel: Array, eps: float = 1e-5) -> Array:
  """(mel - mean) / std over each clip's frames and bins: [batch, frames, bins] -> same, float32.

  A constant (e.g. silent) clip becomes all zeros rather than NaN.
  """
  mel = mel.astype(jnp.float32)
  mean = jnp.mean(mel, axis=(-2, -1), keepdims=True)
  var = jnp.mean(jnp.square(mel - mean), axis=(-2, -1), keepdims=True)
  return (mel - mean) * jax.lax.rsqrt(var + eps)


def _log_mel(front_end: LogMelFrontEnd, audio: Array) -> Array:
  audio = jnp.asarray(audio)
  if audio.ndim != 2:
    raise ValueError(f'audio must be [batch, samples], got shape {audio.shape}')
  return standardize_per_clip(front_end(audio.astype(jnp.float32)))


# ---------------------------------------------------------------------------
# ResNet
# ---------------------------------------------------------------------------


def _conv(x: Array, features: int, kernel: int, strides: int, name: str, dtype: Dtype,
          param_dtype: Dtype, zero_init: bool = False) -> Array:
  """A bias-free 'SAME' 2-D convolution with logically partitioned kernel."""
  in_axis = 'conv_in' if x.shape[-1] > 1 else None  # a size-1 axis cannot be sharded
  init = (nn.initializers.zeros if zero_init else
          nn.initializers.variance_scaling(2.0, 'fan_in', 'truncated_normal'))
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding='SAME',
                 use_bias=False, dtype=dtype, param_dtype=param_dtype, name=name,
                 kernel_init=nn.with_logical_partitioning(
                     init, ('conv_height', 'conv_width', in_axis, 'conv_out')))(x)


def _norm(x: Array, kind: str, num_groups: int, name: str, dtype: Dtype, param_dtype: Dtype,
          zero_scale: bool = False) -> Array:
  """GroupNorm (over time, frequency and a group of channels) or LayerNorm (over channels)."""
  scale_init = nn.with_logical_partitioning(
      nn.initializers.zeros if zero_scale else nn.initializers.ones, ('norm',))
  bias_init = nn.with_logical_partitioning(nn.initializers.zeros, ('norm',))
  if kind == 'group':
    groups = math.gcd(num_groups, x.shape[-1])
    return nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=dtype, param_dtype=param_dtype,
                        use_fast_variance=False, scale_init=scale_init, bias_init=bias_init,
                        name=name)(x)
  if kind == 'layer':
    return nn.LayerNorm(epsilon=1e-5, dtype=dtype, param_dtype=param_dtype,
                        use_fast_variance=False, scale_init=scale_init, bias_init=bias_init,
                        name=name)(x)
  raise ValueError(f"norm must be 'group' or 'layer', got {kind!r}")


class ResNetBlock(nn.Module):
  """A post-activation ResNet block (v1.5: the stride sits on the 3x3 convolution).

  'basic': 3x3 -> norm -> relu -> 3x3 -> norm, + shortcut, relu (ResNet-18/34).
  'bottleneck': 1x1 (features / expansion) -> 3x3 (stride) -> 1x1 (features), each followed by a
  norm, relu between, + shortcut, relu (ResNet-50/101/152).
  The shortcut is a strided 1x1 convolution + norm when the shape changes, else the identity.

  Attributes:
    features: output channels.
    strides: stride on time and frequency (1 or 2).
    kind: 'basic' or 'bottleneck'.
    expansion: output / inner channels of a bottleneck block.
    norm: 'group' or 'layer'.
    num_groups: GroupNorm groups (reduced to gcd(num_groups, channels)).
    zero_init_residual: the last norm of the residual branch starts with scale 0, so every block
      starts as the identity (Goyal et al., 2017): deep stacks train from the first step.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  features: int
  strides: int = 1
  kind: str = 'bottleneck'
  expansion: int = 4
  norm: str = 'group'
  num_groups: int = 32
  zero_init_residual: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[batch, time, freq, in] -> [batch, time / strides, freq / strides, features]."""
    conv = functools.partial(_conv, dtype=self.dtype, param_dtype=self.param_dtype)
    norm = functools.partial(_norm, kind=self.norm, num_groups=self.num_groups,
                             dtype=self.dtype, param_dtype=self.param_dtype)
    if self.kind == 'basic':
      h = nn.relu(norm(conv(x, self.features, 3, self.strides, 'conv_0'), name='norm_0'))
      h = norm(conv(h, self.features, 3, 1, 'conv_1'), name='norm_1',
               zero_scale=self.zero_init_residual)
    elif self.kind == 'bottleneck':
      inner = max(1, self.features // self.expansion)
      h = nn.relu(norm(conv(x, inner, 1, 1, 'conv_0'), name='norm_0'))
      h = nn.relu(norm(conv(h, inner, 3, self.strides, 'conv_1'), name='norm_1'))
      h = norm(conv(h, self.features, 1, 1, 'conv_2'), name='norm_2',
               zero_scale=self.zero_init_residual)
    else:
      raise ValueError(f"block kind must be 'basic' or 'bottleneck', got {self.kind!r}")
    shortcut = x
    if x.shape[-1] != self.features or self.strides != 1:
      shortcut = norm(conv(x, self.features, 1, self.strides, 'shortcut_conv'),
                      name='shortcut_norm')
    return nn.with_logical_constraint(nn.relu(h + shortcut), _IMAGE_AXES)


@gin.configurable
class ResNetAudioTower(nn.Module):
  """ResNet over the log-mel image (time x mel, one channel), mean-pooled to [batch, width].

  The defaults are the paper's ResNet-50: a 7x7 stride-2 stem with 64 channels and a 3x3
  stride-2 max pool, bottleneck stages of depths (3, 4, 6, 3) and widths (256, 512, 1024, 2048),
  the first block of every stage after the first with stride 2 on time and frequency. Unlike the
  torchvision ResNet it uses GroupNorm (or LayerNorm), not BatchNorm (see the module docstring).
  The output is the global mean over the remaining time and frequency positions of the last
  stage: [batch, stage_widths[-1]]. Any clip length (>= one STFT frame) works.

  Attributes:
    front_end: the log-mel front-end (its sample rate is the expected input rate).
    stem_features: channels of the stem convolution.
    stem_kernel: stem kernel size (7 in ResNet, 3 for small inputs).
    stem_strides: stem stride (2 in ResNet).
    stem_pool: 3x3 stride-2 max pool after the stem (ResNet).
    stage_depths: blocks per stage.
    stage_widths: output channels per stage.
    block: 'bottleneck' or 'basic'.
    expansion: bottleneck expansion (inner width = width / expansion).
    norm: 'group' or 'layer'.
    num_groups: GroupNorm groups.
    zero_init_residual: see `ResNetBlock`.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  front_end: LogMelFrontEnd = LogMelFrontEnd()
  stem_features: int = 64
  stem_kernel: int = 7
  stem_strides: int = 2
  stem_pool: bool = True
  stage_depths: Sequence[int] = (3, 4, 6, 3)
  stage_widths: Sequence[int] = (256, 512, 1024, 2048)
  block: str = 'bottleneck'
  expansion: int = 4
  norm: str = 'group'
  num_groups: int = 32
  zero_init_residual: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @classmethod
  def tiny(cls, **overrides) -> 'ResNetAudioTower':
    """A small basic-block ResNet for CPU tests: 64 mels, stages (1, 1) x (16, 32)."""
    fields = dict(front_end=LogMelFrontEnd(n_mels=64), stem_features=16, stem_kernel=3,
                  stem_strides=1, stem_pool=False, stage_depths=(1, 1), stage_widths=(16, 32),
                  block='basic', num_groups=4)
    fields.update(overrides)
    return cls(**fields)

  @property
  def output_dim(self) -> int:
    """Width of the output vectors."""
    return int(self.stage_widths[-1])

  @nn.compact
  def __call__(self, audio: Array, deterministic: bool = True) -> Array:
    """Embeds clips.

    Args:
      audio: float32 [batch, samples] at `front_end.sample_rate`.
      deterministic: unused (no dropout); for a common tower signature.

    Returns:
      float32 [batch, stage_widths[-1]].
    """
    del deterministic
    if len(self.stage_depths) != len(self.stage_widths):
      raise ValueError(f'stage_depths {tuple(self.stage_depths)} and stage_widths '
                       f'{tuple(self.stage_widths)} differ in length')
    x = _log_mel(self.front_end, audio)[..., None].astype(self.dtype)  # [b, time, mel, 1]
    x = nn.with_logical_constraint(x, ('batch', None, None, None))
    x = _conv(x, self.stem_features, self.stem_kernel, self.stem_strides, 'stem_conv',
              self.dtype, self.param_dtype)
    x = nn.relu(_norm(x, self.norm, self.num_groups, 'stem_norm', self.dtype,
                      self.param_dtype))
    if self.stem_pool:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    x = nn.with_logical_constraint(x, _IMAGE_AXES)
    for stage, (depth, width) in enumerate(zip(self.stage_depths, self.stage_widths)):
      for i in range(depth):
        x = ResNetBlock(width, strides=2 if stage > 0 and i == 0 else 1, kind=self.block,
                        expansion=self.expansion, norm=self.norm, num_groups=self.num_groups,
                        zero_init_residual=self.zero_init_residual, dtype=self.dtype,
                        param_dtype=self.param_dtype, name=f'stage_{stage}_block_{i}')(x)
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return nn.with_logical_constraint(pooled, ('batch', None))


# ---------------------------------------------------------------------------
# Spectrogram transformer
# ---------------------------------------------------------------------------


class _EncoderLayer(nn.Module):
  """Pre-LN transformer layer: x + MHA(LN(x), bias), then x + MLP(LN(x)) (GELU)."""
  num_heads: int
  head_dim: int
  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, bias: Optional[Array], deterministic: bool) -> Array:
    norm = functools.partial(LayerNorm, dtype=self.dtype, param_dtype=self.param_dtype)
    dense = functools.partial(DenseGeneral, dtype=self.dtype, param_dtype=self.param_dtype)
    dropout = nn.Dropout(self.dropout_rate)
    h = norm(name='pre_attention_norm')(x)
    h = MultiHeadAttention(self.num_heads, self.head_dim, dropout_rate=self.dropout_rate,
                           dtype=self.dtype, param_dtype=self.param_dtype,
                           name='self_attention')(h, h, None, bias,
                                                  deterministic=deterministic)
    x = nn.with_logical_constraint(x + dropout(h, deterministic=deterministic), _TOKEN_AXES)
    h = norm(name='pre_mlp_norm')(x)
    h = nn.gelu(dense(self.mlp_dim, kernel_axes=('embed', 'mlp'), name='wi')(h))
    h = nn.with_logical_constraint(h, ('batch', 'length', 'mlp'))
    h = dropout(h, deterministic=deterministic)
    h = dense(x.shape[-1], kernel_axes=('mlp', 'embed'), name='wo')(h)
    return nn.with_logical_constraint(x + dropout(h, deterministic=deterministic), _TOKEN_AXES)


@gin.configurable
class SpectrogramTransformerTower(nn.Module):
  """Patches of the log-mel image -> linear embedding -> bidirectional pre-LN transformer -> mean.

  The standardised log-mel [batch, frames, mels] is zero-padded (zero is the clip mean) to whole
  patches and cut into non-overlapping `patch_time` x `patch_freq` patches, each linearly
  embedded (a strided convolution), in time-major order. Frequency position is absolute (a
  learned vector per frequency patch: pitch and timbre live at fixed bands); time position is
  'relative' (default: T5 relative position biases over the time-patch distance, shared by the
  layers; any clip length works and the embedding is shift-invariant in time) or 'learned'
  (a learned vector per time patch, at most `max_time_patches`). The output is the mean of the
  final LayerNorm's token states: [batch, embed_dim]. Defaults are ViT-Base sized.

  Attributes:
    front_end: the log-mel front-end.
    patch_time: frames per patch.
    patch_freq: mel bins per patch.
    embed_dim: model width.
    num_layers: transformer layers.
    num_heads: attention heads.
    head_dim: per-head width.
    mlp_dim: feed-forward width.
    dropout_rate: dropout on sub-layer outputs and attention weights ('dropout' rng).
    time_positions: 'relative' or 'learned'.
    max_time_patches: rows of the learned time table ('learned' only).
    relative_num_buckets: T5 relative position buckets ('relative').
    relative_max_distance: distance (in time patches) at which buckets saturate.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  front_end: LogMelFrontEnd = LogMelFrontEnd()
  patch_time: int = 16
  patch_freq: int = 16
  embed_dim: int = 768
  num_layers: int = 12
  num_heads: int = 12
  head_dim: int = 64
  mlp_dim: int = 3072
  dropout_rate: float = 0.0
  time_positions: str = 'relative'
  max_time_patches: int = 128
  relative_num_buckets: int = 32
  relative_max_distance: int = 128
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @classmethod
  def tiny(cls, **overrides) -> 'SpectrogramTransformerTower':
    """A small tower for CPU tests: 64 mels, 8x16 patches, 2 layers of width 32."""
    fields = dict(front_end=LogMelFrontEnd(n_mels=64), patch_time=8, patch_freq=16,
                  embed_dim=32, num_layers=2, num_heads=2, head_dim=16, mlp_dim=64)
    fields.update(overrides)
    return cls(**fields)

  @property
  def output_dim(self) -> int:
    """Width of the output vectors."""
    return int(self.embed_dim)

  def _patches(self, mel: Array) -> Array:
    """[b, frames, mels] -> [b, time patches, freq patches, patch_time, patch_freq]."""
    batch, frames, mels = mel.shape
    nt, nf = -(-frames // self.patch_time), -(-mels // self.patch_freq)
    mel = jnp.pad(mel, ((0, 0), (0, nt * self.patch_time - frames),
                        (0, nf * self.patch_freq - mels)))
    x = mel.reshape(batch, nt, self.patch_time, nf, self.patch_freq)
    return jnp.transpose(x, (0, 1, 3, 2, 4))

  @nn.compact
  def __call__(self, audio: Array, deterministic: bool = True) -> Array:
    """Embeds clips.

    Args:
      audio: float32 [batch, samples] at `front_end.sample_rate`.
      deterministic: disables dropout when true.

    Returns:
      float32 [batch, embed_dim].
    """
    if self.time_positions not in ('relative', 'learned'):
      raise ValueError(f"time_positions must be 'relative' or 'learned', "
                       f'got {self.time_positions!r}')
    patches = self._patches(_log_mel(self.front_end, audio)).astype(self.dtype)
    batch, nt, nf = patches.shape[:3]
    x = DenseGeneral(self.embed_dim, kernel_axes=('conv_height', 'conv_width', 'embed'),
                     axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
                     name='patch_embedding')(patches)  # [b, nt, nf, embed]
    freq = self.param('freq_embedding', nn.with_logical_partitioning(
        nn.initializers.normal(stddev=0.02), (None, 'embed')), (nf, self.embed_dim),
        self.param_dtype)
    x = x + freq.astype(self.dtype)[None, None]
    bias = None
    if self.time_positions == 'learned':
      if nt > self.max_time_patches:
        raise ValueError(f'{nt} time patches exceed max_time_patches={self.max_time_patches}')
      time = self.param('time_embedding', nn.with_logical_partitioning(
          nn.initializers.normal(stddev=0.02), (None, 'embed')),
          (self.max_time_patches, self.embed_dim), self.param_dtype)
      x = x + time[:nt].astype(self.dtype)[None, :, None]
    else:
      bias = RelativePositionBiases(
          num_heads=self.num_heads, num_buckets=self.relative_num_buckets,
          max_distance=self.relative_max_distance, bidirectional=True, dtype=self.dtype,
          param_dtype=self.param_dtype, name='relpos_bias')(nt, nt)  # [1, heads, nt, nt]
      # Tokens are time-major: token k sits in time patch k // nf.
      bias = jnp.repeat(jnp.repeat(bias, nf, axis=2), nf, axis=3)
    x = nn.with_logical_constraint(x.reshape(batch, nt * nf, self.embed_dim), _TOKEN_AXES)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    for i in range(self.num_layers):
      x = _EncoderLayer(self.num_heads, self.head_dim, self.mlp_dim, self.dropout_rate,
                        self.dtype, self.param_dtype, name=f'layer_{i}')(x, bias, deterministic)
    x = LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name='final_norm')(x)
    pooled = jnp.mean(x.astype(jnp.float32), axis=1)
    return nn.with_logical_constraint(pooled, ('batch', None))
