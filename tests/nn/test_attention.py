"""Tests for relative position buckets, masks and multi-head attention."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from musiclm_jax.nn import attention


# (relative_position, expected bucket) for num_buckets=32, max_distance=128,
# worked out by hand from the T5 formula. Causal: n = max(-rel, 0), 16 exact
# buckets, then 16 + floor(log(n / 16) / log(128 / 16) * 16) capped at 31.
CAUSAL_CASES = [
    (0, 0),
    (-1, 1),        # one step back: exact bucket 1
    (3, 0),         # future keys all share bucket 0
    (-15, 15),      # last exact bucket
    (-16, 16),      # log(1) = 0
    (-32, 21),      # 16 * log(2) / log(8) = 5.33
    (-64, 26),      # 16 * log(4) / log(8) = 10.67
    (-100, 30),     # 16 * log(6.25) / log(8) = 14.10
    (-127, 31),     # 16 * log(7.94) / log(8) = 15.94
    (-1000, 31),    # saturated
]
# Bidirectional: 16 buckets per sign, 8 exact, then 8 + floor(log(n / 8) /
# log(128 / 8) * 8) capped at 15; keys after the query add 16.
BIDIRECTIONAL_CASES = [
    (0, 0),
    (-5, 5),
    (5, 16 + 5),
    (1, 16 + 1),
    (-7, 7),
    (8, 16 + 8),     # log(1) = 0
    (-20, 10),       # 8 * log(2.5) / log(16) = 2.64
    (-50, 13),       # 8 * log(6.25) / log(16) = 5.29
    (200, 16 + 15),  # saturated
    (-200, 15),
]


@pytest.mark.parametrize('rel,expected', CAUSAL_CASES)
def test_bucket_causal_hand_values(rel, expected):
  got = attention.relative_position_bucket(
      np.array([rel]), bidirectional=False, num_buckets=32, max_distance=128)
  assert int(got[0]) == expected


@pytest.mark.parametrize('rel,expected', BIDIRECTIONAL_CASES)
def test_bucket_bidirectional_hand_values(rel, expected):
  got = attention.relative_position_bucket(
      np.array([rel]), bidirectional=True, num_buckets=32, max_distance=128)
  assert int(got[0]) == expected


def _reference_bucket(rel, bidirectional, num_buckets, max_distance):
  """Scalar float64 re-implementation of the T5 bucket formula."""
  n = -rel
  ret = 0
  if bidirectional:
    num_buckets //= 2
    if n < 0:
      ret += num_buckets
    n = abs(n)
  else:
    n = max(n, 0)
  max_exact = num_buckets // 2
  if n < max_exact:
    return ret + n
  large = max_exact + int(
      math.log(n / max_exact) / math.log(max_distance / max_exact) *
      (num_buckets - max_exact))
  return ret + min(large, num_buckets - 1)


@pytest.mark.parametrize('bidirectional', [False, True])
@pytest.mark.parametrize('num_buckets,max_distance', [(32, 128), (8, 16)])
def test_bucket_matches_reference(bidirectional, num_buckets, max_distance):
  rel = np.arange(-300, 301)
  got = np.asarray(
      attention.relative_position_bucket(rel, bidirectional, num_buckets,
                                         max_distance))
  want = np.array([
      _reference_bucket(int(r), bidirectional, num_buckets, max_distance)
      for r in rel
  ])
  np.testing.assert_array_equal(got, want)
  assert got.min() == 0 and got.max() == num_buckets - 1


def test_bucket_traced_equals_static():
  rel = np.arange(-200, 200)
  static = attention.relative_position_bucket(rel, False, 32, 128)
  traced = jax.jit(lambda r: attention.relative_position_bucket(
      r, False, 32, 128))(rel)
  np.testing.assert_array_equal(np.asarray(static), np.asarray(traced))


def test_relative_bias_decode_row_matches_full_matrix():
  module = attention.RelativePositionBiases(num_heads=3, num_buckets=8,
                                            max_distance=16)
  variables = module.init(jax.random.key(0), 12, 12)
  full = module.apply(variables, 12, 12)
  assert full.shape == (1, 3, 12, 12)
  row_fn = jax.jit(lambda v, i: module.apply(v, 1, 12, decode_position=i))
  for i in range(12):
    row = row_fn(variables, jnp.int32(i))
    assert row.shape == (1, 3, 1, 12)
    np.testing.assert_allclose(np.asarray(row[0, :, 0]),
                               np.asarray(full[0, :, i]), rtol=0, atol=0)
  # The table has one value per (head, bucket) and bias depends only on
  # the relative position.
  np.testing.assert_array_equal(np.asarray(full[0, :, 5, 3]),
                                np.asarray(full[0, :, 9, 7]))


def test_causal_mask_values():
  mask = attention.make_causal_mask(4)
  assert mask.shape == (1, 1, 4, 4)
  np.testing.assert_array_equal(np.asarray(mask[0, 0]),
                                np.tril(np.ones((4, 4), bool)))
  tokens = jnp.ones((2, 3), jnp.int32)
  assert attention.make_causal_mask(tokens).shape == (2, 1, 3, 3)


def test_padding_segment_and_combined_masks():
  tokens = jnp.array([[5, 6, 0, 0]])
  pad = attention.make_padding_mask(tokens)
  np.testing.assert_array_equal(
      np.asarray(pad[0, 0]), np.array([[1, 1, 0, 0]] * 4, bool))
  seg = attention.make_segment_mask(jnp.array([[1, 1, 2, 2]]))
  combined = attention.combine_masks(attention.make_causal_mask(tokens), seg)
  want = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]],
                  bool)
  np.testing.assert_array_equal(np.asarray(combined[0, 0]), want)
  assert attention.combine_masks(None, None) is None


@pytest.fixture(scope='module')
def mha():
  module = attention.MultiHeadAttention(num_heads=2, head_dim=4)
  x = jax.random.normal(jax.random.key(0), (2, 6, 8))
  variables = module.init(jax.random.key(1), x, x)
  apply = jax.jit(lambda v, q, kv, m: module.apply(v, q, kv, m))
  return module, variables, apply, x


def test_attention_param_axes(mha):
  module, variables, _, x = mha
  specs = jax.tree_util.tree_map(
      lambda b: b.names, variables['params'],
      is_leaf=lambda b: hasattr(b, 'names'))
  assert specs['query']['kernel'] == ('embed', 'heads', 'kv')
  assert specs['key']['kernel'] == ('embed', 'heads', 'kv')
  assert specs['value']['kernel'] == ('embed', 'heads', 'kv')
  assert specs['out']['kernel'] == ('heads', 'kv', 'embed')
  assert set(variables['params']) == {'query', 'key', 'value', 'out'}


def test_causal_mask_blocks_future(mha):
  _, variables, apply, x = mha
  mask = attention.make_causal_mask(6)
  out = apply(variables, x, x, mask)
  # Changing the last position must not affect earlier outputs.
  x2 = x.at[:, -1].set(100.0)
  out2 = apply(variables, x2, x2, mask)
  np.testing.assert_allclose(out[:, :-1], out2[:, :-1], atol=1e-6)
  assert np.abs(np.asarray(out[:, -1] - out2[:, -1])).max() > 1e-3
  # Without the mask the change leaks everywhere.
  full = jnp.ones((1, 1, 6, 6), bool)
  out3 = apply(variables, x, x, full)
  out4 = apply(variables, x2, x2, full)
  assert np.abs(np.asarray(out3[:, 0] - out4[:, 0])).max() > 1e-3


def test_padding_mask_ignores_padded_keys(mha):
  _, variables, apply, x = mha
  tokens = jnp.array([[3, 4, 5, 6, 0, 0], [7, 8, 0, 0, 0, 0]])
  mask = attention.make_padding_mask(tokens)
  out = apply(variables, x, x, mask)
  # Scramble the padded positions' key/value inputs.
  noise = jax.random.normal(jax.random.key(5), x.shape) * 10
  x_noisy = jnp.where((tokens == 0)[..., None], noise, x)
  out_noisy = apply(variables, x, x_noisy, mask)
  np.testing.assert_allclose(out, out_noisy, atol=1e-5)
  # The same perturbation matters without the padding mask.
  no_mask = jnp.ones((1, 1, 6, 6), bool)
  delta = apply(variables, x, x, no_mask) - apply(variables, x, x_noisy,
                                                   no_mask)
  assert np.abs(np.asarray(delta)).max() > 1e-2


@pytest.mark.parametrize('packed', [False, True])
def test_attention_decode_matches_full(packed):
  module = attention.MultiHeadAttention(num_heads=2, head_dim=4)
  relpos = attention.RelativePositionBiases(num_heads=2, num_buckets=8,
                                            max_distance=16)
  length = 6
  x = jax.random.normal(jax.random.key(0), (2, length, 8))
  variables = module.init(jax.random.key(1), x, x)
  rel_vars = relpos.init(jax.random.key(2), length, length)
  bias = relpos.apply(rel_vars, length, length)
  full = module.apply(variables, x, x, attention.make_causal_mask(length),
                      bias)
  cache = module.init(jax.random.key(1), x, x, decode=True)['cache']
  # Head-major: [batch, heads, length, head_dim].
  assert cache['cached_key'].shape == (2, 2, length, 4)
  if packed:  # [batch * heads, length, head_dim]
    cache = dict(cache, cached_key=cache['cached_key'].reshape(4, length, 4),
                 cached_value=cache['cached_value'].reshape(4, length, 4))

  @jax.jit
  def step(cache, xi):
    b = relpos.apply(rel_vars, 1, length,
                     decode_position=cache['cache_index'])
    out, mut = module.apply({'params': variables['params'], 'cache': cache},
                            xi, xi, None, b, decode=True, mutable=['cache'])
    return out, mut['cache']

  outs = []
  for i in range(length):
    out, cache = step(cache, x[:, i:i + 1])
    outs.append(out)
  assert int(cache['cache_index']) == length
  assert cache['cached_key'].shape == ((4, length, 4) if packed else
                                       (2, 2, length, 4))
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5)
  # The cache holds the keys of every position, in its layout.
  keys = jnp.einsum('ble,ehd->bhld', x,
                    variables['params']['key']['kernel'].unbox())
  np.testing.assert_allclose(
      cache['cached_key'], keys.reshape(cache['cached_key'].shape), atol=1e-5)
  with pytest.raises(ValueError, match='cache shape'):
    step(cache, x[:1, :1])


def test_relative_bias_decode_rows_of_a_chunk_match_full_matrix():
  # A prefill of several positions computes the bias rows of all of them.
  module = attention.RelativePositionBiases(num_heads=3, num_buckets=8,
                                            max_distance=16)
  variables = module.init(jax.random.key(0), 12, 12)
  full = module.apply(variables, 12, 12)
  rows = module.apply(variables, 4, 12, decode_position=jnp.int32(3))
  assert rows.shape == (1, 3, 4, 12)
  np.testing.assert_array_equal(np.asarray(rows), np.asarray(full[:, :, 3:7]))


def _blockwise_case(seed, batch=2, length=37, heads=3, depth=8):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.standard_normal((batch, length, heads, depth)), jnp.float32)
             for _ in range(3))
  bias = jnp.asarray(rng.standard_normal((1, heads, length, length)), jnp.float32)
  # Left padding in row 0 (its first 4 keys are padding) and two packed segments in row 1.
  tokens = np.ones((batch, length), np.int32)
  tokens[0, :4] = 0
  segments = np.ones((batch, length), np.int32)
  if batch > 1:
    segments[1, length // 2:] = 2
  segments[0] = np.where(tokens[0] == 0, 0, 1)
  mask = attention.combine_masks(attention.make_causal_mask(jnp.asarray(tokens)),
                                 attention.make_padding_mask(jnp.asarray(segments)),
                                 attention.make_segment_mask(jnp.asarray(segments)))
  # Rows with no key left (the padding queries of row 0) differ by design; weigh them 0.
  weight = np.ones((batch, length, 1, 1), np.float32)
  weight[0, :4] = 0.0
  return q, k, v, mask, bias, jnp.asarray(weight)


@pytest.mark.parametrize('block_size', [8, 37])
def test_causal_blockwise_attention_matches_dense_values_and_gradients(block_size):
  q, k, v, mask, bias, weight = _blockwise_case(0)
  probe = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32) * weight

  def loss(fn):
    return lambda q, k, v, bias: jnp.sum(fn(q, k, v, mask=mask, bias=bias) * probe)

  dense = attention.dot_product_attention
  blockwise = functools.partial(attention.causal_blockwise_attention, block_size=block_size)
  np.testing.assert_allclose(jax.jit(blockwise)(q, k, v, mask=mask, bias=bias) * weight,
                             dense(q, k, v, mask=mask, bias=bias) * weight,
                             rtol=1e-5, atol=1e-5)
  want = jax.jit(jax.grad(loss(dense), argnums=(0, 1, 2, 3)))(q, k, v, bias)
  got = jax.jit(jax.grad(loss(blockwise), argnums=(0, 1, 2, 3)))(q, k, v, bias)
  for name, a, b in zip(('query', 'key', 'value', 'bias'), want, got):
    assert b.shape == a.shape, name
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5, err_msg=name)


def test_causal_blockwise_attention_is_causal_whatever_the_mask_says():
  q, k, v, _, bias, _ = _blockwise_case(2, batch=1, length=12)
  causal = attention.make_causal_mask(12)
  want = attention.dot_product_attention(q, k, v, mask=causal, bias=bias)
  np.testing.assert_allclose(
      attention.causal_blockwise_attention(q, k, v, bias=bias, block_size=5), want,
      rtol=1e-5, atol=1e-6)


def test_causal_blockwise_attention_key_only_mask_and_per_batch_bias_gradients():
  q, k, v, _, _, _ = _blockwise_case(3, batch=2, length=20)
  keys = attention.make_padding_mask(jnp.asarray([[1] * 20, [0] * 3 + [1] * 17]))[:, :, :1]
  bias = jnp.asarray(np.random.default_rng(4).standard_normal((2, 1, 1, 20)), jnp.float32)
  full_mask = jnp.logical_and(keys, attention.make_causal_mask(20))
  weight = np.ones((2, 20, 1, 1), np.float32)
  weight[1, :3] = 0.0

  def loss(fn, **kw):
    return lambda q, bias: jnp.sum(jnp.sin(fn(q, k, v, bias=bias, **kw)) * weight)

  want = jax.jit(jax.grad(loss(attention.dot_product_attention, mask=full_mask),
                         argnums=(0, 1)))(q, bias)
  got = jax.jit(jax.grad(loss(attention.causal_blockwise_attention, mask=keys, block_size=6),
                         argnums=(0, 1)))(q, bias)
  for a, b in zip(want, got):
    assert b.shape == a.shape
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_causal_blockwise_attention_rejects_cross_attention_and_bad_shapes():
  q, k, v, _, _, _ = _blockwise_case(5, length=10)
  with pytest.raises(ValueError, match='self-attention'):
    attention.causal_blockwise_attention(q, k[:, :5], v[:, :5])
  with pytest.raises(ValueError, match='bias must be'):
    attention.causal_blockwise_attention(q, k, v, bias=jnp.zeros((1, 3, 10, 9)))
  with pytest.raises(ValueError, match='block_size'):
    attention.causal_blockwise_attention(q, k, v, block_size=0)
