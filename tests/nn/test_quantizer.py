"""Tests for the residual vector quantizer (k-means init, EMA, restarts, dropout)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from musiclm_jax.nn import quantizer as rvq

CENTERS = jnp.array([[8.0, 0.0], [0.0, 8.0], [-8.0, 0.0], [0.0, -8.0]])


def _mixture(key, centers=CENTERS, batch=8, length=16, std=0.1):
  k1, k2 = jax.random.split(key)
  idx = jax.random.randint(k1, (batch, length), 0, centers.shape[0])
  noise = std * jax.random.normal(k2, (batch, length, centers.shape[1]))
  return centers[idx] + noise


def _make(model):
  """Returns (init, jitted train step, jitted eval) for a quantizer."""

  def init(x):
    return model.init({'params': jax.random.key(0)}, x, train=False)

  @jax.jit
  def train(variables, x, key):
    out, mutated = model.apply(variables, x, train=True,
                               rngs={'quantizer': key},
                               mutable=['quantizer_state'])
    return out, {**variables, **mutated}

  @jax.jit
  def evaluate(variables, x):
    return model.apply(variables, x, train=False)

  return init, train, evaluate


def _codebook(variables, level=0):
  return np.asarray(
      nn.unbox(variables)['quantizer_state']['codebook'][level])


def _mse(a, b):
  return float(jnp.mean(jnp.square(a - b)))


def test_state_collection_and_partitioning():
  model = rvq.ResidualVectorQuantizer(num_levels=3, codebook_size=8, dim=4)
  variables = jax.eval_shape(
      lambda: model.init({'params': jax.random.key(0)}, jnp.zeros((2, 5, 4)),
                         train=False))
  assert set(variables) == {'quantizer_state'}  # nothing trainable
  specs = nn.get_partition_spec(variables)['quantizer_state']
  assert specs['codebook'] == P('codebook_levels', 'codebook', 'embed')
  assert specs['ema_embed_sum'] == P('codebook_levels', 'codebook',
                                     'embed')
  assert specs['ema_cluster_size'] == P('codebook_levels', 'codebook')
  state = nn.unbox(variables)['quantizer_state']
  assert state['codebook'].shape == (3, 8, 4)
  assert state['initialized'].dtype == jnp.bool_
  assert state['initialized'].shape == (3,)
  assert specs['initialized'] == P('codebook_levels')


def test_kmeans_init_finds_mixture_centers():
  model = rvq.ResidualVectorQuantizer(num_levels=2, codebook_size=16, dim=2)
  init, train, _ = _make(model)
  x = _mixture(jax.random.key(1))
  variables = init(x)
  before = _codebook(variables)
  distance = lambda cb: np.linalg.norm(
      np.asarray(CENTERS)[:, None] - cb[None], axis=-1).min(axis=1)
  # The random N(0, 1) init is far from the centers at distance 8.
  assert distance(before).min() > 3.0
  out, variables = train(variables, x, jax.random.key(2))
  assert np.asarray(
      nn.unbox(variables)['quantizer_state']['initialized']).all()
  np.testing.assert_array_less(distance(_codebook(variables)), 0.3)
  # Quantizing with the fresh codebooks reproduces the data closely.
  assert _mse(out['quantized'], x) < 0.01
  assert out['codes'].shape == (8, 16, 2)
  assert out['codes'].dtype == jnp.int32


def test_ema_tracks_a_moving_mixture():
  model = rvq.ResidualVectorQuantizer(
      num_levels=1, codebook_size=8, dim=2, kmeans_init=False,
      dead_code_threshold=0.0, ema_decay=0.9)
  init, train, evaluate = _make(model)
  key = jax.random.key(3)
  data = lambda i, centers: _mixture(jax.random.fold_in(key, i), centers)
  variables = init(data(0, CENTERS))
  err_init = _mse(evaluate(variables, data(0, CENTERS))['quantized'],
                  data(0, CENTERS))
  for i in range(3):
    _, variables = train(variables, data(i, CENTERS), jax.random.key(i))
  err_fit = _mse(evaluate(variables, data(99, CENTERS))['quantized'],
                 data(99, CENTERS))
  assert err_fit < 0.05 * err_init

  # Shift the mixture: the codewords must follow by EMA, not jump.
  moved = CENTERS + jnp.array([1.5, -1.0])
  probe = data(100, moved)
  err_after_shift = _mse(evaluate(variables, probe)['quantized'], probe)
  errors = []
  for i in range(40):
    _, variables = train(variables, data(200 + i, moved), jax.random.key(i))
    errors.append(_mse(evaluate(variables, probe)['quantized'], probe))
  # One step with decay 0.9 moves each codeword only ~10% of the way.
  assert errors[0] > 0.6 * err_after_shift
  assert errors[-1] < 0.05 * err_after_shift
  assert errors[-1] < errors[10] < errors[0]


@pytest.mark.parametrize('threshold', [0.0, 1.0])
def test_dead_code_restart_revives_unused_codes(threshold):
  far_init = lambda key, shape, dtype: (
      100.0 + jax.random.normal(key, shape, dtype))
  model = rvq.ResidualVectorQuantizer(
      num_levels=1, codebook_size=8, dim=2, kmeans_init=False,
      dead_code_threshold=threshold, codebook_init=far_init)
  init, train, _ = _make(model)
  variables = init(_mixture(jax.random.key(0)))
  usages = []
  for i in range(6):
    out, variables = train(variables, _mixture(jax.random.key(10 + i)),
                           jax.random.key(i))
    usages.append(float(out['usage'][0]))
  # All data first goes to the single nearest far-away code.
  assert usages[0] == pytest.approx(1 / 8)
  if threshold > 0:
    assert min(usages[2:]) >= 0.75
    assert np.abs(_codebook(variables)).max() < 12.0
  else:
    # Without restarts the far-away codes are never used.
    assert max(usages) == pytest.approx(1 / 8)


def test_quantizer_dropout_uses_fewer_levels():
  levels = 4
  model = rvq.ResidualVectorQuantizer(num_levels=levels, codebook_size=8,
                                      dim=4, quantizer_dropout=True)
  init, train, evaluate = _make(model)
  x = jax.random.normal(jax.random.key(0), (8, 6, 4))
  variables = init(x)
  first, variables = train(variables, x, jax.random.key(1))
  # The k-means batch initialises every level.
  np.testing.assert_array_equal(first['num_active_levels'], levels)
  decode = jax.jit(lambda v, c: model.apply(v, c, method=model.decode))
  active_counts, all_codes = [], []
  for i in range(4):
    out, _ = train(variables, x, jax.random.key(100 + i))
    all_codes.append(out['codes'])
    n_active = np.asarray(out['num_active_levels'])
    active_counts.append(n_active)
    assert n_active.min() >= 1 and n_active.max() <= levels
    codes = np.asarray(out['codes'])
    used = np.arange(levels)[None, None, :] < n_active[:, None, None]
    np.testing.assert_array_equal(codes >= 0, np.broadcast_to(used,
                                                              codes.shape))
    # Dropped levels contribute nothing: decoding the codes (which skips -1)
    # reproduces the quantized output.
    np.testing.assert_allclose(decode(variables, out['codes']),
                               out['quantized'], atol=1e-5)
  assert np.concatenate(active_counts).min() < levels
  # Deterministic given the rng.
  again, _ = train(variables, x, jax.random.key(100))
  np.testing.assert_array_equal(again['codes'], all_codes[0])
  # Evaluation uses every level.
  assert int(np.asarray(evaluate(variables, x)['codes']).min()) >= 0


def test_reconstruction_improves_with_each_level():
  levels = 4
  model = rvq.ResidualVectorQuantizer(num_levels=levels, codebook_size=16,
                                      dim=8)
  init, train, _ = _make(model)
  x = jax.random.normal(jax.random.key(0), (8, 16, 8))
  variables = init(x)
  _, variables = train(variables, x, jax.random.key(1))
  encode = jax.jit(lambda v, y: model.apply(v, y, method=model.encode))
  decode = jax.jit(lambda v, c: model.apply(v, c, method=model.decode))
  codes = np.asarray(encode(variables, x))
  assert codes.shape == (8, 16, levels) and codes.min() >= 0
  errors = [_mse(x, 0.0)]
  for n in range(1, levels + 1):
    truncated = np.where(np.arange(levels) < n, codes, rvq.UNUSED_CODE)
    errors.append(_mse(decode(variables, jnp.asarray(truncated)), x))
  assert all(a > b for a, b in zip(errors, errors[1:])), errors
  assert errors[-1] < 0.6 * errors[0]
  # Encoding with fewer levels is the prefix of the full encoding.
  partial = np.asarray(model.apply(variables, x, 2, method=model.encode))
  np.testing.assert_array_equal(partial[..., :2], codes[..., :2])
  np.testing.assert_array_equal(partial[..., 2:], rvq.UNUSED_CODE)


def test_straight_through_gradient_and_commitment_loss():
  model = rvq.ResidualVectorQuantizer(num_levels=2, codebook_size=8, dim=4,
                                      commitment_cost=0.25)
  x = jax.random.normal(jax.random.key(0), (2, 3, 4))
  variables = model.init({'params': jax.random.key(1)}, x, train=False)

  apply = jax.jit(lambda y: model.apply(variables, y, train=False))
  grad = jax.jit(jax.grad(lambda y: jnp.sum(apply(y)['quantized'])))(x)
  np.testing.assert_array_equal(grad, np.ones(x.shape, np.float32))

  out = apply(x)
  q = model.apply(variables, out['codes'], method=model.decode)
  np.testing.assert_allclose(out['quantized'], q, atol=1e-5)
  np.testing.assert_allclose(out['commitment_loss'],
                             0.25 * np.mean(np.square(x - q)), rtol=1e-5)
  # The commitment loss pulls x towards q; no gradient reaches the codebook
  # because the codebook is not a parameter.
  loss_grad = jax.jit(jax.grad(lambda y: apply(y)['commitment_loss']))(x)
  np.testing.assert_allclose(loss_grad, 0.25 * 2 * (x - q) / x.size,
                             rtol=1e-4, atol=1e-7)
  # A static n_levels marks the remaining levels unused.
  one = model.apply(variables, x, train=False, n_levels=1)
  np.testing.assert_array_equal(one['codes'][..., 1], rvq.UNUSED_CODE)
  np.testing.assert_array_equal(one['codes'][..., 0], out['codes'][..., 0])
  assert float(one['usage'][1]) == 0.0 and float(one['usage'][0]) > 0.0
  # Training without the mutable state collection is refused.
  with pytest.raises(Exception):
    model.apply(variables, x, train=True, rngs={'quantizer': jax.random.key(0)})


def test_sharded_training_step_matches_unsharded():
  if jax.device_count() < 8:
    pytest.skip('needs 8 (fake) devices')
  rules = (('batch', ('data', 'fsdp')), ('length', None), ('embed', 'fsdp'),
           ('codebook_levels', None), ('codebook', None))
  model = rvq.ResidualVectorQuantizer(num_levels=2, codebook_size=8, dim=4,
                                      quantizer_dropout=True)
  init, train, _ = _make(model)
  x = jax.random.normal(jax.random.key(0), (8, 4, 4))
  variables = init(x)
  reference, reference_vars = train(variables, x, jax.random.key(1))
  mesh = jax.make_mesh((2, 2, 2), ('data', 'fsdp', 'model'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    shardings = nn.logical_to_mesh_sharding(
        nn.get_partition_spec(variables), mesh, rules)
    sharded_vars = jax.device_put(variables, shardings)
    x_sharded = jax.device_put(
        x, jax.sharding.NamedSharding(mesh, P(('data', 'fsdp'))))
    out, new_vars = jax.jit(lambda v, y, k: model.apply(
        v, y, train=True, rngs={'quantizer': k},
        mutable=['quantizer_state']))(sharded_vars, x_sharded,
                                      jax.random.key(1))
  np.testing.assert_array_equal(out['codes'], reference['codes'])
  np.testing.assert_allclose(_codebook(new_vars), _codebook(reference_vars),
                             atol=1e-5)


def test_quantizer_dropout_prob_keeps_every_level_for_the_rest():
  levels = 4
  x = jax.random.normal(jax.random.key(0), (64, 2, 4))
  full = {}
  for prob in (1.0, 0.25):
    model = rvq.ResidualVectorQuantizer(num_levels=levels, codebook_size=8, dim=4,
                                        quantizer_dropout=True, quantizer_dropout_prob=prob)
    init, train, _ = _make(model)
    _, variables = train(init(x), x, jax.random.key(1))  # the k-means batch
    counts = np.concatenate([np.asarray(train(variables, x, jax.random.key(10 + i))[0][
        'num_active_levels']) for i in range(4)])
    assert counts.min() >= 1 and counts.max() == levels and counts.min() < levels
    full[prob] = np.mean(counts == levels)
  # All levels: 1/4 of the examples when every example draws; 3/4 + 1/4 * 1/4 when a quarter do.
  assert 0.15 < full[1.0] < 0.35 and 0.72 < full[0.25] < 0.9, full
