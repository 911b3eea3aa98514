"""Tests for the decoder-only Transformer: KV cache, packing, dtypes, sharding."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from musiclm_jax.nn import transformer

BASE = transformer.TransformerConfig(
    vocab_size=32,
    embed_dim=16,
    num_layers=2,
    num_heads=2,
    head_dim=8,
    mlp_dim=32,
    relative_num_buckets=8,
    relative_max_distance=16,
)
LENGTH = 12
ALLOWED_PARAM_AXES = {'embed', 'mlp', 'heads', 'kv', 'vocab', 'relpos_buckets',
                      'layers', 'norm'}


def _tokens(seed=0, batch=2, length=LENGTH):
  return jax.random.randint(jax.random.key(seed), (batch, length), 1,
                            BASE.vocab_size)


def _init(cfg, tokens):
  return transformer.Decoder(cfg).init(jax.random.key(0), tokens)


def _forward_fn(cfg):
  model = transformer.Decoder(cfg)
  return jax.jit(lambda v, t, s: model.apply(v, t, segment_ids=s))


def _decode_all(cfg, params, tokens, segment_ids, packed=False, grow_at=None):
  """Feeds `tokens` one position at a time through the KV cache.

  With `grow_at`, the cache starts with that many positions and is grown to
  the full length once they are filled.
  """
  model = transformer.Decoder(cfg)
  batch, length = tokens.shape
  cache = transformer.init_decoder_cache(model, batch, grow_at or length,
                                         packed=packed)

  @jax.jit
  def step(cache, tok, seg):
    logits, mutated = model.apply({'params': params, 'cache': cache}, tok,
                                  segment_ids=seg, decode=True,
                                  mutable=['cache'])
    return logits, mutated['cache']

  outs = []
  for i in range(length):
    if i == grow_at:
      cache = transformer.resize_decoder_cache(cache, length)
    logits, cache = step(cache, tokens[:, i:i + 1], segment_ids[:, i:i + 1])
    outs.append(logits)
  return jnp.concatenate(outs, axis=1), cache


@pytest.mark.parametrize('scan_layers,packed,grow_at', [
    (False, False, None), (True, False, None), (False, True, 5),
    (True, True, 7)])
def test_kv_cache_decoding_matches_full_forward(scan_layers, packed, grow_at):
  cfg = dataclasses.replace(BASE, scan_layers=scan_layers,
                            activation='gated_gelu' if scan_layers else 'gelu')
  tokens = _tokens()
  # Row 0 starts with a BOS of id 0 (a real token, marked by its segment id);
  # row 1 is left-padded (as batched prompts are): its first 3 positions have
  # segment 0 and must stay invisible to the real positions.
  tokens = tokens.at[0, 0].set(0).at[1, :3].set(0)
  segment_ids = jnp.ones_like(tokens).at[1, :3].set(0)
  variables = _init(cfg, tokens)
  full = _forward_fn(cfg)(variables, tokens, segment_ids)
  incremental, cache = _decode_all(cfg, variables['params'], tokens,
                                   segment_ids, packed, grow_at)
  real = np.asarray(segment_ids, bool)
  np.testing.assert_allclose(
      np.asarray(incremental)[real], np.asarray(full)[real], atol=1e-5,
      rtol=1e-5)
  assert int(cache['cache_index']) == LENGTH
  assert transformer.decoder_cache_length(cache) == LENGTH
  # [batch, heads, length, head_dim], or [batch * heads, length, head_dim].
  shape = ((2 * cfg.num_heads,) if packed else (2, cfg.num_heads)) + (
      LENGTH, cfg.head_dim)
  if scan_layers:
    # The per-layer cache is stacked along a leading layer axis.
    assert cache['layers']['self_attention']['cached_key'].shape == (
        cfg.num_layers,) + shape
    np.testing.assert_array_equal(
        cache['layers']['self_attention']['cache_index'], [LENGTH] * 2)
  else:
    assert cache['layers_0']['self_attention']['cached_key'].shape == shape
  if packed:
    cache = transformer.unpack_decoder_cache(cache, cfg.num_heads)
  # The cache from `init(decode=True)` has the same structure and shapes.
  model = transformer.Decoder(cfg)
  init_cache = jax.eval_shape(
      lambda: model.init(jax.random.key(0), tokens, decode=True))['cache']
  assert (jax.tree_util.tree_map(np.shape, nn.unbox(init_cache)) ==
          jax.tree_util.tree_map(np.shape, cache))


def test_unroll_layers_computes_the_same_function():
  cfg = dataclasses.replace(BASE, scan_layers=True)
  model = transformer.Decoder(cfg)
  tokens = _tokens()
  params = nn.unbox(_init(cfg, tokens)['params'])
  unrolled, unrolled_params = transformer.unroll_layers(model, params)
  assert not unrolled.config.scan_layers and 'layers' not in unrolled_params
  np.testing.assert_array_equal(
      unrolled_params['layers_1']['mlp']['wi']['kernel'],
      params['layers']['mlp']['wi']['kernel'][1])
  np.testing.assert_allclose(
      unrolled.apply({'params': unrolled_params}, tokens),
      model.apply({'params': params}, tokens), atol=1e-5, rtol=1e-5)
  # An unscanned model is returned as is.
  assert transformer.unroll_layers(unrolled, unrolled_params) == (
      unrolled, unrolled_params)


def test_decoder_cache_pack_and_resize():
  cfg = dataclasses.replace(BASE, scan_layers=True)
  model = transformer.Decoder(cfg)
  cache = jax.tree_util.tree_map(
      lambda x: jax.random.normal(jax.random.key(0), x.shape).astype(x.dtype),
      transformer.init_decoder_cache(model, 3, 5))
  packed = transformer.pack_decoder_cache(cache)
  assert packed['layers']['self_attention']['cached_value'].shape == (
      cfg.num_layers, 3 * cfg.num_heads, 5, cfg.head_dim)
  # Rows are batch-major: row b * heads + h.
  np.testing.assert_array_equal(
      packed['layers']['self_attention']['cached_value'][:, 1 * 2 + 1],
      cache['layers']['self_attention']['cached_value'][:, 1, 1])
  back = transformer.unpack_decoder_cache(packed, cfg.num_heads)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, cache)
  grown = transformer.resize_decoder_cache(packed, 9)
  assert transformer.decoder_cache_length(grown) == 9
  keys = grown['layers']['self_attention']['cached_key']
  assert keys.shape == (cfg.num_layers, 3 * cfg.num_heads, 9, cfg.head_dim)
  np.testing.assert_array_equal(
      keys[:, :, :5], packed['layers']['self_attention']['cached_key'])
  assert not np.asarray(keys[:, :, 5:]).any()
  assert grown['key_mask'].shape == (3, 9)
  assert not np.asarray(grown['key_mask'][:, 5:]).any()
  np.testing.assert_array_equal(grown['cache_index'], cache['cache_index'])
  assert transformer.resize_decoder_cache(packed, 5) is packed
  with pytest.raises(ValueError, match='shrink'):
    transformer.resize_decoder_cache(packed, 4)


@pytest.mark.parametrize('scan_layers,packed', [(False, False), (True, True)])
def test_prefill_chunks_match_full_forward(scan_layers, packed):
  # Feeding several positions per decode call (a prompt prefill) writes the
  # cache in one pass, causal within the chunk, with the right bias rows.
  cfg = dataclasses.replace(BASE, scan_layers=scan_layers)
  tokens = _tokens(4)
  tokens = tokens.at[0, 0].set(0).at[1, :3].set(0)
  segment_ids = jnp.ones_like(tokens).at[1, :3].set(0)
  variables = _init(cfg, tokens)
  full = _forward_fn(cfg)(variables, tokens, segment_ids)
  model = transformer.Decoder(cfg)
  cache = transformer.init_decoder_cache(model, 2, LENGTH, packed=packed)
  step = jax.jit(lambda c, t, s: model.apply(
      {'params': variables['params'], 'cache': c}, t, segment_ids=s,
      decode=True, mutable=['cache']))
  outs = []
  for start, stop in [(0, 5), (5, 10), (10, 11), (11, 12)]:
    logits, mutated = step(cache, tokens[:, start:stop],
                           segment_ids[:, start:stop])
    cache = mutated['cache']
    outs.append(logits)
  real = np.asarray(segment_ids, bool)
  np.testing.assert_allclose(
      np.asarray(jnp.concatenate(outs, axis=1))[real], np.asarray(full)[real],
      atol=1e-5, rtol=1e-5)
  assert int(cache['cache_index']) == LENGTH
  with pytest.raises(ValueError, match='cache length'):
    model.apply({'params': variables['params'], 'cache': cache},
                jnp.zeros((2, LENGTH + 1), jnp.int32), decode=True,
                mutable=['cache'])


def test_bos_token_zero_is_masked_without_segment_ids():
  # Without segment ids, id 0 is padding: a key of id 0 is invisible, so its
  # embedding cannot influence later positions.
  tokens = _tokens(3, batch=1)
  variables = _init(BASE, tokens)
  forward = _forward_fn(BASE)
  ones = jnp.ones_like(tokens)
  a = forward(variables, tokens.at[0, 2].set(0), None)
  b = forward(variables, tokens.at[0, 2].set(0), ones)
  assert np.abs(np.asarray(a[0, 3:] - b[0, 3:])).max() > 1e-4


def test_packed_segments_equal_separate_sequences():
  cfg = BASE
  first = _tokens(1, batch=1, length=5)
  second = _tokens(2, batch=1, length=7)
  packed = jnp.concatenate([first, second], axis=1)
  segment_ids = jnp.array([[1] * 5 + [2] * 7])
  variables = _init(cfg, packed)
  forward = _forward_fn(cfg)
  packed_logits = forward(variables, packed, segment_ids)
  pad = lambda t: jnp.pad(t, ((0, 0), (0, LENGTH - t.shape[1])))
  alone = forward(variables, jnp.concatenate([pad(first), pad(second)]), None)
  np.testing.assert_allclose(packed_logits[0, :5], alone[0, :5], atol=1e-5)
  np.testing.assert_allclose(packed_logits[0, 5:], alone[1, :7], atol=1e-5)
  # Without segment ids the second sequence would see the first one.
  unpacked = forward(variables, packed, None)
  assert np.abs(np.asarray(unpacked[0, 5:] - alone[1, :7])).max() > 1e-3


def test_bfloat16_compute_keeps_float32_params():
  cfg = dataclasses.replace(BASE, dtype=jnp.bfloat16)
  tokens = _tokens()
  variables = _init(cfg, tokens)
  dtypes = {leaf.dtype for leaf in
            jax.tree_util.tree_leaves(nn.unbox(variables['params']))}
  assert dtypes == {jnp.dtype(jnp.float32)}
  logits = _forward_fn(cfg)(variables, tokens, None)
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(logits)))
  # Same parameters in float32 compute: close but not bit-identical.
  reference = _forward_fn(BASE)(variables, tokens, None)
  diff = np.abs(np.asarray(logits - reference))
  assert 0 < diff.max() < 0.1 * np.abs(np.asarray(reference)).max()
  # The KV cache is kept in the compute dtype.
  cache = transformer.init_decoder_cache(transformer.Decoder(cfg), 2, LENGTH)
  assert cache['layers_0']['self_attention']['cached_key'].dtype == (
      jnp.bfloat16)


@pytest.mark.parametrize('overrides', [
    {},
    {'scan_layers': True},
    {'activation': 'gated_gelu', 'logits_via_embedding': True},
])
def test_every_param_has_logical_partition_spec(overrides):
  cfg = dataclasses.replace(BASE, **overrides)
  model = transformer.Decoder(cfg)
  abstract = jax.eval_shape(model.init, jax.random.key(0),
                            jnp.zeros((2, LENGTH), jnp.int32))
  specs = nn.get_partition_spec(abstract['params'])
  shapes = nn.unbox(abstract['params'])
  spec_leaves = jax.tree_util.tree_leaves(
      specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
  shape_leaves = jax.tree_util.tree_leaves(shapes)
  assert len(spec_leaves) == len(shape_leaves) > 0
  for spec, leaf in zip(spec_leaves, shape_leaves):
    assert isinstance(spec, PartitionSpec)
    # Boxed parameters give one name per dimension; unboxed ones would
    # silently produce an empty (replicated) spec.
    assert len(spec) == leaf.ndim >= 1
    assert set(spec) <= ALLOWED_PARAM_AXES, spec
  if cfg.scan_layers:
    layer_specs = jax.tree_util.tree_leaves(
        specs['layers'], is_leaf=lambda x: isinstance(x, PartitionSpec))
    assert all(s[0] == 'layers' for s in layer_specs)
    kernel = shapes['layers']['self_attention']['query']['kernel']
    assert kernel.shape == (cfg.num_layers, cfg.embed_dim, cfg.num_heads,
                            cfg.head_dim)
  if cfg.logits_via_embedding:
    assert 'logits_dense' not in specs
  else:
    assert specs['logits_dense']['kernel'] == PartitionSpec('embed', 'vocab')
  assert specs['token_embedder']['embedding'] == PartitionSpec('vocab',
                                                               'embed')
  assert specs['relpos_bias']['rel_embedding'] == PartitionSpec(
      'heads', 'relpos_buckets')


def test_count_params_matches_hand_count():
  variables = jax.eval_shape(transformer.Decoder(BASE).init,
                             jax.random.key(0),
                             jnp.zeros((1, LENGTH), jnp.int32))
  e, v, h, d, m = 16, 32, 2, 8, 32
  per_layer = 2 * (2 * e) + 4 * e * h * d + 2 * e * m
  want = v * e + h * 8 + 2 * per_layer + 2 * e + e * v
  assert transformer.count_params(variables['params']) == want


@pytest.mark.parametrize('scan_layers,policy', [(False, 'full'),
                                                (True, 'dots_saveable')])
def test_remat_gives_equal_logits_and_grads(scan_layers, policy):
  plain_cfg = dataclasses.replace(BASE, scan_layers=scan_layers)
  remat_cfg = dataclasses.replace(plain_cfg, remat_policy=policy)
  tokens = _tokens()
  variables = _init(plain_cfg, tokens)
  # Remat does not change the parameter tree.
  remat_vars = _init(remat_cfg, tokens)
  assert (jax.tree_util.tree_structure(remat_vars) ==
          jax.tree_util.tree_structure(variables))

  def loss_fn(cfg):
    model = transformer.Decoder(cfg)

    def loss(params):
      logits = model.apply({'params': params}, tokens)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 1]), logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True))

  (_, plain_logits), plain_grads = loss_fn(plain_cfg)(variables['params'])
  (_, remat_logits), remat_grads = loss_fn(remat_cfg)(variables['params'])
  np.testing.assert_allclose(remat_logits, plain_logits, atol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(nn.unbox(plain_grads)),
                  jax.tree_util.tree_leaves(nn.unbox(remat_grads))):
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize('scan_layers,policy', [(False, 'none'),
                                                (True, 'dots_with_no_batch_dims_saveable')])
def test_blockwise_attention_gives_the_dense_logits_and_grads(scan_layers, policy):
  dense_cfg = dataclasses.replace(BASE, scan_layers=scan_layers, remat_policy=policy,
                                  attention_block_size=0)
  block_cfg = dataclasses.replace(dense_cfg, attention_block_size=5)  # blocks 5, 5, 2
  tokens = _tokens()
  segment_ids = jnp.asarray([[1] * 7 + [2] * 5, [0] * 3 + [1] * 9])  # packed; left padding
  weights = (segment_ids != 0)[..., None]
  variables = _init(dense_cfg, tokens)

  def loss_fn(cfg):
    model = transformer.Decoder(cfg)

    def loss(params):
      logits = model.apply({'params': params}, tokens, segment_ids=segment_ids)
      return jnp.sum(jax.nn.log_softmax(logits)[..., 1:4] * weights), logits * weights

    return jax.jit(jax.value_and_grad(loss, has_aux=True))

  (_, dense_logits), dense_grads = loss_fn(dense_cfg)(variables['params'])
  (_, block_logits), block_grads = loss_fn(block_cfg)(variables['params'])
  np.testing.assert_allclose(block_logits, dense_logits, atol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(nn.unbox(dense_grads)),
                  jax.tree_util.tree_leaves(nn.unbox(block_grads))):
    np.testing.assert_allclose(b, a, atol=1e-5)


def test_dropout_needs_rng_and_changes_output():
  cfg = dataclasses.replace(BASE, dropout_rate=0.5, num_layers=1)
  model = transformer.Decoder(cfg)
  tokens = _tokens()
  variables = _init(cfg, tokens)
  apply = jax.jit(lambda v, key: model.apply(
      v, tokens, deterministic=False, rngs={'dropout': key}))
  a = apply(variables, jax.random.key(1))
  b = apply(variables, jax.random.key(2))
  assert np.abs(np.asarray(a - b)).max() > 1e-3
  np.testing.assert_array_equal(a, apply(variables, jax.random.key(1)))
  with pytest.raises(Exception):
    model.apply(variables, tokens, deterministic=False)


def test_config_validation():
  with pytest.raises(ValueError):
    dataclasses.replace(BASE, activation='tanh')
  with pytest.raises(ValueError):
    dataclasses.replace(BASE, remat_policy='sometimes')
  with pytest.raises(ValueError, match='attention_block_size'):
    dataclasses.replace(BASE, attention_block_size=-1)
  assert hash(BASE) == hash(dataclasses.replace(BASE))


# Logical axis rules in the style of the trainer's (data, fsdp, model) mesh.
MESH_RULES = (('batch', ('data', 'fsdp')), ('length', None), ('vocab', 'model'),
              ('mlp', 'model'), ('heads', 'model'), ('kv', None),
              ('embed', 'fsdp'), ('norm', None), ('relpos_buckets', None),
              ('layers', None))


def test_sharded_init_forward_and_decode_match_unsharded():
  if jax.device_count() < 8:
    pytest.skip('needs 8 (fake) devices')
  cfg = dataclasses.replace(BASE, scan_layers=True, remat_policy='full')
  model = transformer.Decoder(cfg)
  tokens = _tokens(batch=4)
  reference_vars = model.init(jax.random.key(0), tokens)
  reference = model.apply(reference_vars, tokens)
  mesh = jax.make_mesh((2, 2, 2), ('data', 'fsdp', 'model'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with jax.set_mesh(mesh), nn.logical_axis_rules(MESH_RULES):
    abstract = jax.eval_shape(model.init, jax.random.key(0), tokens)
    shardings = nn.logical_to_mesh_sharding(
        nn.get_partition_spec(abstract), mesh, MESH_RULES)
    variables = jax.jit(model.init, out_shardings=shardings)(
        jax.random.key(0), tokens)
    kernel = variables['params']['layers']['mlp']['wi']['kernel']
    assert kernel.value.sharding.spec == PartitionSpec(None, 'fsdp', 'model')
    logits = jax.jit(model.apply)(variables, tokens)
    cache = transformer.init_decoder_cache(model, 4, LENGTH)
    first, _ = jax.jit(lambda v, c, t: model.apply(
        {'params': v['params'], 'cache': c}, t, decode=True,
        mutable=['cache']))(variables, cache, tokens[:, :1])
  np.testing.assert_allclose(logits, reference, atol=1e-5)
  np.testing.assert_allclose(first[:, 0], reference[:, 0], atol=1e-5)
