"""Tests for the semantic-token k-means: k-means++, Lloyd steps, sharded and mini-batch fits."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from musiclm_jax.semantic import kmeans as km
from musiclm_jax.train.partitioning import make_mesh

K = 16


@functools.lru_cache(maxsize=None)
def _blobs(num_points=2000, dim=8, num_blobs=K, spread=20.0, std=1.0, seed=0):
  """Gaussian blobs around uniform random centres; returns (points, labels, centres)."""
  rs = np.random.RandomState(seed)
  centres = rs.uniform(-spread, spread, size=(num_blobs, dim)).astype(np.float32)
  labels = rs.randint(num_blobs, size=num_points)
  points = centres[labels] + std * rs.randn(num_points, dim).astype(np.float32)
  return points.astype(np.float32), labels, centres


@functools.lru_cache(maxsize=None)
def _mesh8():
  return make_mesh((8, 1, 1))


@functools.lru_cache(maxsize=None)
def _full_lloyd_inertia() -> float:
  points, _, _ = _blobs()
  return km.fit_kmeans(points, K, rng=jax.random.key(0)).inertia


def _np_lloyd(points, centroids, weights):
  d2 = ((points[:, None, :] - centroids[None, :, :])**2).sum(-1)
  ids = d2.argmin(-1)
  new = centroids.copy()
  counts = np.zeros(len(centroids))
  for j in range(len(centroids)):
    mask = ids == j
    counts[j] = weights[mask].sum()
    if counts[j] > 0:
      new[j] = (weights[mask, None] * points[mask]).sum(0) / counts[j]
  return ids, new, (weights * d2.min(-1)).sum(), counts


def test_fit_matches_sklearn_inertia():
  from sklearn.cluster import KMeans  # pylint: disable=g-import-not-at-top
  points, _, _ = _blobs()
  result = km.fit_kmeans(points, K, rng=jax.random.key(0))
  sk = KMeans(n_clusters=K, n_init=4, random_state=0).fit(points)
  ratio = result.inertia / sk.inertia_
  assert 0.97 <= ratio <= 1.05, (result.inertia, sk.inertia_)
  assert result.centroids.shape == (K, 8) and result.centroids.dtype == np.float32
  assert result.counts.sum() == pytest.approx(len(points))
  assert 1 <= result.num_iters_run <= 50
  # The reported inertia is that of the returned centroids.
  assert float(km.inertia(points, result.centroids)) == pytest.approx(result.inertia, rel=1e-5)
  # assign agrees with a brute-force numpy argmin.
  ids = np.asarray(km.assign(points, result.centroids, block_size=300))
  ref = ((points[:, None] - result.centroids[None])**2).sum(-1).argmin(-1)
  assert ids.dtype == np.int32 and np.array_equal(ids, ref)


@pytest.mark.parametrize('num_local_trials', [1, None])
def test_kmeans_plus_plus_one_point_per_separated_blob(num_local_trials):
  points, labels, _ = _blobs(num_points=400, num_blobs=8, spread=100.0, std=0.1, seed=1)
  centroids = np.asarray(km.kmeans_plus_plus_init(
      jax.random.key(3), points, 8, num_local_trials=num_local_trials))
  # Every centroid is (bit for bit) a data point ...
  matches = (centroids[:, None, :] == points[None, :, :]).all(-1)
  assert matches.any(axis=1).all()
  # ... and each blob got exactly one.
  picked = labels[matches.argmax(axis=1)]
  assert sorted(picked.tolist()) == list(range(8))


def test_init_never_picks_zero_weight_points():
  points, _, _ = _blobs(num_points=64, num_blobs=4, seed=2)
  weights = np.zeros(64, np.float32)
  weights[:8] = 1.0
  for fn in (km.kmeans_plus_plus_init, km.random_init):
    centroids = np.asarray(fn(jax.random.key(0), points, 8, weights=weights))
    matches = (centroids[:, None, :] == points[None, :, :]).all(-1)
    assert np.array_equal(np.sort(matches.argmax(axis=1)), np.arange(8))


def test_lloyd_step_matches_numpy_and_keeps_empty_cluster():
  rs = np.random.RandomState(0)
  points = rs.randn(13, 3).astype(np.float32)
  centroids = np.concatenate([points[:3], [[50.0, 50.0, 50.0]]]).astype(np.float32)
  weights = rs.uniform(0.5, 2.0, size=13).astype(np.float32)
  ids, ref_new, ref_inertia, ref_counts = _np_lloyd(points, centroids, weights)
  assert ref_counts[3] == 0  # the far centroid is empty

  np.testing.assert_array_equal(np.asarray(km.assign(points, centroids)), ids)
  for block_size in (None, 4):  # one block; 4 strided blocks with padding
    new, total, counts = km.lloyd_step(points, centroids, weights, block_size=block_size)
    np.testing.assert_allclose(new, ref_new, atol=1e-5)
    np.testing.assert_array_equal(new[3], centroids[3])
    np.testing.assert_allclose(total, ref_inertia, rtol=1e-5)
    np.testing.assert_allclose(counts, ref_counts, rtol=1e-6)
  # Unweighted.
  _, ref_new1, _, ref_counts1 = _np_lloyd(points, centroids, np.ones(13, np.float32))
  new, _, counts = km.lloyd_step(points, centroids)
  np.testing.assert_allclose(new, ref_new1, atol=1e-5)
  np.testing.assert_array_equal(counts, ref_counts1)


def test_lloyd_step_under_jit_with_sharded_points():
  rs = np.random.RandomState(1)
  points = rs.randn(64, 3).astype(np.float32)
  centroids = points[:5]
  mesh = _mesh8()
  x = jax.device_put(points, NamedSharding(mesh, P('data')))
  ref = km.lloyd_step(points, centroids)
  # GSPMD: plain jit with the points split over 'data' (blocked, so strided blocks).
  gspmd = jax.jit(functools.partial(km.lloyd_step, block_size=16))(x, centroids)
  # shard_map with an explicit psum over 'data'.
  smap = jax.jit(jax.shard_map(functools.partial(km.lloyd_step, axis_name='data'), mesh=mesh,
                               in_specs=(P('data'), P()), out_specs=(P(), P(), P())))(
                                   x, centroids)
  for out in (gspmd, smap):
    for a, b in zip(out, ref):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('num_points', [2000, 1997])
def test_sharded_fit_equals_single_device(num_points):
  points = _blobs()[0][:num_points]
  kwargs = dict(rng=jax.random.key(7), num_iters=20, tol=0.0, block_size=64)
  single = km.fit_kmeans(points, K, **kwargs)
  sharded = km.fit_kmeans(points, K, mesh=_mesh8(), data_axis='data', **kwargs)
  np.testing.assert_allclose(sharded.centroids, single.centroids, atol=1e-5)
  np.testing.assert_allclose(sharded.counts, single.counts)
  assert sharded.counts.sum() == num_points  # padding rows do not count
  assert sharded.inertia == pytest.approx(single.inertia, rel=1e-5)


def test_zero_weight_points_are_ignored():
  points = _blobs()[0][:1000]
  outliers = np.full((24, 8), 1e3, np.float32)
  padded = np.concatenate([points, outliers])
  weights = np.concatenate([np.ones(1000, np.float32), np.zeros(24, np.float32)])
  kwargs = dict(rng=jax.random.key(1), num_iters=20, tol=0.0)
  ref = km.fit_kmeans(points, K, **kwargs)
  got = km.fit_kmeans(padded, K, weights=weights, mesh=_mesh8(), **kwargs)
  np.testing.assert_allclose(got.centroids, ref.centroids, atol=1e-5)
  assert got.counts.sum() == 1000
  assert got.inertia == pytest.approx(ref.inertia, rel=1e-5)


def test_random_init_fit():
  points, _, _ = _blobs()
  seeds = km.random_init(jax.random.key(0), points, K)
  assert len(np.unique(np.asarray(seeds), axis=0)) == K  # distinct data points
  result = km.fit_kmeans(points, K, rng=jax.random.key(0), init='random')
  # Lloyd improves on its seeds; random seeding ends in a worse local optimum than k-means++
  # on these blobs (scikit-learn's init='random' does too).
  assert _full_lloyd_inertia() <= result.inertia < float(km.inertia(points, seeds))


def test_minibatch_close_to_full_lloyd():
  points, _, _ = _blobs()
  full = _full_lloyd_inertia()
  res = km.fit_kmeans_minibatch(points, K, rng=jax.random.key(0), batch_size=256, num_epochs=5)
  assert res.num_iters_run == 5 * 8
  assert res.inertia == pytest.approx(float(km.inertia(points, res.centroids)), rel=1e-5)
  assert res.inertia <= 1.10 * full, (res.inertia, full)
  assert res.counts.sum() == pytest.approx(len(points))
  # A list of batches of another size (split into batch_size rows, padded).
  batches = [points[i:i + 300] for i in range(0, len(points), 300)]
  res = km.fit_kmeans_minibatch(batches, K, rng=jax.random.key(0), batch_size=256,
                                num_epochs=5)
  assert float(km.inertia(points, res.centroids)) <= 1.10 * full
  assert res.counts.sum() == pytest.approx(len(points))  # summed over the last epoch


def test_errors():
  points, _, _ = _blobs()
  with pytest.raises(ValueError, match='at least num_clusters=16 points'):
    km.fit_kmeans(points[:10], K, rng=jax.random.key(0))
  with pytest.raises(ValueError, match='at least num_clusters=16 points'):
    km.kmeans_plus_plus_init(jax.random.key(0), points[:10], K)
  weights = np.zeros(100, np.float32)
  weights[:5] = 1.0
  with pytest.raises(ValueError, match='positive weight'):
    km.fit_kmeans(points[:100], K, rng=jax.random.key(0), weights=weights)
  bad = points[:100].copy()
  bad[3, 1] = np.nan
  bad[7, :2] = np.inf
  with pytest.raises(ValueError, match='3 non-finite values .* in 2 of 100 rows'):
    km.fit_kmeans(bad, K, rng=jax.random.key(0))
  with pytest.raises(ValueError, match='non-finite'):
    km.assign(jnp.asarray(bad), points[:4])
  with pytest.raises(ValueError, match='non-finite'):
    km.fit_kmeans_minibatch([points[:100], bad], K, rng=jax.random.key(0), num_epochs=1)
  with pytest.raises(ValueError, match='dimension mismatch'):
    km.assign(points, points[:4, :5])
  with pytest.raises(ValueError, match='dimension mismatch'):
    km.lloyd_step(points, points[:4, :5])
  with pytest.raises(ValueError, match='dimension mismatch'):
    km.inertia(points, np.zeros((4, 9), np.float32))
  with pytest.raises(ValueError, match='dimension mismatch'):
    km.fit_kmeans_minibatch([points[:100], points[:100, :4]], 4, rng=jax.random.key(0),
                            num_epochs=1, init_size=16)
  with pytest.raises(ValueError, match='weights must be'):
    km.lloyd_step(points, points[:4], np.ones(3, np.float32))
  with pytest.raises(ValueError, match='init must be'):
    km.fit_kmeans(points, K, rng=jax.random.key(0), init='kmeans||')
  with pytest.raises(ValueError, match='iterator'):
    km.fit_kmeans_minibatch(iter([points]), K, rng=jax.random.key(0), num_epochs=2)
  with pytest.raises(ValueError, match='data_axis'):
    km.fit_kmeans(points, K, rng=jax.random.key(0), mesh=_mesh8(), data_axis='batch')


def test_minibatch_sharded_equals_single_device():
  points = _blobs()[0][:997]
  kwargs = dict(rng=jax.random.key(2), batch_size=250, num_epochs=2, block_size=16)
  single = km.fit_kmeans_minibatch(points, K, **kwargs)
  sharded = km.fit_kmeans_minibatch(points, K, mesh=_mesh8(), **kwargs)
  np.testing.assert_allclose(sharded.centroids, single.centroids, atol=1e-5)
  np.testing.assert_allclose(sharded.counts, single.counts)
  assert sharded.counts.sum() == 997 and sharded.num_iters_run == single.num_iters_run == 8
