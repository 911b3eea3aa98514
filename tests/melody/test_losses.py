"""Triplet losses: semi-hard mining and batch-all against brute force, and over 8 devices."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from musiclm_jax.melody import losses

semi_hard = jax.jit(losses.semi_hard_triplet_loss, static_argnames=('margin',))
batch_all = jax.jit(losses.batch_all_triplet_loss, static_argnames=('margin',))


def _emb(labels, dim=5, seed=0, spread=1.0):
  """Random embeddings, rows of a label pulled towards a common centre."""
  rng = np.random.default_rng(seed)
  labels = np.asarray(labels)
  centres = {int(l): rng.standard_normal(dim) for l in np.unique(labels)}
  x = np.stack([centres[int(l)] + spread * rng.standard_normal(dim) for l in labels])
  return x.astype(np.float32)


def _distances(x):
  x = np.asarray(x, np.float64)
  x = x / np.linalg.norm(x, axis=-1, keepdims=True)
  return np.maximum(2.0 - 2.0 * x @ x.T, 0.0)


def brute_force_semi_hard(x, labels, margin):
  """FaceNet semi-hard, loop by loop: (loss, number of pairs, pairs that found a semi-hard one)."""
  d = _distances(x)
  labels = np.asarray(labels)
  total, count, found = 0.0, 0, 0
  for a in range(len(x)):
    if labels[a] == 0:
      continue
    negatives = [n for n in range(len(x)) if labels[n] != 0 and labels[n] != labels[a]]
    if not negatives:
      continue
    for p in range(len(x)):
      if p == a or labels[p] != labels[a]:
        continue
      farther = [d[a, n] for n in negatives if d[a, n] > d[a, p]]
      d_an = min(farther) if farther else max(d[a, n] for n in negatives)
      total += max(d[a, p] - d_an + margin, 0.0)
      count += 1
      found += bool(farther)
  return total / max(count, 1), count, found


def brute_force_batch_all(x, labels, margin):
  d = _distances(x)
  labels = np.asarray(labels)
  hinges = []
  for a in range(len(x)):
    for p in range(len(x)):
      for n in range(len(x)):
        if (labels[a] == 0 or p == a or labels[p] != labels[a] or labels[n] == 0 or
            labels[n] == labels[a]):
          continue
        hinges.append(max(d[a, p] - d[a, n] + margin, 0.0))
  hinges = np.asarray(hinges)
  active = hinges > 1e-12
  return hinges.sum() / max(active.sum(), 1), active.mean()


CASES = [
    # pairs (the training layout), a triple, a singleton without positives, two padding rows
    ([1, 1, 2, 2, 3, 3, 4, 4, 4, 5, 0, 0], 0.2, 0.8),
    ([7, 7, 7, 7, 9, 9, 11, 11], 0.5, 0.3),     # tight clusters: few semi-hard negatives
    ([1, 2, 1, 2, 3, 3], 1.0, 2.0),             # loose: many pairs without a semi-hard negative
]


@pytest.mark.parametrize('labels,margin,spread', CASES)
def test_semi_hard_matches_brute_force(labels, margin, spread):
  x = _emb(labels, seed=len(labels), spread=spread)
  loss, stats = jax.device_get(semi_hard(x, np.asarray(labels, np.int32), margin=margin))
  want, count, found = brute_force_semi_hard(x, labels, margin)
  np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
  assert stats['num_pairs'] == count
  np.testing.assert_allclose(stats['semi_hard_fraction'], found / count, rtol=1e-6)


def test_semi_hard_falls_back_to_the_easiest_negative():
  # Anchor 0's positive (row 1) is farther than both negatives: the farthest negative is used.
  x = np.array([[1, 0], [-1, 0.01], [0.9, 0.3], [0.8, -0.6]], np.float32)
  labels = np.array([1, 1, 2, 3], np.int32)
  loss, stats = jax.device_get(semi_hard(x, labels, margin=0.2))
  want, _, found = brute_force_semi_hard(x, labels, 0.2)
  assert found == 0 and stats['semi_hard_fraction'] == 0
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  d = _distances(x)
  np.testing.assert_allclose(want, np.mean([d[0, 1] - d[0, 3] + 0.2, d[1, 0] - d[1, 2] + 0.2]),
                             rtol=1e-6)


@pytest.mark.parametrize('labels,margin,spread', CASES)
def test_batch_all_matches_brute_force(labels, margin, spread):
  x = _emb(labels, seed=3, spread=spread)
  loss, stats = jax.device_get(batch_all(x, np.asarray(labels, np.int32), margin=margin))
  want, active = brute_force_batch_all(x, labels, margin)
  np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats['active_fraction'], active, rtol=1e-5)


def test_gradients_are_finite_and_the_loss_falls_when_clusters_tighten():
  labels = np.array([1, 1, 2, 2, 3, 3, 0], np.int32)
  x = _emb(labels, seed=9, spread=1.5)
  x[-1] = 0.0  # a padding row of zeros: no NaN from normalising it
  grad = jax.device_get(jax.jit(jax.grad(
      lambda e: losses.semi_hard_triplet_loss(e, labels)[0]))(x))
  assert np.all(np.isfinite(grad)) and np.abs(grad).sum() > 0
  assert np.all(grad[-1] == 0)
  tight = _emb(labels, seed=9, spread=0.05)
  assert float(semi_hard(tight, labels, margin=0.2)[0]) < float(semi_hard(x, labels,
                                                                           margin=0.2)[0])


def test_nearest_neighbour_hits_match_brute_force():
  labels = np.array([1, 1, 2, 2, 3, 3, 4, 0], np.int32)
  x = _emb(labels, seed=4, spread=1.2)
  hits, queries = jax.device_get(jax.jit(losses.nearest_neighbour_hits)(x, labels))
  d = _distances(x)
  for i in range(len(labels)):
    if labels[i] == 0 or np.sum(labels == labels[i]) < 2:
      assert queries[i] == 0 and hits[i] == 0
      continue
    others = [j for j in range(len(labels)) if j != i and labels[j] != 0]
    best = min(others, key=lambda j: (d[i, j], j))
    assert queries[i] == 1 and hits[i] == float(labels[best] == labels[i])


def test_loss_on_8_devices_equals_one_device_loss_over_the_global_batch():
  """Negatives come from the whole global batch, not each device's shard of it."""
  labels = np.repeat(np.arange(1, 9, dtype=np.int32), 2)   # 8 pairs, 16 rows
  labels = np.concatenate([labels[::2], labels[1::2]])     # pairs split across shards
  x = _emb(labels, dim=8, seed=5, spread=1.0)

  def loss_fn(e, l):
    return losses.semi_hard_triplet_loss(e, l, 0.2)[0]

  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  rows = NamedSharding(mesh, P('data'))
  sharded = jax.jit(jax.value_and_grad(loss_fn), in_shardings=(rows, rows))
  args = [jax.device_put(a, rows) for a in (x, labels)]
  assert len(args[0].sharding.device_set) == 8
  loss_8, grad_8 = jax.device_get(sharded(*args))
  one = jax.devices()[0]
  loss_1, grad_1 = jax.device_get(jax.jit(jax.value_and_grad(loss_fn))(
      *[jax.device_put(a, one) for a in (x, labels)]))
  np.testing.assert_allclose(loss_8, loss_1, rtol=1e-5)
  np.testing.assert_allclose(grad_8, grad_1, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(loss_1, brute_force_semi_hard(x, labels, 0.2)[0], rtol=1e-5)
  # Per-device batches (each shard of 2 rows holds no positive pair) would give no loss at all.
  per_shard = [float(jax.jit(loss_fn)(x[i:i + 2], labels[i:i + 2])) for i in range(0, 16, 2)]
  assert max(per_shard) == 0.0 and float(loss_8) > 0.0
