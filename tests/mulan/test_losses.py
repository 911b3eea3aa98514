"""MuLan losses: numpy references, global negatives over an 8-device mesh, recall, windowing."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from musiclm_jax.mulan import losses

LOG_T = np.log(1 / 0.07)
# Jitted once per shape: cheaper to compile than the same ops one at a time.
softmax_loss = jax.jit(losses.softmax_contrastive_loss)
sigmoid_loss = jax.jit(losses.sigmoid_contrastive_loss)


def _emb(n, dim=6, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((n, dim)).astype(np.float32),
          rng.standard_normal((n, dim)).astype(np.float32))


def _normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _log_softmax(x, axis):
  m = x.max(axis=axis, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def _np_softmax_loss(a, t, log_t, ids=None):
  """CLIP loss in float64; with ids, other rows of the same text are left out of the softmax."""
  logits = np.exp(log_t) * _normalize(a) @ _normalize(t).T
  n = len(a)
  if ids is not None:
    same = (np.asarray(ids)[:, None] == np.asarray(ids)[None, :]) & ~np.eye(n, dtype=bool)
    logits = np.where(same, -np.inf, logits)
  a2t = -np.diag(_log_softmax(logits, 1)).mean()
  t2a = -np.diag(_log_softmax(logits, 0)).mean()
  acc_a2t = np.mean(np.argmax(logits, 1) == np.arange(n))
  acc_t2a = np.mean(np.argmax(logits, 0) == np.arange(n))
  return 0.5 * (a2t + t2a), acc_a2t, acc_t2a


def _np_sigmoid_loss(a, t, log_t, bias, ids=None):
  logits = np.exp(log_t) * _normalize(a) @ _normalize(t).T + bias
  n = len(a)
  positive = np.eye(n, dtype=bool)
  if ids is not None:
    positive |= np.asarray(ids)[:, None] == np.asarray(ids)[None, :]
  z = np.where(positive, 1.0, -1.0)
  return np.sum(np.log1p(np.exp(-z * logits))) / n


# ---------------------------------------------------------------------------
# Against numpy
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('log_t', [0.0, LOG_T])
def test_softmax_loss_matches_numpy(log_t):
  a, t = _emb(5)
  t[2] = 3 * a[2]  # one pair the model already matches
  loss, (acc_a2t, acc_t2a) = jax.device_get(softmax_loss(a, t, log_t))
  want, want_a2t, want_t2a = _np_softmax_loss(a, t, log_t)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose([acc_a2t, acc_t2a], [want_a2t, want_t2a])
  assert acc_a2t >= 0.2  # row 2 at least


def test_softmax_loss_duplicate_captions_are_not_negatives():
  a, t = _emb(6, seed=1)
  ids = np.array([0, 1, 2, 1, 4, 1])  # rows 1, 3 and 5 hold the same caption
  t[3] = t[5] = t[1]
  loss, accs = jax.device_get(softmax_loss(a, t, LOG_T, text_ids=ids))
  want, want_a2t, want_t2a = _np_softmax_loss(a, t, LOG_T, ids)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(accs, [want_a2t, want_t2a])
  # Token rows work like ids; without them the duplicates are negatives and the loss is higher.
  tokens = np.stack([np.array([101, 7 + i, 102, 0]) for i in ids])
  np.testing.assert_allclose(softmax_loss(a, t, LOG_T, text_ids=tokens)[0],
                             want, rtol=1e-5)
  assert float(softmax_loss(a, t, LOG_T)[0]) > want + 0.1


def test_softmax_loss_ignores_padding_rows():
  a, t = _emb(6, seed=2)
  valid = np.array([1, 1, 1, 1, 0, 0], bool)
  got = softmax_loss(a, t, LOG_T, valid=valid)
  want = softmax_loss(a[:4], t[:4], LOG_T)
  np.testing.assert_allclose(jax.device_get(got[0]), jax.device_get(want[0]), rtol=1e-5)
  np.testing.assert_allclose(jax.device_get(got[1]), jax.device_get(want[1]))
  grads = jax.jit(jax.grad(lambda x: losses.softmax_contrastive_loss(
      x, t, LOG_T, valid=valid)[0]))(a)
  assert np.all(np.isfinite(grads)) and np.all(np.asarray(grads)[4:] == 0)


@pytest.mark.parametrize('log_t,bias', [(np.log(10.0), -10.0), (1.0, 0.5)])
def test_sigmoid_loss_matches_numpy(log_t, bias):
  a, t = _emb(5, seed=3)
  loss, _ = sigmoid_loss(a, t, log_t, bias)
  np.testing.assert_allclose(loss, _np_sigmoid_loss(a, t, log_t, bias), rtol=1e-5)
  ids = np.array([0, 1, 0, 2, 3])
  loss_ids, _ = sigmoid_loss(a, t, log_t, bias, text_ids=ids)
  np.testing.assert_allclose(loss_ids, _np_sigmoid_loss(a, t, log_t, bias, ids), rtol=1e-5)


def test_losses_fall_when_pairs_align():
  a, t = _emb(8, seed=4)
  for fn in (lambda x, y: softmax_loss(x, y, LOG_T),
             lambda x, y: sigmoid_loss(x, y, np.log(10.0), -10.0)):
    random_loss, _ = fn(a, t)
    aligned_loss, accs = fn(a, a + 0.01 * t)
    assert float(aligned_loss) < 0.2 * float(random_loss)
    np.testing.assert_allclose(jax.device_get(accs), [1.0, 1.0])


# ---------------------------------------------------------------------------
# Global negatives over 8 devices
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('kind', ['softmax', 'sigmoid'])
def test_loss_on_8_devices_equals_one_device_loss_over_the_global_batch(kind):
  batch = 16
  a, t = _emb(batch, dim=8, seed=5)
  ids = np.arange(batch)
  ids[9] = ids[2]  # a duplicate caption across two shards
  t[9] = t[2]

  def loss_fn(a, t, ids):
    if kind == 'softmax':
      return losses.softmax_contrastive_loss(a, t, LOG_T, text_ids=ids)[0]
    return losses.sigmoid_contrastive_loss(a, t, np.log(10.0), -10.0, text_ids=ids)[0]

  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  rows = NamedSharding(mesh, P('data'))
  sharded = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)),
                    in_shardings=(rows, rows, rows))
  args = [jax.device_put(x, rows) for x in (a, t, ids)]
  assert len(args[0].sharding.device_set) == 8
  loss_8, grads_8 = jax.device_get(sharded(*args))

  one = jax.devices()[0]
  loss_1, grads_1 = jax.device_get(jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))(
      *[jax.device_put(x, one) for x in (a, t, ids)]))
  np.testing.assert_allclose(loss_8, loss_1, rtol=1e-5)
  for g8, g1 in zip(grads_8, grads_1):
    np.testing.assert_allclose(g8, g1, rtol=1e-4, atol=1e-6)
  # Per-device negatives (2 per shard) would give another loss, well outside float error.
  shard_loss = jax.jit(loss_fn)
  per_shard = np.mean([float(shard_loss(a[i:i + 2], t[i:i + 2], ids[i:i + 2]))
                       for i in range(0, batch, 2)])
  assert abs(per_shard - float(loss_8)) > 0.05 * abs(float(loss_8)), (per_shard, loss_8)


# ---------------------------------------------------------------------------
# Recall
# ---------------------------------------------------------------------------


def _np_ranks(q, k, ids=None):
  scores = _normalize(q) @ _normalize(k).T
  n = len(q)
  ranks = []
  for i in range(n):
    order = [j for j in np.argsort(-scores[i], kind='stable')
             if j == i or ids is None or ids[j] != ids[i]]
    ranks.append(order.index(i))
  return np.array(ranks)


@pytest.mark.parametrize('k', [1, 3, 10])
def test_recall_at_k_matches_brute_force(k):
  q, keys = _emb(12, dim=4, seed=6)
  keys = q + 0.8 * keys
  keys[7] = keys[3]  # an exact tie: key 3 wins (lower index) for query 7, not for query 3
  got = float(losses.recall_at_k(q, keys, k))
  ranks = _np_ranks(q, keys)
  np.testing.assert_allclose(got, np.mean(ranks < k), rtol=1e-6)
  np.testing.assert_array_equal(losses.retrieval_ranks(q, keys), ranks)
  assert ranks[7] >= 1


def test_recall_with_duplicates_and_padding():
  q, keys = _emb(8, dim=4, seed=7)
  ids = np.array([0, 1, 2, 3, 1, 5, 6, 7])
  keys[4] = keys[1]
  ranks = np.asarray(losses.retrieval_ranks(q, keys, text_ids=ids))
  np.testing.assert_array_equal(ranks, _np_ranks(q, keys, ids))
  valid = np.array([1, 1, 1, 1, 1, 1, 0, 0], bool)
  got = float(losses.recall_at_k(q, keys, 2, text_ids=ids, valid=valid))
  want = np.mean(_np_ranks(q[:6], keys[:6], ids[:6]) < 2)
  np.testing.assert_allclose(got, want)


# ---------------------------------------------------------------------------
# Windows
# ---------------------------------------------------------------------------

SR = 24000


def test_a_25_s_clip_gives_16_windows_of_10_s():
  audio = np.random.default_rng(8).standard_normal((1, 25 * SR)).astype(np.float32)
  windows, mask = losses.window_embeddings(audio, 10 * SR, SR)
  assert windows.shape == (1, 16, 10 * SR) and mask.shape == (1, 16)
  assert np.asarray(mask).all()
  windows = np.asarray(windows)
  for k in (0, 7, 15):
    np.testing.assert_array_equal(windows[0, k], audio[0, k * SR:k * SR + 10 * SR])


def test_short_clip_is_one_padded_window_and_partial_windows_are_masked():
  audio = np.ones((2, 4 * SR), np.float32)
  windows, mask = jax.device_get(losses.window_embeddings(audio, 10 * SR, SR))
  assert windows.shape == (2, 1, 10 * SR)
  np.testing.assert_array_equal(mask, [[True], [True]])
  assert windows[:, 0, :4 * SR].min() == 1.0 and windows[:, 0, 4 * SR:].max() == 0.0
  # 12.5 s: windows start at 0, 1, 2 s (full) and 3 s (it would end 0.5 s past the clip).
  windows, mask = jax.device_get(losses.window_embeddings(np.ones((1, 25 * SR // 2)),
                                                          10 * SR, SR))
  np.testing.assert_array_equal(mask, [[True, True, True, False]])
  # Zero-padded clips of different lengths in one batch.
  _, mask = jax.device_get(losses.window_embeddings(np.ones((2, 13 * SR)), 10 * SR, SR,
                                                    lengths=np.array([13 * SR, 11 * SR])))
  np.testing.assert_array_equal(mask, [[True] * 4, [True, True, False, False]])


def test_average_windows():
  emb = np.random.default_rng(9).standard_normal((2, 4, 3)).astype(np.float32)
  mask = np.array([[True, True, True, False], [True, False, False, False]])
  got = np.asarray(losses.average_windows(emb, mask))
  want = np.stack([emb[0, :3].mean(0), emb[1, 0]])
  np.testing.assert_allclose(got, _normalize(want), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(losses.average_windows(emb)),
                             _normalize(emb.mean(1)), rtol=1e-5)
  # End to end with a stand-in embedder: windows of a clip average to its unit mean.
  audio = np.random.default_rng(10).standard_normal((2, 30)).astype(np.float32)
  got = np.asarray(losses.embed_long_audio(lambda w: w[:, :3], audio, 10, 5))
  windows, mask = losses.window_embeddings(audio, 10, 5)
  want = np.asarray(windows)[:, :, :3].mean(1)
  np.testing.assert_allclose(got, _normalize(want), rtol=1e-5)
