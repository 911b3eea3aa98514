"""Multi-head attention with T5 relative position biases, masks and a KV cache."""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]


# ---------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------


def make_attention_mask(
    query_input: Array,
    key_input: Array,
    pairwise_fn: Callable[[Array, Array], Array] = jnp.multiply,
    dtype: Dtype = jnp.bool_,
) -> Array:
  """Builds a pairwise attention mask from per-position query and key values.

  Args:
    query_input: [batch, q_len] values attached to each query position (for
      example a 0/1 "is real token" flag, or segment ids).
    key_input: [batch, k_len] values attached to each key position.
    pairwise_fn: combines a query value and a key value into a truthy mask
      entry; `jnp.multiply` gives "both are valid", `jnp.equal` gives "same
      segment", `jnp.greater_equal` on positions gives causality.
    dtype: dtype of the returned mask.

  Returns:
    [batch, 1, q_len, k_len] mask (the singleton axis broadcasts over heads).
  """
  mask = pairwise_fn(query_input[..., :, None], key_input[..., None, :])
  return mask[..., None, :, :].astype(dtype)


def make_causal_mask(x: Union[Array, int], dtype: Dtype = jnp.bool_) -> Array:
  """Builds a causal (lower-triangular) mask.

  Args:
    x: either an int sequence length, or a [batch, length] token array whose
      last axis gives the length (and leading axes give the batch shape).
    dtype: dtype of the returned mask.

  Returns:
    [1, 1, length, length] mask when `x` is an int, else
    [batch, 1, length, length]; entry (i, j) is true iff key j <= query i.
  """
  if isinstance(x, (int, np.integer)):
    idxs = jnp.arange(int(x), dtype=jnp.int32)[None, :]
  else:
    idxs = jnp.broadcast_to(
        jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape)
  return make_attention_mask(idxs, idxs, jnp.greater_equal, dtype=dtype)


def make_padding_mask(query_tokens: Array, key_tokens: Optional[Array] = None,
                      dtype: Dtype = jnp.bool_) -> Array:
  """Masks out attention to padding keys (token id 0 is padding).

  Only keys are masked: a padding query still attends to the real keys so its
  (ignored) output stays finite and identical between full and cached
  decoding.

  Args:
    query_tokens: [batch, q_len] int ids (only the shape is used).
    key_tokens: [batch, k_len] int token ids or segment ids, 0 marking
      padding; defaults to `query_tokens`.
    dtype: dtype of the returned mask.

  Returns:
    [batch, 1, q_len, k_len] mask, true where the key is a real token.
  """
  if key_tokens is None:
    key_tokens = query_tokens
  q_ones = jnp.ones(query_tokens.shape, jnp.bool_)
  return make_attention_mask(q_ones, key_tokens != 0, jnp.logical_and, dtype)


def make_segment_mask(query_segment_ids: Array,
                      key_segment_ids: Optional[Array] = None,
                      dtype: Dtype = jnp.bool_) -> Array:
  """Restricts attention to positions of the same packed segment.

  Args:
    query_segment_ids: [batch, q_len] int segment ids (packing).
    key_segment_ids: [batch, k_len]; defaults to `query_segment_ids`.
    dtype: dtype of the returned mask.

  Returns:
    [batch, 1, q_len, k_len] mask, true where both segment ids are equal.
  """
  if key_segment_ids is None:
    key_segment_ids = query_segment_ids
  return make_attention_mask(query_segment_ids, key_segment_ids, jnp.equal,
                             dtype)


def combine_masks(*masks: Optional[Array], dtype: Dtype = jnp.bool_
                  ) -> Optional[Array]:
  """Logical-ANDs masks of equal rank; `None` entries are ignored.

  Args:
    *masks: masks (bool or 0/1) of the same rank, broadcastable to each other.
    dtype: dtype of the returned mask.

  Returns:
    The combined mask, or None when every input is None.
  """
  masks = [m for m in masks if m is not None]
  if not masks:
    return None
  if len({m.ndim for m in masks}) != 1:
    raise ValueError(
        f'masks must have the same rank, got {[m.ndim for m in masks]}')
  mask = masks[0].astype(jnp.bool_)
  for other in masks[1:]:
    mask = jnp.logical_and(mask, other.astype(jnp.bool_))
  return mask.astype(dtype)


# ---------------------------------------------------------------------------
# Relative position biases
# ---------------------------------------------------------------------------


def _distance_bucket_table(num_buckets: int, max_distance: int) -> np.ndarray:
  """Buckets of non-negative distances 0..max_distance (T5X numpy formula).

  Evaluated once in numpy exactly as T5X does, so that traced callers (the
  decode path, whose query position is dynamic) and static callers index the
  same table and can never disagree because of a last-ulp difference between
  numpy's and XLA's `log` at a bucket boundary.
  """
  n = np.arange(max_distance + 1, dtype=np.int32)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  # The eps keeps log() finite at n == 0 (that branch is discarded anyway).
  val_if_large = max_exact + (
      np.log(n.astype(np.float32) / max_exact + np.finfo(np.float32).eps) /
      np.log(max_distance / max_exact) *
      (num_buckets - max_exact)).astype(np.int32)
  val_if_large = np.minimum(val_if_large, num_buckets - 1)
  return np.where(is_small, n, val_if_large).astype(np.int32)


def relative_position_bucket(relative_position: Array,
                             bidirectional: bool = True,
                             num_buckets: int = 32,
                             max_distance: int = 128) -> Array:
  """Maps relative positions to T5 bucket ids (Mesh TF / T5X formula).

  Small distances each get their own bucket; larger ones share log-spaced
  buckets up to `max_distance`, beyond which everything falls into the last
  bucket. In the bidirectional case half of the buckets are used for keys
  after the query. In the causal case keys after the query (positive relative
  positions) all map to bucket 0, they are masked anyway.

  Args:
    relative_position: int array (may be traced) of
      `memory_position - query_position`.
    bidirectional: whether keys after the query get their own buckets.
    num_buckets: total number of buckets.
    max_distance: distance from which all positions share the last bucket.

  Returns:
    int32 array of the same shape with values in [0, num_buckets).
  """
  n = -jnp.asarray(relative_position).astype(jnp.int32)
  ret = jnp.zeros(n.shape, jnp.int32)
  if bidirectional:
    num_buckets //= 2
    ret += (n < 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  if max_distance < num_buckets // 2:
    raise ValueError(f'max_distance ({max_distance}) must be at least the '
                     f'number of exact buckets ({num_buckets // 2}).')
  # n is now a non-negative distance; every distance >= max_distance falls
  # in the last bucket, so the table can be indexed with a clipped distance.
  table = jnp.asarray(_distance_bucket_table(num_buckets, max_distance))
  return ret + table[jnp.minimum(n, max_distance)]


class RelativePositionBiases(nn.Module):
  """T5 learned relative position biases, one scalar per (head, bucket).

  Attributes:
    num_heads: number of attention heads.
    num_buckets: number of relative position buckets.
    max_distance: distance from which all positions share the last bucket.
    bidirectional: default for `__call__`'s `bidirectional` argument.
    dtype: dtype of the returned bias.
    param_dtype: dtype of the embedding table.
    embedding_init: initializer of the [heads, buckets] table.
  """
  num_heads: int
  num_buckets: int = 32
  max_distance: int = 128
  bidirectional: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  embedding_init: Initializer = nn.initializers.variance_scaling(
      1.0, 'fan_avg', 'uniform')

  @nn.compact
  def __call__(self, qlen: int, klen: int,
               bidirectional: Optional[bool] = None,
               decode_position: Optional[Array] = None) -> Array:
    """Computes the additive attention bias.

    Args:
      qlen: number of query positions (static). In decode mode, the number
        of consecutive queries fed at once (1 per step, the prompt length for
        a prefill).
      klen: number of key positions (static); in decode mode the cache length.
      bidirectional: overrides the module default when not None.
      decode_position: optional scalar int (may be traced), the position of
        the first query in decode mode; the queries sit at `decode_position +
        arange(qlen)`. Only the bucket rows of those queries are computed, so
        a decode step costs O(klen), not O(klen^2).

    Returns:
      [1, heads, qlen, klen] bias.
    """
    if bidirectional is None:
      bidirectional = self.bidirectional
    memory_position = jnp.arange(klen, dtype=jnp.int32)[None, :]
    context_position = jnp.arange(qlen, dtype=jnp.int32)[:, None]
    if decode_position is not None:
      context_position = context_position + jnp.asarray(decode_position,
                                                        jnp.int32)
    relative_position = memory_position - context_position  # [q, k]
    rp_bucket = relative_position_bucket(
        relative_position,
        bidirectional=bidirectional,
        num_buckets=self.num_buckets,
        max_distance=self.max_distance)
    rel_embedding = self.param(
        'rel_embedding',
        nn.with_logical_partitioning(self.embedding_init,
                                     ('heads', 'relpos_buckets')),
        (self.num_heads, self.num_buckets), self.param_dtype)
    # A gather of a tiny table; [heads, q, k].
    values = jnp.take(rel_embedding, rp_bucket, axis=1)
    return values[None].astype(self.dtype)


# ---------------------------------------------------------------------------
# Projections
# ---------------------------------------------------------------------------


class DenseGeneral(nn.Module):
  """Bias-free projection whose kernel keeps its multi-dimensional shape.

  flax's `nn.DenseGeneral` initialises a flattened 2-D kernel and reshapes
  it, so a logically partitioned initializer would get a rank-2 value for
  rank-3 axis names and fail under a mesh; here the kernel is created at its
  true shape with fan-in/fan-out axes given to the initializer.

  Attributes:
    features: output feature shape, e.g. (heads, head_dim).
    axis: input axes contracted with the kernel, e.g. -1 or (-2, -1).
    kernel_axes: logical axis names of the kernel (input axes then features).
    init_scale: variance scale of the fan-in truncated-normal init.
    dtype: compute dtype.
    param_dtype: kernel dtype.
  """
  features: Union[int, Tuple[int, ...]]
  kernel_axes: Tuple[str, ...]
  axis: Union[int, Tuple[int, ...]] = -1
  init_scale: float = 1.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    """Contracts `axis` of `inputs` with the kernel; features go last."""
    features = ((self.features,) if isinstance(self.features, int) else
                tuple(self.features))
    axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
    axis = tuple(a % inputs.ndim for a in axis)
    n_in = len(axis)
    kernel_shape = tuple(inputs.shape[a] for a in axis) + features
    if len(self.kernel_axes) != len(kernel_shape):
      raise ValueError(f'kernel_axes {self.kernel_axes} do not match kernel '
                       f'shape {kernel_shape}')
    init = nn.initializers.variance_scaling(
        self.init_scale, 'fan_in', 'truncated_normal',
        in_axis=tuple(range(n_in)),
        out_axis=tuple(range(n_in, len(kernel_shape))))
    kernel = self.param('kernel',
                        nn.with_logical_partitioning(init, self.kernel_axes),
                        kernel_shape, self.param_dtype)
    contract = (axis, tuple(range(n_in)))
    return lax.dot_general(inputs.astype(self.dtype),
                           kernel.astype(self.dtype), (contract, ((), ())))


# ---------------------------------------------------------------------------
# Multi-head attention
# ---------------------------------------------------------------------------


def _attention_weights(logits: Array,
                       mask: Optional[Array],
                       bias: Optional[Array],
                       dropout_rng: Optional[Array],
                       dropout_rate: float,
                       deterministic: bool,
                       dtype: Dtype) -> Array:
  """Float32 softmax of biased, masked logits [..., q_len, k_len]; dropout."""
  logits = logits.astype(jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    # A finite minimum (not -inf) keeps fully masked rows NaN-free: they
    # become a uniform average, and such rows are padding that is ignored.
    logits = jnp.where(mask.astype(jnp.bool_), logits,
                       jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1)
  if not deterministic and dropout_rate > 0.0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
    weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
  return weights.astype(dtype)


def dot_product_attention(query: Array,
                          key: Array,
                          value: Array,
                          mask: Optional[Array] = None,
                          bias: Optional[Array] = None,
                          dropout_rng: Optional[Array] = None,
                          dropout_rate: float = 0.0,
                          deterministic: bool = True,
                          dtype: Dtype = jnp.float32) -> Array:
  """Scaled dot-product attention with a float32 softmax.

  Args:
    query: [batch, q_len, heads, head_dim].
    key: [batch, k_len, heads, head_dim].
    value: [batch, k_len, heads, head_dim].
    mask: optional boolean / 0-1 mask broadcastable to
      [batch, heads, q_len, k_len]; false entries are excluded.
    bias: optional additive bias broadcastable to [batch, heads, q_len, k_len].
    dropout_rng: rng for attention-weight dropout.
    dropout_rate: attention-weight dropout probability.
    deterministic: disables dropout when true.
    dtype: dtype of the value aggregation and of the result.

  Returns:
    [batch, q_len, heads, head_dim] attended values.
  """
  depth = query.shape[-1]
  # A Python float scale is weakly typed, so bf16 queries stay bf16.
  query = query * (depth ** -0.5)
  logits = jnp.einsum('bqhd,bkhd->bhqk', query, key,
                      preferred_element_type=jnp.float32)
  weights = _attention_weights(logits, mask, bias, dropout_rng, dropout_rate,
                               deterministic, dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', weights, value.astype(dtype))


def _block_rows(x: Array, start: int, stop: int, keys: int) -> Array:
  """Rows [start, stop) and key columns [0, keys) of a [..., q, k] mask or bias.

  A row axis of size 1 (a mask or bias that is the same for every query) is kept as is.
  """
  rows = slice(None) if x.shape[-2] == 1 else slice(start, stop)
  return x[..., rows, :keys]


def _sum_to(x: Array, shape: Tuple[int, ...]) -> Array:
  """Sums `x` over the axes where `shape` has 1 (the transpose of a broadcast), keeping them."""
  if x.ndim != len(shape):
    raise ValueError(f'cannot reduce {x.shape} to {shape}')
  if shape[0] == 1 and x.shape[0] != 1:
    # A dot with ones, not a reduce: XLA:CPU runs a reduction over the outermost axis of a
    # large block several times slower than this matrix-vector product.
    x = lax.dot_general(jnp.ones((x.shape[0],), x.dtype), x,
                        (((0,), (0,)), ((), ())))[None]
  axes = tuple(i for i in range(1, x.ndim) if shape[i] == 1 and x.shape[i] != 1)
  return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def _query_blocks(length: int, block_size: int) -> list:
  return [(s, min(s + block_size, length)) for s in range(0, length, block_size)]


def _causal_block_logits(qh: Array, kh: Array, mask: Optional[Array], bias: Optional[Array],
                         start: int, stop: int) -> Array:
  """Float32 logits of queries [start, stop) over keys [0, stop): biased, masked, causal."""
  logits = jnp.einsum('bhqd,bhkd->bhqk', qh[:, :, start:stop], kh[:, :, :stop],
                      preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + _block_rows(bias, start, stop, stop).astype(jnp.float32)
  # Causality inside the block (keys after the query); the mask's own entries elsewhere.
  keep = (np.arange(stop)[None, :] <= np.arange(start, stop)[:, None])
  if mask is not None:
    keep = jnp.logical_and(keep, _block_rows(mask, start, stop, stop).astype(jnp.bool_))
  return jnp.where(keep, logits, jnp.finfo(jnp.float32).min)


def _heads_first(x: Array) -> Array:
  return jnp.swapaxes(x, 1, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _causal_blockwise(query, key, value, mask, bias, block_size, dtype):
  return _causal_blockwise_fwd(query, key, value, mask, bias, block_size, dtype)[0]


def _causal_blockwise_fwd(query, key, value, mask, bias, block_size, dtype):
  depth = query.shape[-1]
  qh = _heads_first(query * (depth ** -0.5))
  kh, vh = _heads_first(key), _heads_first(value)
  outs, lses = [], []
  for start, stop in _query_blocks(query.shape[1], block_size):
    logits = _causal_block_logits(qh, kh, mask, bias, start, stop)
    top = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.exp(logits - top)
    total = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum('bhqk,bhkd->bhqd', p.astype(dtype), vh[:, :, :stop].astype(dtype),
                     preferred_element_type=jnp.float32) / total
    outs.append(out)
    lses.append(top + jnp.log(total))
  out = jnp.concatenate(outs, axis=2)  # float32 [b, h, q, d]
  lse = jnp.concatenate(lses, axis=2)
  result = _heads_first(out.astype(dtype))
  return result, (qh, kh, vh, mask, bias, out, lse)


def _causal_blockwise_bwd(block_size, dtype, residuals, grad):
  qh, kh, vh, mask, bias, out, lse = residuals
  depth = qh.shape[-1]
  length = qh.shape[2]
  d_out = _heads_first(grad).astype(jnp.float32)
  delta = jnp.sum(d_out * out, axis=-1, keepdims=True)  # [b, h, q, 1]
  dq_blocks, bias_rows = [], []
  dk = jnp.zeros(kh.shape, jnp.float32)
  dv = jnp.zeros(vh.shape, jnp.float32)
  for start, stop in _query_blocks(length, block_size):
    logits = _causal_block_logits(qh, kh, mask, bias, start, stop)
    p = jnp.exp(logits - lse[:, :, start:stop])
    d_o = d_out[:, :, start:stop]
    dv = dv.at[:, :, :stop].add(jnp.einsum('bhqk,bhqd->bhkd', p.astype(dtype), d_o.astype(dtype),
                                           preferred_element_type=jnp.float32))
    dp = jnp.einsum('bhqd,bhkd->bhqk', d_o.astype(dtype), vh[:, :, :stop].astype(dtype),
                    preferred_element_type=jnp.float32)
    ds = p * (dp - delta[:, :, start:stop])
    dq_blocks.append(jnp.einsum('bhqk,bhkd->bhqd', ds.astype(dtype), kh[:, :, :stop],
                                preferred_element_type=jnp.float32))
    dk = dk.at[:, :, :stop].add(jnp.einsum('bhqk,bhqd->bhkd', ds.astype(dtype),
                                           qh[:, :, start:stop],
                                           preferred_element_type=jnp.float32))
    if bias is not None:
      block_rows = ds.shape[2] if bias.shape[2] != 1 else 1
      rows = _sum_to(ds, bias.shape[:2] + (block_rows, stop))
      bias_rows.append(jnp.pad(rows, [(0, 0)] * 3 + [(0, bias.shape[-1] - stop)]))
  dq = jnp.concatenate(dq_blocks, axis=2) * (depth ** -0.5)
  d_bias = None
  if bias is not None:
    d_bias = (jnp.concatenate(bias_rows, axis=2) if bias.shape[-2] != 1 else
              functools.reduce(jnp.add, bias_rows))
    d_bias = d_bias.astype(bias.dtype)
  d_query = _heads_first(dq).astype(qh.dtype)
  return (d_query, _heads_first(dk).astype(kh.dtype), _heads_first(dv).astype(vh.dtype), None,
          d_bias)


_causal_blockwise.defvjp(_causal_blockwise_fwd, _causal_blockwise_bwd)


def causal_blockwise_attention(query: Array,
                               key: Array,
                               value: Array,
                               mask: Optional[Array] = None,
                               bias: Optional[Array] = None,
                               block_size: int = 128,
                               dtype: Dtype = jnp.float32) -> Array:
  """Causal `dot_product_attention` computed one block of queries at a time.

  Queries [i * block_size, (i + 1) * block_size) attend to keys [0, (i + 1) * block_size)
  only: the blocks above the diagonal, half of a [q, k] softmax, are never computed, and no
  [batch, heads, length, length] tensor is materialised, in the forward pass or the backward
  (the largest is one block's [batch, heads, block_size, length]; only the bias's gradient has
  the bias's own shape). The backward pass is written out (FlashAttention's: it recomputes each
  block's probabilities from the saved log-sum-exp of its rows) and saves nothing of size
  length^2.
  On XLA:CPU this is several times faster than the dense form, whose time goes to writing and
  re-reading [batch, heads, length, length] float32 tensors (benchmarks/README.md, "Stage
  training step").

  Equals `dot_product_attention` with `mask` AND a causal mask (a key after its query is never
  attended, whatever `mask` says), up to float rounding, for every row with at least one key
  left; a row with none is a uniform average over its causal prefix rather than over all keys
  (such rows are padding, whose output nothing reads). No attention dropout.

  Args:
    query: [batch, length, heads, head_dim].
    key: [batch, length, heads, head_dim] (self-attention: as many keys as queries).
    value: [batch, length, heads, head_dim].
    mask: optional boolean / 0-1 mask broadcastable to [batch, heads, length, length], its
      last two axes (length, length) or (1, length).
    bias: optional additive bias broadcastable to [batch, heads, length, length], its last two
      axes (length, length) or (1, length); its gradient has its own shape.
    block_size: queries per block (the last block may be shorter).
    dtype: dtype of the value aggregation and of the result.

  Returns:
    [batch, length, heads, head_dim] attended values.
  """
  length = query.shape[1]
  if key.shape[1] != length or value.shape[1] != length:
    raise ValueError(f'causal_blockwise_attention is self-attention: {length} queries, '
                     f'{key.shape[1]} keys, {value.shape[1]} values')
  if block_size < 1:
    raise ValueError(f'block_size must be positive, got {block_size}')
  for name, x in (('mask', mask), ('bias', bias)):
    if x is not None and (x.ndim != 4 or x.shape[-1] != length or
                          x.shape[-2] not in (1, length)):
      raise ValueError(f'{name} must be [batch or 1, heads or 1, {length} or 1, {length}], '
                       f'got {x.shape}')
  return _causal_blockwise(query, key, value, mask, bias, int(block_size), jnp.dtype(dtype))


def cached_attention(query: Array,
                     key_cache: Array,
                     value_cache: Array,
                     mask: Optional[Array] = None,
                     bias: Optional[Array] = None,
                     dropout_rng: Optional[Array] = None,
                     dropout_rate: float = 0.0,
                     deterministic: bool = True,
                     dtype: Dtype = jnp.float32) -> Array:
  """`dot_product_attention` of queries over keys/values in the KV-cache layout.

  The cache is head-major, [batch, heads, length, head_dim], or packed,
  [batch * heads, length, head_dim] (batch-major rows). Packed, both dots are
  plain batched matrix products of the cache buffers themselves: XLA:CPU then
  neither copies nor transposes the cache (it would re-layout a 4-D cache, or
  duplicate its in-place update, on every decode step).

  Args:
    query: [batch, q_len, heads, head_dim].
    key_cache: [batch, heads, k_len, head_dim] or [batch * heads, k_len,
      head_dim].
    value_cache: same shape as `key_cache`.
    mask, bias, dropout_rng, dropout_rate, deterministic, dtype: as in
      `dot_product_attention` (mask and bias broadcastable to
      [batch, heads, q_len, k_len]).

  Returns:
    [batch, q_len, heads, head_dim] attended values.
  """
  batch, q_len, heads, depth = query.shape
  packed = key_cache.ndim == 3
  query = jnp.swapaxes(query * (depth ** -0.5), 1, 2)  # [b, h, q, d]
  k_len = key_cache.shape[-2]
  if packed:
    logits = jnp.einsum('rqd,rkd->rqk', query.reshape(-1, q_len, depth),
                        key_cache, preferred_element_type=jnp.float32)
    logits = logits.reshape(batch, heads, q_len, k_len)
  else:
    logits = jnp.einsum('bhqd,bhkd->bhqk', query, key_cache,
                        preferred_element_type=jnp.float32)
  weights = _attention_weights(logits, mask, bias, dropout_rng, dropout_rate,
                               deterministic, dtype)
  if packed:
    out = jnp.einsum('rqk,rkd->rqd', weights.reshape(-1, q_len, k_len),
                     value_cache.astype(dtype))
    out = out.reshape(batch, heads, q_len, depth)
  else:
    out = jnp.einsum('bhqk,bhkd->bhqd', weights, value_cache.astype(dtype))
  return jnp.swapaxes(out, 1, 2)


def _blockwise_as_dense(query, key, value, mask=None, bias=None, dropout_rng=None,
                           dropout_rate=0.0, deterministic=True, dtype=jnp.float32,
                           block_size=128):
  """`causal_blockwise_attention` behind `dot_product_attention`'s signature (no dropout)."""
  del dropout_rng
  if dropout_rate > 0.0 and not deterministic:
    raise ValueError('causal_blockwise_attention has no attention dropout')
  return causal_blockwise_attention(query, key, value, mask=mask, bias=bias,
                                    block_size=block_size, dtype=dtype)


class MultiHeadAttention(nn.Module):
  """T5-style multi-head attention (no biases) with an optional KV cache.

  Attributes:
    num_heads: number of attention heads.
    head_dim: per-head query/key/value dimension.
    dropout_rate: attention-weight dropout probability ('dropout' rng).
    dtype: compute dtype.
    param_dtype: parameter dtype.
    init_scale: variance scale of the fan-in init of the projection kernels.
    causal_block_size: when positive, the caller promises causal self-attention (its mask
      excludes every key after its query) and full-sequence calls (not `decode`, no attention
      dropout in use) run `causal_blockwise_attention` with blocks of this many queries
      instead of one dense [q, k] softmax; 0 keeps the dense form.
  """
  num_heads: int
  head_dim: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  init_scale: float = 1.0
  causal_block_size: int = 0

  @nn.compact
  def __call__(self,
               inputs_q: Array,
               inputs_kv: Array,
               mask: Optional[Array] = None,
               bias: Optional[Array] = None,
               *,
               deterministic: bool = True,
               decode: bool = False) -> Array:
    """Attends from `inputs_q` to `inputs_kv`.

    Args:
      inputs_q: [batch, q_len, embed] queries.
      inputs_kv: [batch, k_len, embed] keys/values source.
      mask: optional boolean or 0/1 mask broadcastable to
        [batch, heads, q_len, k_len]. In decode mode k_len is the cache
        length.
      bias: optional additive bias broadcastable to
        [batch, heads, q_len, k_len] (e.g. relative position biases).
      deterministic: disables dropout when true.
      decode: use the autoregressive KV cache ('cache' collection). When the
        cache does not exist yet (e.g. under `init(..., decode=True)` with a
        full-length input) it is created with the head-major shape
        [batch, heads, length, head_dim] and a normal full attention is run;
        a caller may replace it by its packed form
        [batch * heads, length, head_dim] (see `cached_attention`), the
        faster one on XLA:CPU.
        Once it exists, inputs are [batch, n, embed] with n >= 1 consecutive
        positions (n = 1 per decode step; n > 1 prefills a prompt in one
        pass): their keys/values are written at `cache_index ..
        cache_index + n - 1`, query i attends to cache positions <=
        `cache_index + i` (causal within the chunk), and `cache_index` grows
        by n. The caller keeps `cache_index + n` within the cache length:
        `lax.dynamic_update_slice` would clamp the write, not fail.

    Returns:
      [batch, q_len, embed] output.
    """
    projection = functools.partial(
        DenseGeneral,
        features=(self.num_heads, self.head_dim),
        axis=-1,
        kernel_axes=('embed', 'heads', 'kv'),
        init_scale=self.init_scale,
        dtype=self.dtype,
        param_dtype=self.param_dtype)
    query = projection(name='query')(inputs_q)
    key = projection(name='key')(inputs_kv)
    value = projection(name='value')(inputs_kv)
    axes = ('batch', 'length', 'heads', 'kv')
    query = nn.with_logical_constraint(query, axes)
    key = nn.with_logical_constraint(key, axes)
    value = nn.with_logical_constraint(value, axes)

    dropout_rng = None
    if not deterministic and self.dropout_rate > 0.0:
      dropout_rng = self.make_rng('dropout')
    attention = dot_product_attention
    dropout_on = not deterministic and self.dropout_rate > 0.0
    if (self.causal_block_size > 0 and not decode and not dropout_on and
        query.shape[1] == key.shape[1]):
      attention = functools.partial(_blockwise_as_dense, block_size=self.causal_block_size)
    if decode:
      # Checked before the variables are declared: on the first (init) call
      # they do not exist yet and a full-length pass sizes the cache.
      is_initialized = self.has_variable('cache', 'cached_key')
      batch, length = key.shape[:2]
      cache_shape = (batch, self.num_heads, length, self.head_dim)
      cached_key = self.variable('cache', 'cached_key', jnp.zeros, cache_shape,
                                 key.dtype)
      cached_value = self.variable('cache', 'cached_value', jnp.zeros,
                                   cache_shape, value.dtype)
      cache_index = self.variable('cache', 'cache_index',
                                  lambda: jnp.array(0, dtype=jnp.int32))
      if is_initialized:
        key, value, step_mask = self._update_cache(
            query, key, value, cached_key, cached_value, cache_index)
        mask = step_mask if mask is None else jnp.logical_and(
            mask.astype(jnp.bool_), step_mask)
        attention = cached_attention
    x = attention(
        query, key, value, mask=mask, bias=bias, dropout_rng=dropout_rng,
        dropout_rate=self.dropout_rate, deterministic=deterministic,
        dtype=self.dtype)
    x = nn.with_logical_constraint(x, axes)
    out = DenseGeneral(
        features=inputs_q.shape[-1],
        axis=(-2, -1),
        kernel_axes=('heads', 'kv', 'embed'),
        init_scale=self.init_scale,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name='out')(x)
    return nn.with_logical_constraint(out, ('batch', 'length', 'embed'))

  def _update_cache(self, query: Array, key: Array, value: Array,
                    cached_key: Any, cached_value: Any, cache_index: Any
                    ) -> Tuple[Array, Array, Array]:
    """Writes n new keys/values into the cache.

    Args:
      query, key, value: [batch, n, heads, head_dim] projections of the n
        consecutive positions fed.
      cached_key, cached_value: the cache variables, head-major
        [batch, heads, length, head_dim] or packed
        [batch * heads, length, head_dim] (see `cached_attention`).
      cache_index: the variable holding the position of the first of them.

    Returns:
      (keys, values) of the updated cache, in its layout, and the causal
      mask [1, 1, n, length] of the n queries over the cache slots.
    """
    stored = cached_key.value
    packed = stored.ndim == 3
    batch, length, num_heads, head_dim = query.shape
    max_length = stored.shape[-2]
    expected = ((batch * num_heads, max_length, head_dim) if packed else
                (batch, num_heads, max_length, head_dim))
    if stored.shape != expected or not 1 <= length <= max_length:
      cache_batch = stored.shape[0] // num_heads if packed else stored.shape[0]
      raise ValueError(
          f'Autoregressive cache shape error: the cache {stored.shape} takes '
          f'queries of shape ({cache_batch}, n, {num_heads}, {head_dim}) '
          f'with 1 <= n <= {max_length}, got {query.shape}.')

    def to_cache(x):  # [batch, n, heads, head_dim] -> the cache layout
      x = jnp.swapaxes(x, 1, 2).astype(stored.dtype)
      return x.reshape(batch * num_heads, length, head_dim) if packed else x

    cur_index = cache_index.value
    zero = jnp.int32(0)
    indices = ((zero, cur_index, zero) if packed else
               (zero, zero, cur_index, zero))
    key = lax.dynamic_update_slice(stored, to_cache(key), indices)
    value = lax.dynamic_update_slice(cached_value.value, to_cache(value),
                                     indices)
    if not packed:
      axes = ('batch', 'heads', 'length', 'kv')
      key = nn.with_logical_constraint(key, axes)
      value = nn.with_logical_constraint(value, axes)
    cached_key.value = key
    cached_value.value = value
    cache_index.value = cur_index + length
    # Query i sits at position cur_index + i: it sees the cache up to itself;
    # later slots hold zeros (or stale data) or the chunk's future.
    query_position = cur_index + jnp.arange(length, dtype=jnp.int32)
    step_mask = (jnp.arange(max_length, dtype=jnp.int32)[None, :] <=
                 query_position[:, None])[None, None, :, :]
    return key, value, step_mask
