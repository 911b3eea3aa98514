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
from typing import Any, Mapping, Optional, Sequence

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
    scan_layers: run a stack's blocks with `nn.scan` over parameters stacked along a leading
      'layers' axis (one compiled block instead of one per layer: a 24-layer stack compiles in a
      fraction of the time). Off keeps one `layer_{i}` subtree per block, the layout of the
      earlier checkpoints; `stack_layer_params` / `unstack_layer_params` convert between them.
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
  scan_layers: bool = False
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
  """x + FF/2, + MHSA(rel. bias), + conv module, + FF/2, then LayerNorm.

  Arguments are positional so that `nn.remat(static_argnums=...)` and
  `nn.scan(in_axes=nn.broadcast)` can treat `deterministic` as static.

  Attributes:
    config: the stack's sizes.
    scanned: return `(output, output)`, the (carry, per-layer output) pair of `nn.scan`.
  """
  config: ConformerConfig
  scanned: bool = False

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
    x = nn.with_logical_constraint(x, _EMBED_AXES)
    return (x, x) if self.scanned else x


class ConformerStack(nn.Module):
  """`num_layers` conformer blocks sharing one bidirectional relative-position bias table.

  `__call__` returns the output of every block it ran (index i is block i + 1's output), so a
  caller can read any layer's embeddings; `num_layers_to_run` stops early (the tokenizer needs
  the layers up to the one it reads, not the rest).

  Parameters: 'relpos_bias' and, unscanned, one 'layer_{i}' subtree per block; scanned
  (`config.scan_layers`), one 'layers' subtree whose leaves carry a leading [num_layers] axis
  (logical name 'layers'). Unscanned, only the blocks that run get parameters: `init` through
  the full forward pass makes all of them, a tokenizer's `init` only those below the layer it
  reads. Scanned, `init` always makes the whole stack, so every `init` path gives the tree of
  the full forward pass (a tokenizer loads a training run's stacked parameters as they are).

  Scanned, `num_layers_to_run=n < num_layers` scans only the first n slices of the stacked
  parameters (no compute for the blocks above); only `init` runs all of them, to create them.
  """
  config: ConformerConfig
  num_layers: int

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool = True,
               num_layers_to_run: Optional[int] = None) -> Sequence[Array]:
    """Runs the first `num_layers_to_run` (default all) blocks on x [batch, length, embed].

    Returns:
      A list of `num_layers_to_run` arrays [batch, length, embed], block 1's output first.
    """
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
      # self is argument 0, so deterministic is 3. Inside a scan the loop already keeps XLA
      # from merging the recomputation with the forward pass (as in the stage decoders).
      block = nn.remat(ConformerBlock, prevent_cse=not cfg.scan_layers,
                       policy=REMAT_POLICIES[cfg.remat_policy], static_argnums=(3,))
    if not cfg.scan_layers:
      outputs = []
      for i in range(n):
        x = block(cfg, name=f'layer_{i}')(x, bias, deterministic)
        outputs.append(x)
      return outputs
    if n == 0:
      return []
    scan_length = self.num_layers if self.is_initializing() else n
    stack = nn.scan(block,
                    variable_axes={'params': 0},
                    split_rngs={'params': True, 'dropout': True},
                    in_axes=(nn.broadcast, nn.broadcast),
                    length=scan_length,
                    metadata_params={nn.PARTITION_NAME: 'layers'})
    if scan_length < self.num_layers:
      stack = nn.map_variables(
          stack, 'params',
          trans_in_fn=lambda v: jax.tree_util.tree_map(lambda a: a[:scan_length], v))
    last, ys = stack(cfg, scanned=True, name='layers')(x, bias, deterministic)
    outputs = [ys[i] for i in range(n)]
    if n == scan_length:
      # The carry is the same array; a caller that reads the last output only (training) then
      # leaves the stacked per-layer outputs unused, for XLA to drop.
      outputs[-1] = last
    return outputs


def _layer_names(num_layers: int) -> list[str]:
  return [f'layer_{i}' for i in range(num_layers)]


def stack_layer_params(stack_params: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
  """An unscanned ConformerStack's params ('layer_{i}' subtrees) in the scanned layout.

  Args:
    stack_params: the stack's (unboxed) params: 'relpos_bias' and 'layer_0'..'layer_{n-1}'.
    num_layers: n, the stack's `num_layers`.

  Returns:
    {'relpos_bias': ..., 'layers': the block params stacked along a new leading axis}.
  """
  names = _layer_names(num_layers)
  missing = [k for k in names if k not in stack_params]
  if missing:
    raise KeyError(f'unscanned conformer params lack {missing}')
  rest = {k: v for k, v in stack_params.items() if k not in names}
  layers = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[stack_params[k] for k in names])
  return {**rest, 'layers': layers}


def unstack_layer_params(stack_params: Mapping[str, Any]) -> dict[str, Any]:
  """A scanned ConformerStack's params ('layers', stacked) in the unscanned 'layer_{i}' layout."""
  rest = {k: v for k, v in stack_params.items() if k != 'layers'}
  layers = stack_params['layers']
  num_layers = jax.tree_util.tree_leaves(layers)[0].shape[0]
  for i in range(num_layers):
    rest[f'layer_{i}'] = jax.tree_util.tree_map(lambda a, i=i: a[i], layers)
  return rest
