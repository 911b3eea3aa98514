"""Conformer blocks (Gulati et al., 2020) as w2v-BERT uses them, on the project's attention.

A block is macaron-style: half a feed-forward, self-attention with T5 relative position biases
(bidirectional, one bias table per stack shared by its layers), a convolution module, the other
half feed-forward, then a LayerNorm. The convolution module's normalisation is a LayerNorm
where the original has BatchNorm: batch statistics would be one more piece of cross-device state
under data parallelism and differ between training and tokenizing; a LayerNorm needs neither.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from musiclm_jax.nn.attention import DenseGeneral, MultiHeadAttention, RelativePositionBiases
from musiclm_jax.nn.transformer import LayerNorm, REMAT_POLICIES

Array = jax.Array
_EMBED_AXES = ('batch', 'length', 'embed')


@dataclasses.dataclass(frozen=True)
class ConformerConfig:
  """Sizes of a conformer stack (hashable, immutable).

  Attributes:
    embed_dim: model width.
    num_heads: attention heads.
    head_dim: per-head width.
    mlp_dim: feed-forward hidden width.
    conv_kernel_size: depthwise convolution width (frames).
    dropout_rate: dropout on sub-layer outputs and attention weights.
    relative_num_buckets / relative_max_distance: T5 relative position buckets.
    remat_policy: 'none' or a key of musiclm_jax.nn.transformer.REMAT_POLICIES.
    dtype / param_dtype: compute and parameter dtypes.
  """
  embed_dim: int = 1024
  num_heads: int = 8
  head_dim: int = 128
  mlp_dim: int = 4096
  conv_kernel_size: int = 5
  dropout_rate: float = 0.0
  relative_num_buckets: int = 32
  relative_max_distance: int = 128
  remat_policy: str = 'none'
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32


class FeedForward(nn.Module):
  """LayerNorm -> Dense(mlp) -> swish -> dropout -> Dense(embed) -> dropout."""
  config: ConformerConfig

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    cfg = self.config
    dense = functools.partial(DenseGeneral, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    h = LayerNorm(dtype=cfg.dtype, param_dtype=cfg.param_dtype, name='norm')(x)
    h = nn.swish(dense(cfg.mlp_dim, kernel_axes=('embed', 'mlp'), name='wi')(h))
    h = nn.with_logical_constraint(h, ('batch', 'length', 'mlp'))
    h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    h = dense(cfg.embed_dim, kernel_axes=('mlp', 'embed'), name='wo')(h)
    return nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)


class ConvModule(nn.Module):
  """LayerNorm -> pointwise (2x) -> GLU -> depthwise conv -> LayerNorm -> swish -> pointwise."""
  config: ConformerConfig

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    cfg = self.config
    dense = functools.partial(DenseGeneral, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    h = LayerNorm(dtype=cfg.dtype, param_dtype=cfg.param_dtype, name='norm')(x)
    h = dense(2 * cfg.embed_dim, kernel_axes=('embed', 'mlp'), name='pointwise_in')(h)
    h = nn.glu(h, axis=-1)
    # Depthwise convolution over time ('same' padding) as a sum of shifted, scaled copies: k
    # multiply-adds per value, no grouped convolution (slow on CPU), and shards like any
    # element-wise op along batch and embed.
    k = cfg.conv_kernel_size
    kernel = self.param('depthwise_kernel',
                        nn.with_logical_partitioning(nn.initializers.variance_scaling(
                            1.0, 'fan_in', 'truncated_normal', in_axis=0, out_axis=1),
                            ('conv_width', 'embed')),
                        (k, cfg.embed_dim), cfg.param_dtype).astype(cfg.dtype)
    bias = self.param('depthwise_bias', nn.with_logical_partitioning(nn.initializers.zeros,
                                                                     ('embed',)),
                      (cfg.embed_dim,), cfg.param_dtype).astype(cfg.dtype)
    left = (k - 1) // 2
    padded = jnp.pad(h, ((0, 0), (left, k - 1 - left), (0, 0)))
    length = h.shape[1]
    h = sum(padded[:, j:j + length] * kernel[j] for j in range(k)) + bias
    h = LayerNorm(dtype=cfg.dtype, param_dtype=cfg.param_dtype, name='conv_norm')(h)
    h = nn.swish(h)
    h = dense(cfg.embed_dim, kernel_axes=('mlp', 'embed'), name='pointwise_out')(h)
    return nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)


class ConformerBlock(nn.Module):
  """x + FF/2, + MHSA(rel. bias), + conv module, + FF/2, then LayerNorm."""
  config: ConformerConfig

  @nn.compact
  def __call__(self, x: Array, bias: Optional[Array], deterministic: bool) -> Array:
    cfg = self.config
    x = nn.with_logical_constraint(x, _EMBED_AXES)
    x = x + 0.5 * FeedForward(cfg, name='ff_in')(x, deterministic)
    h = LayerNorm(dtype=cfg.dtype, param_dtype=cfg.param_dtype, name='attention_norm')(x)
    h = MultiHeadAttention(num_heads=cfg.num_heads, head_dim=cfg.head_dim,
                           dropout_rate=cfg.dropout_rate, dtype=cfg.dtype,
                           param_dtype=cfg.param_dtype, name='self_attention')(
                               h, h, None, bias, deterministic=deterministic)
    x = x + nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    x = x + ConvModule(cfg, name='conv')(x, deterministic)
    x = x + 0.5 * FeedForward(cfg, name='ff_out')(x, deterministic)
    x = LayerNorm(dtype=cfg.dtype, param_dtype=cfg.param_dtype, name='out_norm')(x)
    return nn.with_logical_constraint(x, _EMBED_AXES)


class ConformerStack(nn.Module):
  """`num_layers` conformer blocks sharing one bidirectional relative-position bias table.

  `__call__` returns the output of every block it ran (index i is block i + 1's output), so a
  caller can read any layer's embeddings; `num_layers_to_run` stops early (the tokenizer needs
  the layers up to the one it reads, not the rest).
  """
  config: ConformerConfig
  num_layers: int

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool = True,
               num_layers_to_run: Optional[int] = None) -> Sequence[Array]:
    cfg = self.config
    n = self.num_layers if num_layers_to_run is None else num_layers_to_run
    if not 0 <= n <= self.num_layers:
      raise ValueError(f'num_layers_to_run={n} is outside 0..{self.num_layers}')
    length = x.shape[1]
    bias = RelativePositionBiases(num_heads=cfg.num_heads, num_buckets=cfg.relative_num_buckets,
                                  max_distance=cfg.relative_max_distance, bidirectional=True,
                                  dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                  name='relpos_bias')(length, length)
    block = ConformerBlock
    if cfg.remat_policy != 'none':
      block = nn.remat(ConformerBlock, policy=REMAT_POLICIES[cfg.remat_policy],
                       static_argnums=(3,))
    outputs = []
    # Only the blocks that run get parameters: `init` through the full forward pass makes all
    # of them, a tokenizer's `init` only those below the layer it reads.
    for i in range(n):
      x = block(cfg, name=f'layer_{i}')(x, bias, deterministic)
      outputs.append(x)
    return outputs
