"""Causal SEANet convolutional encoder and decoder (SoundStream's waveform networks)."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]
# Logical names of a [batch, time, channels] activation; channels shard like
# the output channels of the convolution that produced them.
ACTIVATION_AXES = ('batch', 'length', 'conv_out')
# Logical names of a [width, in, out] convolution kernel.
KERNEL_AXES = ('conv_width', 'conv_in', 'conv_out')
# Dilations of the three residual units of every SEANet block.
DILATIONS = (1, 3, 9)
# The activations a SEANet may use: SoundStream's ELU, or DAC's snake (periodic, for pitched audio).
ACTIVATIONS = ('elu', 'snake')


class Snake(nn.Module):
  """snake(x) = x + sin^2(alpha x) / alpha, one learned alpha per channel (DAC; Ziyin et al.).

  A periodic inductive bias: a stack of snakes makes oscillations (harmonics) easily, which an
  ELU stack learns slowly. alpha starts at 1.
  """
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    alpha = self.param('alpha', nn.with_logical_partitioning(nn.initializers.ones,
                                                             ('conv_out',)),
                       (x.shape[-1],), self.param_dtype).astype(x.dtype)
    return x + jnp.square(jnp.sin(alpha * x)) / (alpha + 1e-9)


def _check_activation(activation: str) -> None:
  if activation not in ACTIVATIONS:
    raise ValueError(f'activation {activation!r} is not one of {ACTIVATIONS}')


def _activate(module: nn.Module, activation: str, x: Array, name: str) -> Array:
  """ELU (no parameters, so an ELU network's parameter tree is unchanged) or a named Snake."""
  if activation == 'snake':
    return Snake(param_dtype=module.param_dtype, name=name)(x)
  return nn.elu(x)


def _ceil_div(a: int, b: int) -> int:
  return -(-a // b)


class CausalConv1d(nn.Module):
  """1-D convolution over [batch, time, channels] that never looks ahead.

  With stride s, output frame t covers the hop of input samples
  [t * s, (t + 1) * s) and depends only on inputs up to the end of that hop:
  the input is left-padded with `effective_kernel - stride` zeros (where
  effective_kernel = (kernel_size - 1) * dilation + 1) and, when the length is
  not a multiple of the stride, right-padded up to the next multiple, so the
  output has ceil(input_len / stride) frames. With stride 1 this is the usual
  causal convolution (output length = input length).

  Attributes:
    features: output channels.
    kernel_size: taps.
    stride: downsampling factor.
    dilation: spacing of the taps.
    kernel_axes: logical names of the [width, in, out] kernel; the bias uses
      the last one. A channel dimension of size 1 (audio) should be named None
      so that it is never split over a mesh axis it cannot divide.
    dtype: compute dtype.
    param_dtype: parameter dtype.
    kernel_init: initializer of the kernel.
  """
  features: int
  kernel_size: int
  stride: int = 1
  dilation: int = 1
  kernel_axes: Tuple[Optional[str], ...] = KERNEL_AXES
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.lecun_normal()

  @property
  def effective_kernel(self) -> int:
    return (self.kernel_size - 1) * self.dilation + 1

  @property
  def left_padding(self) -> int:
    return max(self.effective_kernel - self.stride, 0)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Maps [batch, time, in] to [batch, ceil(time / stride), features]."""
    length = x.shape[1]
    if length < 1:
      raise ValueError(f'{self.name}: empty input of shape {x.shape}')
    kernel = self.param(
        'kernel', nn.with_logical_partitioning(self.kernel_init,
                                               self.kernel_axes),
        (self.kernel_size, x.shape[-1], self.features), self.param_dtype)
    bias = self.param(
        'bias', nn.with_logical_partitioning(nn.initializers.zeros,
                                             self.kernel_axes[-1:]),
        (self.features,), self.param_dtype)
    frames = _ceil_div(length, self.stride)
    left = self.left_padding
    # Zeros after the end only complete the last (partial) hop.
    right = max(0, (frames - 1) * self.stride + self.effective_kernel -
                length - left)
    y = lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype),
        window_strides=(self.stride,), padding=[(left, right)],
        rhs_dilation=(self.dilation,),
        dimension_numbers=('NWC', 'WIO', 'NWC'))
    return y + bias.astype(self.dtype)


class CausalConvTranspose1d(nn.Module):
  """Causal transposed 1-D convolution: upsamples [batch, T, C] by `stride`.

  Frame t of the input contributes `kernel_size` output samples starting at
  sample t * stride: out[t * stride + k] += x[t] @ kernel[k]. The overhang past
  T * stride is dropped, so the output has exactly T * stride samples and the
  hop of output samples [t * stride, (t + 1) * stride) depends on input frames
  <= t only. Because kernel_size is a multiple of the stride, this is computed
  as one matmul per frame followed by an overlap-add of kernel_size / stride
  hops, which avoids XLA's zero-inserting (stride times more work)
  transposed convolution.

  Attributes:
    features: output channels.
    stride: upsampling factor.
    kernel_size: taps; defaults to 2 * stride and must be a multiple of it.
    kernel_axes: logical names of the [width, in, out] kernel (see
      CausalConv1d).
    dtype: compute dtype.
    param_dtype: parameter dtype.
    kernel_init: initializer of the kernel.
  """
  features: int
  stride: int
  kernel_size: Optional[int] = None
  kernel_axes: Tuple[Optional[str], ...] = KERNEL_AXES
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.lecun_normal()

  @property
  def taps(self) -> int:
    return 2 * self.stride if self.kernel_size is None else self.kernel_size

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Maps [batch, T, in] to [batch, T * stride, features]."""
    taps, stride = self.taps, self.stride
    if taps % stride:
      raise ValueError(f'{self.name}: kernel_size={taps} must be a multiple '
                       f'of stride={stride}')
    kernel = self.param(
        'kernel', nn.with_logical_partitioning(self.kernel_init,
                                               self.kernel_axes),
        (taps, x.shape[-1], self.features), self.param_dtype)
    bias = self.param(
        'bias', nn.with_logical_partitioning(nn.initializers.zeros,
                                             self.kernel_axes[-1:]),
        (self.features,), self.param_dtype)
    batch, frames, _ = x.shape
    overlap = taps // stride
    # [batch, T, overlap, stride, features]: piece i of frame t lands in
    # output hop t + i.
    pieces = jnp.einsum('btc,kcd->btkd', x.astype(self.dtype),
                        kernel.astype(self.dtype))
    pieces = jnp.reshape(pieces, (batch, frames, overlap, stride,
                                  self.features))
    out = pieces[:, :, 0]
    for i in range(1, min(overlap, frames)):
      out = out + jnp.pad(pieces[:, :frames - i, i],
                          ((0, 0), (i, 0), (0, 0), (0, 0)))
    out = jnp.reshape(out, (batch, frames * stride, self.features))
    return out + bias.astype(self.dtype)


class ResidualUnit(nn.Module):
  """SEANet residual unit: x + conv1(act(conv7_dilated(act(x)))).

  Attributes:
    channels: width of the input, the hidden layer and the output.
    dilation: dilation of the kernel_size-tap convolution.
    kernel_size: taps of the dilated convolution.
    activation: 'elu' or 'snake' (ACTIVATIONS).
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  channels: int
  dilation: int
  kernel_size: int = 7
  activation: str = 'elu'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    y = _activate(self, self.activation, x, 'act_0')
    y = CausalConv1d(self.channels, self.kernel_size, dilation=self.dilation,
                     dtype=self.dtype, param_dtype=self.param_dtype,
                     name='dilated_conv')(y)
    y = _activate(self, self.activation, y, 'act_1')
    y = CausalConv1d(self.channels, 1, dtype=self.dtype,
                     param_dtype=self.param_dtype, name='pointwise_conv')(y)
    return nn.with_logical_constraint(x + y, ACTIVATION_AXES)


def _encoder_layers(kernel_size: int, strides: Sequence[int],
                    residual_kernel_size: int,
                    output_kernel_size: int) -> list[tuple[int, int]]:
  """(effective kernel, stride) of every convolution on the encoder's path."""
  layers = [(kernel_size, 1)]
  for stride in strides:
    layers += [((residual_kernel_size - 1) * d + 1, 1) for d in DILATIONS]
    layers.append((2 * stride, stride))
  layers.append((output_kernel_size, 1))
  return layers


@gin.configurable
class SEANetEncoder(nn.Module):
  """Causal SEANet encoder: audio [batch, samples] -> [batch, frames, D].

  input conv (kernel_size, `channels`) -> per stride s_i: 3 residual units
  (dilations 1, 3, 9) at the current width, ELU, strided conv (2 s_i taps,
  stride s_i) to channels * channel_mults[i] -> ELU -> conv (3 taps) to
  `embedding_dim`. The defaults (strides 2, 4, 6, 10) give a hop of 480
  samples, 50 frames per second at 24 kHz. Every layer is causal: frame t
  depends only on samples [(t + 1) * hop - receptive_field, (t + 1) * hop).

  Any length is accepted; the output has ceil(samples / hop) frames, the last
  one computed from a zero-completed hop (SoundStream pads audio to whole hops
  first, so that chunked and whole encodings agree).

  Attributes:
    channels: width of the first layer.
    channel_mults: width after each downsampling, as multiples of `channels`.
    strides: downsampling factors; their product is the hop length.
    embedding_dim: output dimension D (the quantizer's vector size).
    kernel_size: taps of the input convolution.
    residual_kernel_size: taps of the dilated residual convolutions.
    output_kernel_size: taps of the output convolution.
    activation: 'elu' (SoundStream) or 'snake' (DAC) everywhere an ELU stands.
    dtype: compute dtype (outputs are float32).
    param_dtype: parameter dtype.
  """
  channels: int = 32
  channel_mults: Sequence[int] = (2, 4, 8, 16)
  strides: Sequence[int] = (2, 4, 6, 10)
  embedding_dim: int = 128
  kernel_size: int = 7
  residual_kernel_size: int = 7
  output_kernel_size: int = 3
  activation: str = 'elu'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def hop_length(self) -> int:
    """Input samples per output frame (the product of the strides)."""
    return math.prod(self.strides)

  def _first_sample_of_frame0(self) -> int:
    """Earliest (negative) input sample that output frame 0 depends on."""
    start = 0
    for kernel, stride in reversed(_encoder_layers(
        self.kernel_size, self.strides, self.residual_kernel_size,
        self.output_kernel_size)):
      start = start * stride - max(kernel - stride, 0)
    return start

  @property
  def receptive_field(self) -> int:
    """Input samples that one output frame depends on (ending with its hop)."""
    return self.hop_length - self._first_sample_of_frame0()

  @property
  def context_frames(self) -> int:
    """Whole frames of left context that make a chunk's first frame exact."""
    return _ceil_div(-self._first_sample_of_frame0(), self.hop_length)

  @nn.compact
  def __call__(self, audio: Array) -> Array:
    """Encodes audio [batch, samples] into float32 [batch, frames, D]."""
    if len(self.channel_mults) != len(self.strides):
      raise ValueError(f'channel_mults {tuple(self.channel_mults)} and strides '
                       f'{tuple(self.strides)} must have the same length')
    if audio.ndim != 2:
      raise ValueError(f'expected audio [batch, samples], got {audio.shape}')
    _check_activation(self.activation)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.with_logical_constraint(audio.astype(self.dtype)[..., None],
                                   ('batch', 'length', None))
    # The audio has one channel: never split it over a mesh axis.
    x = CausalConv1d(self.channels, self.kernel_size,
                     kernel_axes=('conv_width', None, 'conv_out'),
                     name='input_conv', **kw)(x)
    x = nn.with_logical_constraint(x, ACTIVATION_AXES)
    width = self.channels
    for i, (mult, stride) in enumerate(zip(self.channel_mults, self.strides)):
      for j, dilation in enumerate(DILATIONS):
        x = ResidualUnit(width, dilation, self.residual_kernel_size, self.activation,
                         name=f'block_{i}_residual_{j}', **kw)(x)
      width = self.channels * mult
      x = CausalConv1d(width, 2 * stride, stride=stride, name=f'block_{i}_downsample',
                       **kw)(_activate(self, self.activation, x, f'block_{i}_act'))
      x = nn.with_logical_constraint(x, ACTIVATION_AXES)
    x = CausalConv1d(self.embedding_dim, self.output_kernel_size, name='output_conv',
                     **kw)(_activate(self, self.activation, x, 'output_act'))
    return nn.with_logical_constraint(x.astype(jnp.float32),
                                      ('batch', 'length', 'embed'))


@gin.configurable
class SEANetDecoder(nn.Module):
  """Causal SEANet decoder: [batch, frames, D] -> audio [batch, frames * hop].

  The mirror of SEANetEncoder: input conv (kernel_size taps) to
  channels * channel_mults[-1] -> per stride in reverse: ELU, causal
  transposed conv (2 s taps) to the next lower width, 3 residual units
  (dilations 1, 3, 9) -> ELU -> conv (kernel_size taps) to one channel
  (-> tanh when `tanh_output`). Causal: the output hop of frame t depends
  only on frames [t - context_frames, t].

  Attributes:
    channels: width of the last layer.
    channel_mults: widths as multiples of `channels`, in encoder order.
    strides: upsampling factors in encoder order (applied in reverse).
    embedding_dim: input dimension D.
    kernel_size: taps of the input and output convolutions.
    residual_kernel_size: taps of the dilated residual convolutions.
    tanh_output: squash the output into (-1, 1).
    activation: 'elu' (SoundStream) or 'snake' (DAC) everywhere an ELU stands.
    dtype: compute dtype (the output is float32).
    param_dtype: parameter dtype.
  """
  channels: int = 32
  channel_mults: Sequence[int] = (2, 4, 8, 16)
  strides: Sequence[int] = (2, 4, 6, 10)
  embedding_dim: int = 128
  kernel_size: int = 7
  residual_kernel_size: int = 7
  tanh_output: bool = False
  activation: str = 'elu'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def hop_length(self) -> int:
    """Output samples per input frame (the product of the strides)."""
    return math.prod(self.strides)

  @property
  def context_frames(self) -> int:
    """Frames before frame t that the output hop of frame t depends on."""
    # Walk from the first sample of hop 0 down to the earliest input index
    # each layer needs (floor division rounds towards -inf, as required).
    first = 0
    first -= self.kernel_size - 1  # output conv
    for stride in self.strides:
      for d in reversed(DILATIONS):
        first -= (self.residual_kernel_size - 1) * d
      # Transposed conv (2 s taps): sample n needs frames >= ceil((n-2s+1)/s).
      first = -((-(first - 2 * stride + 1)) // stride)
    first -= self.kernel_size - 1  # input conv
    return -first

  @property
  def receptive_field(self) -> int:
    """Input frames that one output hop depends on (its own and the context)."""
    return self.context_frames + 1

  @nn.compact
  def __call__(self, z: Array) -> Array:
    """Decodes [batch, frames, D] into float32 audio [batch, frames * hop]."""
    if len(self.channel_mults) != len(self.strides):
      raise ValueError(f'channel_mults {tuple(self.channel_mults)} and strides '
                       f'{tuple(self.strides)} must have the same length')
    if z.ndim != 3 or z.shape[-1] != self.embedding_dim:
      raise ValueError(f'expected [batch, frames, {self.embedding_dim}], got '
                       f'{z.shape}')
    _check_activation(self.activation)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.with_logical_constraint(z.astype(self.dtype),
                                   ('batch', 'length', 'embed'))
    widths = [self.channels] + [self.channels * m for m in self.channel_mults]
    x = CausalConv1d(widths[-1], self.kernel_size, name='input_conv',
                     **kw)(x)
    x = nn.with_logical_constraint(x, ACTIVATION_AXES)
    for i in reversed(range(len(self.strides))):
      x = CausalConvTranspose1d(widths[i], self.strides[i], name=f'block_{i}_upsample',
                                **kw)(_activate(self, self.activation, x, f'block_{i}_act'))
      x = nn.with_logical_constraint(x, ACTIVATION_AXES)
      for j, dilation in enumerate(DILATIONS):
        x = ResidualUnit(widths[i], dilation, self.residual_kernel_size, self.activation,
                         name=f'block_{i}_residual_{j}', **kw)(x)
    # One output channel: never split it over a mesh axis.
    x = CausalConv1d(1, self.kernel_size,
                     kernel_axes=('conv_width', 'conv_in', None),
                     name='output_conv', **kw)(_activate(self, self.activation, x,
                                                         'output_act'))
    x = x[..., 0].astype(jnp.float32)
    if self.tanh_output:
      x = jnp.tanh(x)
    return nn.with_logical_constraint(x, ('batch', 'length'))
