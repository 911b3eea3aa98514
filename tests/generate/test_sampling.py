"""Tests for the token sampler: temperature, top-k, top-p and vocab masks against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from musiclm_jax.generate import sampling

VOCAB = 16


def _logits(seed=0, batch=3):
  return np.random.default_rng(seed).normal(size=(batch, VOCAB)).astype(np.float32) * 2


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _reference_keep(logits, temperature, top_k, top_p, allowed=None):
  """Kept ids of one row, by the textbook definitions."""
  x = _log_softmax(logits.astype(np.float64))
  if allowed is not None:
    x = np.where(allowed, x, -np.inf)
  x = x / temperature
  order = np.argsort(-x, kind='stable')
  keep = np.isfinite(x)
  if top_k > 0:
    keep &= np.isin(np.arange(VOCAB), order[:top_k])
  z = np.where(keep, x, -np.inf)
  probs = np.exp(z - z.max())
  probs /= probs.sum()
  if top_p < 1.0:
    cumulative = np.cumsum(probs[order])
    # The smallest prefix of the sorted probabilities reaching top_p.
    count = int(np.searchsorted(cumulative, top_p) + 1)
    keep &= np.isin(np.arange(VOCAB), order[:count])
  return keep


filter_fn = jax.jit(sampling.filter_logits)


@pytest.mark.parametrize('top_k', [1, 3, 7])
def test_top_k_keeps_exactly_k(top_k):
  logits = _logits(1)
  out = np.asarray(filter_fn(logits, 1.0, top_k, 1.0))
  for row, x in zip(out, logits):
    kept = np.isfinite(row)
    assert kept.sum() == top_k
    np.testing.assert_array_equal(kept, _reference_keep(x, 1.0, top_k, 1.0))
  # Ties are broken towards the lower id, so still exactly k.
  tied = np.zeros((1, VOCAB), np.float32)
  kept = np.isfinite(np.asarray(filter_fn(tied, 1.0, top_k, 1.0)))[0]
  np.testing.assert_array_equal(np.flatnonzero(kept), np.arange(top_k))


@pytest.mark.parametrize('top_p', [0.05, 0.3, 0.6, 0.9, 0.999])
@pytest.mark.parametrize('temperature', [0.5, 1.0, 2.0])
def test_top_p_keeps_smallest_prefix_reaching_p(top_p, temperature):
  logits = _logits(2)
  out = np.asarray(filter_fn(logits, temperature, 0, top_p))
  for row, x in zip(out, logits):
    kept = np.isfinite(row)
    np.testing.assert_array_equal(kept, _reference_keep(x, temperature, 0, top_p))
    # Kept mass reaches p, and dropping the least probable kept id falls below it.
    probs = np.exp(_log_softmax(x.astype(np.float64)) / temperature)
    probs /= probs.sum()
    mass = probs[kept].sum()
    assert mass >= top_p - 1e-6
    assert mass - probs[kept].min() < top_p


def test_temperature_scales_log_probabilities_and_combined_filters():
  logits = _logits(3)
  allowed = np.arange(VOCAB) % 3 != 0
  temperature = np.array([0.5, 1.0, 3.0], np.float32)
  top_k = np.array([0, 5, 2], np.int32)
  top_p = np.array([0.8, 1.0, 0.5], np.float32)
  out = np.asarray(filter_fn(logits, temperature, top_k, top_p, allowed))
  for i, x in enumerate(logits):
    keep = _reference_keep(x, temperature[i], top_k[i], top_p[i], allowed)
    np.testing.assert_array_equal(np.isfinite(out[i]), keep)
    want = _log_softmax(x.astype(np.float64)) / temperature[i]
    np.testing.assert_allclose(out[i][keep], want[keep], rtol=1e-5, atol=1e-5)
    assert not np.isfinite(out[i][~allowed]).any()


sample_fn = jax.jit(sampling.sample, static_argnames=('filtering', 'greedy'))


def test_temperature_zero_is_argmax_of_allowed_ids():
  logits = _logits(4)
  keys = jax.random.split(jax.random.key(0), 3)
  allowed = np.ones(VOCAB, bool)
  allowed[np.argmax(logits[0])] = False
  ids = np.asarray(sample_fn(keys, logits, jnp.zeros(3), 0, 1.0, allowed))
  np.testing.assert_array_equal(ids, np.argmax(np.where(allowed, logits, -np.inf), -1))
  greedy = sample_fn(None, logits, jnp.zeros(3), 0, 1.0, allowed, greedy=True)
  np.testing.assert_array_equal(np.asarray(greedy), ids)
  # Mixed rows: only the temperature-0 row is deterministic.
  mixed = np.asarray(sample_fn(keys, logits, jnp.array([0.0, 1.0, 1.0]), 0, 1.0, allowed))
  assert mixed[0] == ids[0]


def test_sample_frequencies_follow_filtered_distribution():
  draws = 4000
  logits = np.broadcast_to(_logits(5, batch=1), (draws, VOCAB))
  allowed = np.arange(VOCAB) != 3
  keys = jax.random.split(jax.random.key(1), draws)
  settings = (jnp.float32(1.5), jnp.int32(6), jnp.float32(0.9), allowed)
  ids = np.asarray(sample_fn(keys, logits, *settings))
  filtered = np.asarray(filter_fn(logits[:1], *settings))[0]
  want = np.exp(filtered - filtered.max())
  want /= want.sum()
  counts = np.bincount(ids, minlength=VOCAB)
  assert counts[want == 0].sum() == 0
  # Every kept id within 5 standard deviations of its expected count.
  sigma = np.sqrt(draws * want * (1 - want))
  assert np.all(np.abs(counts - draws * want) <= 5 * sigma + 1)
  # Without top-k/top-p, the unfiltered shortcut draws the very same ids.
  plain = (jnp.float32(1.5), jnp.int32(0), jnp.float32(1.0), allowed)
  np.testing.assert_array_equal(np.asarray(sample_fn(keys[:50], logits[:50], *plain)),
                                np.asarray(sample_fn(keys[:50], logits[:50], *plain,
                                                     filtering=False)))


def test_top_k_bound_ranks_k_ids_and_matches_the_sort():
  """`top_k_bound` (lax.top_k) gives the sort path's values and draws, ties included."""
  rng = np.random.default_rng(7)
  vocab = 300
  logits = (rng.normal(size=(6, vocab)) * 3).astype(np.float32)
  logits[1, :40] = 20.0  # a 40-way tie for the top, straddling the cut at 10
  allowed = np.ones((6, vocab), bool)
  allowed[2, ::3] = False
  allowed[3, 5:] = False  # fewer allowed ids than k
  temperature = np.array([1.0, 0.7, 1.3, 1.0, 0.0, 2.0], np.float32)
  top_k = np.array([1, 10, 25, 16, 3, 50], np.int32)
  top_p = np.array([1.0, 1.0, 0.6, 0.9, 1.0, 0.95], np.float32)
  bound = sampling.top_k_bound_for(top_k, vocab)
  assert bound == 64
  bounded = jax.jit(sampling.filter_logits, static_argnames='top_k_bound')
  want = np.asarray(bounded(logits, temperature, top_k, top_p, allowed))
  got = np.asarray(bounded(logits, temperature, top_k, top_p, allowed, top_k_bound=bound))
  np.testing.assert_array_equal(got, want)
  assert np.isfinite(got[1]).sum() == 10 and np.flatnonzero(np.isfinite(got[1]))[-1] == 9
  keys = jax.random.split(jax.random.key(3), 6)
  draw = jax.jit(sampling.sample, static_argnames=('top_k_bound',))
  np.testing.assert_array_equal(
      np.asarray(draw(keys, logits, temperature, top_k, top_p, allowed, top_k_bound=bound)),
      np.asarray(draw(keys, logits, temperature, top_k, top_p, allowed)))
  # Rows without a top-k (or settings the host cannot see) need the whole vocabulary ranked.
  assert sampling.top_k_bound_for(np.array([5, 0]), vocab) == 0
  assert sampling.top_k_bound_for(None, vocab) == 0
  assert sampling.top_k_bound_for(np.array([260]), vocab) == 0  # 512 is not below 300
  assert sampling.top_k_bound_for(np.array([1]), vocab) == 1


def test_rows_draw_from_their_own_keys():
  logits = np.broadcast_to(_logits(6, batch=1), (8, VOCAB))
  keys = jax.random.split(jax.random.key(2), 8)
  ids = np.asarray(sample_fn(keys, logits, 5.0, 0, 1.0, None))
  assert len(set(ids.tolist())) > 1
  # A row's draw does not depend on the others.
  alone = np.asarray(sampling.sample(keys[3:4], logits[3:4], 5.0))
  assert alone[0] == ids[3]


def test_vocab_mask_checks_and_levels():
  assert sampling.check_vocab_mask(None, VOCAB).shape == (1, VOCAB)
  levels = sampling.level_vocab_mask(VOCAB, [2, 6, 10], 4)
  assert levels.shape == (3, VOCAB)
  np.testing.assert_array_equal(np.flatnonzero(levels[1]), [6, 7, 8, 9])
  np.testing.assert_array_equal(sampling.check_vocab_mask(levels, VOCAB), levels)
  with pytest.raises(ValueError, match='allow no token'):
    sampling.check_vocab_mask(np.zeros((2, VOCAB), bool), VOCAB)
  with pytest.raises(ValueError, match='shape'):
    sampling.check_vocab_mask(np.ones((2, VOCAB + 1), bool), VOCAB)
  with pytest.raises(ValueError, match='boolean'):
    sampling.check_vocab_mask(np.ones((2, VOCAB)), VOCAB)
  with pytest.raises(ValueError, match='exceed'):
    sampling.level_vocab_mask(VOCAB, [0, 14], 4)


def test_row_keys():
  key = jax.random.key(3)
  keys = sampling.row_keys(key, 4)
  assert keys.shape == (4,)
  assert sampling.row_keys(keys, 4) is keys
  legacy = sampling.row_keys(jax.random.PRNGKey(3), 4)
  assert legacy.shape == (4,)
  with pytest.raises(ValueError, match='one key or 4 keys'):
    sampling.row_keys(keys[:3], 4)
