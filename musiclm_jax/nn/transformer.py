"""Decoder-only T5-style Transformer language model with scan/remat/KV cache."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta
from jax import lax

from musiclm_jax.nn.attention import DenseGeneral
from musiclm_jax.nn.attention import MultiHeadAttention
from musiclm_jax.nn.attention import RelativePositionBiases
from musiclm_jax.nn.attention import combine_masks
from musiclm_jax.nn.attention import make_causal_mask
from musiclm_jax.nn.attention import make_padding_mask
from musiclm_jax.nn.attention import make_segment_mask

Array = jax.Array
Dtype = Any

ACTIVATIONS = ('gelu', 'relu', 'swish', 'gated_gelu')

# 'none' disables rematerialisation; 'full' saves nothing (recompute the whole
# layer in the backward pass); the others are jax.checkpoint_policies.
REMAT_POLICIES: dict[str, Optional[Callable[..., bool]]] = {
    'full': None,
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
    'dots_with_no_batch_dims_saveable':
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'nothing_saveable': jax.checkpoint_policies.nothing_saveable,
}

_EMBED_AXES = ('batch', 'length', 'embed')


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyper-parameters of a decoder-only Transformer (hashable, immutable).

  Attributes:
    vocab_size: number of token ids (id 0 is padding).
    embed_dim: model (residual stream) width.
    num_layers: number of decoder layers.
    num_heads: attention heads per layer.
    head_dim: per-head query/key/value width.
    mlp_dim: hidden width of the MLP block.
    dropout_rate: dropout on embeddings, sub-layer outputs and attention
      weights (uses the 'dropout' rng stream when not deterministic).
    activation: MLP activation, one of 'gelu', 'relu', 'swish', 'gated_gelu'.
    dtype: compute dtype (e.g. jnp.bfloat16).
    param_dtype: parameter dtype (keep float32 for mixed precision).
    relative_num_buckets: number of T5 relative position buckets.
    relative_max_distance: distance from which buckets saturate.
    scan_layers: stack layer parameters along a leading 'layers' axis and run
      them with `nn.scan` (faster compiles for deep models).
    remat_policy: 'none', 'full', 'dots_saveable',
      'dots_with_no_batch_dims_saveable' or 'nothing_saveable'.
    logits_via_embedding: tie the output projection to the token embedding.
    attention_block_size: the causal Decoder's full-sequence attention (training,
      teacher-forced scoring, `init`) runs blockwise with this many queries per block
      (`attention.causal_blockwise_attention`: no [length, length] tensor, the blocks above the
      diagonal skipped); 0 runs one dense softmax. Ignored while attention dropout is active
      and in KV-cache decoding. The result is the same up to float rounding.
    max_decode_length: informational only; the KV cache length is set by the
      token length used to initialise the cache.
  """
  vocab_size: int
  embed_dim: int
  num_layers: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  dropout_rate: float = 0.0
  activation: str = 'gelu'
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  relative_num_buckets: int = 32
  relative_max_distance: int = 128
  scan_layers: bool = False
  remat_policy: str = 'none'
  logits_via_embedding: bool = False
  max_decode_length: Optional[int] = None
  attention_block_size: int = 128

  def __post_init__(self):
    if self.activation not in ACTIVATIONS:
      raise ValueError(
          f'activation must be one of {ACTIVATIONS}, got {self.activation!r}')
    if self.remat_policy != 'none' and self.remat_policy not in REMAT_POLICIES:
      raise ValueError(
          f"remat_policy must be 'none' or one of {tuple(REMAT_POLICIES)}, "
          f'got {self.remat_policy!r}')
    if self.attention_block_size < 0:
      raise ValueError('attention_block_size must be >= 0 (0: dense attention), got '
                       f'{self.attention_block_size}')


class LayerNorm(nn.Module):
  """Layer normalisation with logically partitioned ('norm',) scale and bias.

  Statistics are computed in float32 regardless of the compute dtype.

  Attributes:
    epsilon: variance floor.
    use_bias: learn an additive bias.
    dtype: output dtype.
    param_dtype: dtype of scale and bias.
  """
  epsilon: float = 1e-6
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Normalises the last axis of `x`; returns an array of `x`'s shape."""
    features = x.shape[-1]
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    centered = x32 - mean
    var = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
    y = centered * lax.rsqrt(var + self.epsilon)
    scale = self.param(
        'scale', nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
        (features,), self.param_dtype)
    y = y * scale.astype(jnp.float32)
    if self.use_bias:
      bias = self.param(
          'bias', nn.with_logical_partitioning(nn.initializers.zeros,
                                               ('norm',)),
          (features,), self.param_dtype)
      y = y + bias.astype(jnp.float32)
    return y.astype(self.dtype)


class MlpBlock(nn.Module):
  """Position-wise feed-forward block (optionally gated).

  Attributes:
    config: the model configuration (uses mlp_dim, activation, dropout_rate,
      dtype, param_dtype).
  """
  config: TransformerConfig

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    """Maps [batch, length, embed] to [batch, length, embed]."""
    cfg = self.config
    dense = functools.partial(DenseGeneral, dtype=cfg.dtype,
                              param_dtype=cfg.param_dtype)
    wi = functools.partial(dense, cfg.mlp_dim, kernel_axes=('embed', 'mlp'))
    if cfg.activation == 'gated_gelu':
      h = nn.gelu(wi(name='wi_0')(x)) * wi(name='wi_1')(x)
    else:
      act = {'gelu': nn.gelu, 'relu': nn.relu, 'swish': nn.swish}[
          cfg.activation]
      h = act(wi(name='wi')(x))
    h = nn.with_logical_constraint(h, ('batch', 'length', 'mlp'))
    h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    out = dense(x.shape[-1], kernel_axes=('mlp', 'embed'), name='wo')(h)
    return nn.with_logical_constraint(out, _EMBED_AXES)


class Embed(nn.Module):
  """Token embedding table [vocab, embed] with an optional tied read-out.

  Attributes:
    num_embeddings: vocabulary size.
    features: embedding width.
    dtype: compute dtype of the looked-up vectors.
    param_dtype: dtype of the table.
  """
  num_embeddings: int
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.embedding = self.param(
        'embedding',
        nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0),
                                     ('vocab', 'embed')),
        (self.num_embeddings, self.features), self.param_dtype)

  def __call__(self, tokens: Array) -> Array:
    """Maps [batch, length] ids to [batch, length, features] vectors."""
    # Gathering rows of a table sharded along 'embed' would produce an
    # embed-sharded output that the partitioner can only re-shard to
    # batch-sharded by full replication; gathering from a table whole along
    # 'embed' keeps the lookup local (the table is small next to activations).
    table = nn.with_logical_constraint(self.embedding, ('vocab', None))
    out = jnp.take(table, tokens, axis=0).astype(self.dtype)
    return nn.with_logical_constraint(out, _EMBED_AXES)

  def attend(self, x: Array) -> Array:
    """Tied read-out: [..., features] -> [..., num_embeddings] logits."""
    return jnp.einsum('...e,ve->...v', x,
                      self.embedding.astype(self.dtype))


class DecoderLayer(nn.Module):
  """Pre-LayerNorm causal self-attention + MLP block with residuals.

  Arguments are positional so that `nn.remat(static_argnums=...)` and
  `nn.scan(in_axes=nn.broadcast)` can treat the flags as static.

  Attributes:
    config: the model configuration.
    scanned: return `(output, None)` as required by `nn.scan`.
    causal: the mask given is causal (the Decoder's): full-sequence calls may then use the
      blockwise attention of `config.attention_block_size`. An encoder layer with a
      bidirectional mask leaves it False.
  """
  config: TransformerConfig
  scanned: bool = False
  causal: bool = False

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array], bias: Optional[Array],
               deterministic: bool, decode: bool):
    """Applies the layer.

    Args:
      x: [batch, length, embed] residual stream.
      mask: attention mask broadcastable to [batch, heads, q_len, k_len].
      bias: shared relative position bias [1, heads, q_len, k_len].
      deterministic: disables dropout when true.
      decode: use the attention KV cache (see `MultiHeadAttention`).

    Returns:
      [batch, length, embed] (wrapped as `(y, None)` when `scanned`).
    """
    cfg = self.config
    x = nn.with_logical_constraint(x, _EMBED_AXES)
    h = LayerNorm(dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                  name='pre_self_attention_layer_norm')(x)
    h = MultiHeadAttention(
        num_heads=cfg.num_heads,
        head_dim=cfg.head_dim,
        dropout_rate=cfg.dropout_rate,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        causal_block_size=cfg.attention_block_size if self.causal else 0,
        name='self_attention')(h, h, mask, bias, deterministic=deterministic,
                               decode=decode)
    h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    x = x + h
    h = LayerNorm(dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                  name='pre_mlp_layer_norm')(x)
    h = MlpBlock(cfg, name='mlp')(h, deterministic)
    h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    x = nn.with_logical_constraint(x + h, _EMBED_AXES)
    return (x, None) if self.scanned else x


class Decoder(nn.Module):
  """Decoder-only language model over integer tokens (0 = padding).

  Variables: 'params' (trainable); with `decode=True`, a 'cache' collection
  holding, per layer, `cached_key`/`cached_value` [batch, heads, max_len,
  head_dim] (or packed, [batch * heads, max_len, head_dim]: see
  `pack_decoder_cache`) and `cache_index`, plus the decoder's own
  `cache_index` and `key_mask` [batch, max_len] (non-padding flags of the
  tokens fed so far). With `scan_layers` every per-layer variable gets a
  leading layer axis. A cache may be grown between calls
  (`resize_decoder_cache`): attention costs follow its length, so a decoder
  can start small and grow it as positions fill up.

  Attributes:
    config: the model configuration.
  """
  config: TransformerConfig

  @nn.compact
  def __call__(self,
               tokens: Array,
               *,
               segment_ids: Optional[Array] = None,
               deterministic: bool = True,
               decode: bool = False,
               features_only: bool = False) -> Array:
    """Computes next-token logits.

    Args:
      tokens: [batch, length] int32 token ids. Without `segment_ids`, id 0 is
        padding and is never attended to as a key. In decode mode (after the
        cache exists) `length` consecutive positions are appended to the
        cache: 1 per step, or a whole prompt at once (prefill), with causal
        attention within the chunk.
      segment_ids: optional [batch, length] packing ids (T5X convention: 0
        is padding, equal ids form one sequence). When given they replace the
        token-based padding rule, so a BOS token of id 0 inside a segment is
        a real key, and attention is restricted to positions with equal ids.
        In decode mode only "0 = padding" is used (e.g. the left padding of a
        prompt); without them every decoded token, including id 0, is a real
        key.
      deterministic: disables dropout when true; when false a 'dropout' rng
        is required if `dropout_rate > 0`.
      decode: autoregressive mode using the 'cache' collection. Create the
        cache with `init_decoder_cache` (or `model.init(rng, zeros[b, L],
        decode=True)['cache']`), then call `apply` with `mutable=['cache']`,
        a prompt chunk or one token at a time. The caller keeps the number
        of positions fed within the cache length L (a traced cache index
        cannot be checked; an overflowing write would be clamped).
      features_only: return the final (normalised) residual stream [batch, length, embed] in
        the compute dtype instead of logits, for a caller that reads out only some vocabulary
        columns itself (StageModel's level head); the read-out parameters are not used.

    Returns:
      [batch, length, vocab] float32 logits (or the features, see `features_only`).
    """
    cfg = self.config
    embedder = Embed(
        num_embeddings=cfg.vocab_size,
        features=cfg.embed_dim,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        name='token_embedder')
    relpos = RelativePositionBiases(
        num_heads=cfg.num_heads,
        num_buckets=cfg.relative_num_buckets,
        max_distance=cfg.relative_max_distance,
        bidirectional=False,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        name='relpos_bias')

    cache_ready = False
    if decode:
      cache_ready = self.has_variable('cache', 'cache_index')
      cache_index = self.variable('cache', 'cache_index',
                                  lambda: jnp.array(0, dtype=jnp.int32))
      key_mask = self.variable('cache', 'key_mask', jnp.zeros, tokens.shape,
                               jnp.bool_)

    if cache_ready:
      batch, max_length = key_mask.value.shape
      length = tokens.shape[-1]
      if tokens.ndim != 2 or tokens.shape[0] != batch or not (
          1 <= length <= max_length):
        raise ValueError(f'decode expects tokens of shape ({batch}, n) with '
                         f'1 <= n <= {max_length} (the cache length), got '
                         f'{tokens.shape}.')
      if segment_ids is not None and segment_ids.shape != tokens.shape:
        raise ValueError(f'segment_ids shape {segment_ids.shape} differs from '
                         f'tokens shape {tokens.shape}.')
      # Every decoded token is a real key (so a BOS of id 0 works) unless
      # segment id 0 marks it as padding.
      is_real = (jnp.ones(tokens.shape, jnp.bool_) if segment_ids is None
                 else segment_ids != 0)
      position = cache_index.value
      # Padding is a property of keys, so remember which cached slots hold
      # real tokens; causality (also within a multi-token chunk) is enforced
      # by each layer's cache index.
      key_mask.value = lax.dynamic_update_slice(
          key_mask.value, is_real, (jnp.int32(0), position))
      cache_index.value = position + length
      mask = key_mask.value[:, None, None, :]
      # Only the bucket rows of the current queries are computed.
      bias = relpos(length, max_length, bidirectional=False,
                    decode_position=position)
    else:
      length = tokens.shape[-1]
      if segment_ids is None:
        padding = make_padding_mask(tokens)
        segments = None
      else:
        padding = make_padding_mask(segment_ids)
        segments = make_segment_mask(segment_ids)
      mask = combine_masks(make_causal_mask(tokens), padding, segments)
      bias = relpos(length, length, bidirectional=False)

    x = embedder(tokens.astype(jnp.int32))
    x = nn.with_logical_constraint(x, _EMBED_AXES)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)

    layer_cls = DecoderLayer
    if cfg.remat_policy != 'none':
      # self is argument 0, so (deterministic, decode) are 4 and 5.
      layer_cls = nn.remat(
          layer_cls,
          prevent_cse=not cfg.scan_layers,
          policy=REMAT_POLICIES[cfg.remat_policy],
          static_argnums=(4, 5))
    if cfg.scan_layers:
      stack = nn.scan(
          layer_cls,
          variable_axes={'params': 0, 'cache': 0},
          split_rngs={'params': True, 'dropout': True},
          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
          length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: 'layers'})
      x, _ = stack(cfg, scanned=True, causal=True, name='layers')(x, mask, bias,
                                                     deterministic, decode)
    else:
      for i in range(cfg.num_layers):
        x = layer_cls(cfg, causal=True, name=f'layers_{i}')(x, mask, bias, deterministic,
                                               decode)

    x = LayerNorm(dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                  name='decoder_norm')(x)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    if features_only:
      return nn.with_logical_constraint(x, _EMBED_AXES)
    if cfg.logits_via_embedding:
      # Tied weights: the embedding has unit-variance rows, so rescale to keep
      # initial logits O(1).
      logits = embedder.attend(x) / np.sqrt(cfg.embed_dim)
    else:
      logits = DenseGeneral(
          cfg.vocab_size,
          kernel_axes=('embed', 'vocab'),
          dtype=cfg.dtype,
          param_dtype=cfg.param_dtype,
          name='logits_dense')(x)
    logits = nn.with_logical_constraint(logits, ('batch', 'length', 'vocab'))
    return logits.astype(jnp.float32)


def readout_columns(config: TransformerConfig, params: Any, start: Any, width: int) -> Array:
  """[embed, width]: the read-out's columns of ids [start, start + width), in the compute dtype.

  `Decoder` logits of those ids are `features @ readout_columns(...)` (features: the decoder's
  output with `features_only=True`), the tied table's rescaling included. A caller that needs
  only a slice of the vocabulary (an RVQ level's codes) reads out just that slice.

  Args:
    config: the Decoder's configuration.
    params: the Decoder's parameters (its own tree, unboxed).
    start: first id; an int or a traced int32 scalar (a dynamic slice).
    width: static number of ids.
  """
  if config.logits_via_embedding:
    table = lax.dynamic_slice_in_dim(params['token_embedder']['embedding'], start, width, 0)
    return (table.astype(config.dtype) / np.sqrt(config.embed_dim).astype(np.float32)).T
  kernel = lax.dynamic_slice_in_dim(params['logits_dense']['kernel'], start, width, 1)
  return kernel.astype(config.dtype)


def init_decoder_cache(model: Decoder, batch_size: int, max_length: int,
                       packed: bool = False) -> Any:
  """Creates an all-zero decode cache without computing any parameters.

  Equivalent to `model.init(rng, jnp.zeros((batch_size, max_length),
  jnp.int32), decode=True)['cache']` (whose cache is all zeros too) but only
  traces shapes.

  Args:
    model: the `Decoder`.
    batch_size: number of sequences decoded in lockstep.
    max_length: cache length (the maximum number of decoded positions).
    packed: return it packed (`pack_decoder_cache`).

  Returns:
    The 'cache' collection pytree to pass as `{'params': ..., 'cache': ...}`.
  """
  tokens = jnp.zeros((batch_size, max_length), jnp.int32)
  shapes = jax.eval_shape(
      functools.partial(model.init, decode=True), jax.random.key(0), tokens)
  cache = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                 meta.unbox(shapes['cache']))
  return pack_decoder_cache(cache) if packed else cache


def unroll_layers(model: Decoder, params: Any) -> tuple[Decoder, Any]:
  """The unscanned Decoder equivalent to `model`, and its parameters.

  A scanned decoder keeps each layer's parameters (and decode cache) stacked
  along a leading axis; a decode step inside `nn.scan` then copies every
  layer's weights and cache out of the stacks and back on every step. For
  decoding, split the stacks once instead (the result computes the same
  function): 'layers' becomes 'layers_0', 'layers_1', ... A model without
  `scan_layers` is returned as is.

  Args:
    model: the `Decoder`.
    params: its (unboxed) parameters, e.g. inside a jitted function.

  Returns:
    (model, params) to use in its place.
  """
  if not model.config.scan_layers:
    return model, params
  params = dict(params)
  stacked = params.pop('layers')
  for i in range(model.config.num_layers):
    params[f'layers_{i}'] = jax.tree_util.tree_map(lambda x, i=i: x[i], stacked)
  config = dataclasses.replace(model.config, scan_layers=False)
  return model.clone(config=config), params


_KV_NAMES = ('cached_key', 'cached_value')


def _map_cache(fn: Callable[[str, Array], Array], cache: Any) -> Any:
  """Applies `fn(variable name, leaf)` to every leaf of a 'cache' pytree."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: fn(getattr(path[-1], 'key', None), leaf), cache)


def pack_decoder_cache(cache: Any) -> Any:
  """Merges the batch and heads axes of the cached keys and values.

  [..., batch, heads, length, head_dim] becomes [..., batch * heads, length,
  head_dim] (a free reshape; batch-major rows). Attention over a packed cache
  is a plain batched matrix product of the cache buffer itself, which XLA:CPU
  runs without copying or transposing the cache on every decode step (see
  `attention.cached_attention`). A head-major cache keeps batch and heads as
  separate axes, which a mesh can shard independently: pack a cache only
  when it is not sharded.

  Args:
    cache: a head-major (unpacked) 'cache' collection.

  Returns:
    The packed cache.
  """

  def pack(name, leaf):
    if name not in _KV_NAMES:
      return leaf
    *lead, batch, heads, length, depth = leaf.shape
    return leaf.reshape(*lead, batch * heads, length, depth)

  return _map_cache(pack, cache)


def unpack_decoder_cache(cache: Any, num_heads: int) -> Any:
  """Inverse of `pack_decoder_cache` (`num_heads`: the model's heads)."""

  def unpack(name, leaf):
    if name not in _KV_NAMES:
      return leaf
    *lead, rows, length, depth = leaf.shape
    return leaf.reshape(*lead, rows // num_heads, num_heads, length, depth)

  return _map_cache(unpack, cache)


def decoder_cache_length(cache: Any) -> int:
  """The number of positions a 'cache' collection has room for."""
  leaves = jax.tree_util.tree_flatten_with_path(cache)[0]
  lengths = {leaf.shape[-1] for path, leaf in leaves
             if getattr(path[-1], 'key', None) == 'key_mask'}
  if len(lengths) != 1:
    raise ValueError(f'not a Decoder cache (key_mask lengths {lengths})')
  return lengths.pop()


def resize_decoder_cache(cache: Any, length: int) -> Any:
  """Grows a decode cache (packed or not) to `length` positions.

  The new slots are zeros, as in a fresh cache: the positions written so far
  keep their keys, values and padding flags, and decoding continues as if
  the cache had had this length from the start (the new slots lie after
  every position fed, and are masked until written).

  Args:
    cache: a 'cache' collection.
    length: the new length, at least the current one.

  Returns:
    The grown cache (the same cache when `length` is its length).
  """
  current = decoder_cache_length(cache)
  if length < current:
    raise ValueError(f'cannot shrink a decode cache from {current} to {length} '
                     'positions')

  def grow(name, leaf):
    # The length axis: [..., length, head_dim] for keys and values,
    # [batch, length] for the padding flags.
    if name in _KV_NAMES:
      axis = leaf.ndim - 2
    elif name == 'key_mask':
      axis = leaf.ndim - 1
    else:
      return leaf
    widths = [(0, 0)] * leaf.ndim
    widths[axis] = (0, length - current)
    return jnp.pad(leaf, widths)

  return cache if length == current else _map_cache(grow, cache)


def count_params(params: Any) -> int:
  """Returns the total number of scalars in a (possibly boxed) param tree."""
  leaves = jax.tree_util.tree_leaves(meta.unbox(params))
  return int(sum(np.prod(np.shape(leaf), dtype=np.int64) for leaf in leaves))
