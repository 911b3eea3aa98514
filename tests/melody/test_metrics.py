"""Melody metrics: DTW against librosa, adherence (same, other and transposed melodies), retrieval."""
from __future__ import annotations

import numpy as np
import pytest

from musiclm_jax.melody import metrics

SR = 24000


def _tones(pitches, note_seconds=0.25, harmonics=3, sr=SR):
  """A melody of harmonic tones (MIDI pitches), with short fades so notes are separate."""
  t = np.arange(int(note_seconds * sr)) / sr
  fade = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01)
  out = []
  for p in pitches:
    f = 440.0 * 2.0 ** ((p - 69) / 12.0)
    out.append(fade * sum(np.sin(2 * np.pi * k * f * t) / k for k in range(1, harmonics + 1)))
  x = np.concatenate(out)
  return (0.3 * x / np.abs(x).max()).astype(np.float32)


MELODY = [60, 62, 64, 65, 67, 65, 64, 62, 60, 67, 64, 60]
OTHER = [69, 66, 61, 70, 63, 68, 59, 71, 62, 66, 70, 61]


@pytest.mark.parametrize('shape', [(7, 7), (9, 6), (5, 9), (12, 8)])
def test_batched_dtw_matches_librosa(shape):
  rng = np.random.default_rng(sum(shape))
  costs = rng.uniform(size=(3,) + shape)
  got = metrics.batched_dtw_cost(costs)
  import librosa  # pylint: disable=g-import-not-at-top
  for c, g in zip(costs, got):
    acc, path = librosa.sequence.dtw(C=c, step_sizes_sigma=metrics.STEP_SIZES,
                                     weights_add=np.zeros(3), weights_mul=np.ones(3))
    np.testing.assert_allclose(g * _cells(c), acc[-1, -1], rtol=1e-9)
    np.testing.assert_allclose(metrics.dtw_cost(c), acc[-1, -1] / len(path), rtol=1e-9)
  # No path when one sequence is more than twice as long (in steps) as the other.
  assert np.isinf(metrics.batched_dtw_cost(np.ones((1, 5, 10)))[0])
  assert np.isinf(metrics.dtw_cost(np.ones((5, 10))))


def _cells(cost):
  """Cells on the path batched_dtw_cost chose (to compare totals with librosa's)."""
  total = metrics.batched_dtw_cost(cost[None])[0]
  import librosa  # pylint: disable=g-import-not-at-top
  acc, _ = librosa.sequence.dtw(C=cost, step_sizes_sigma=metrics.STEP_SIZES,
                                weights_add=np.zeros(3), weights_mul=np.ones(3))
  return acc[-1, -1] / total


@pytest.mark.parametrize('feature', ['chroma', 'pitch'])
def test_adherence_same_other_and_transposed(feature):
  if feature == 'pitch':  # pyin is slow: a shorter melody
    melody, other = MELODY[:6], OTHER[:6]
  else:
    melody, other = MELODY, OTHER
  reference = _tones(melody)
  same_slower = _tones(melody, note_seconds=0.33, harmonics=6)  # other tempo and timbre
  different = _tones(other, harmonics=6)
  transposed = _tones([p + 3 for p in melody], note_seconds=0.33, harmonics=6)
  same = metrics.melody_adherence(reference, same_slower, feature=feature)
  diff = metrics.melody_adherence(reference, different, feature=feature)
  up = metrics.melody_adherence(reference, transposed, feature=feature)
  assert 0.0 <= diff.similarity < same.similarity <= 1.0, (same, diff)
  assert same.similarity > 0.8
  # Key-invariant: a transposed copy scores (nearly) as the untransposed one, found at shift -3.
  assert up.shift == 9 and abs(up.similarity - same.similarity) < 0.02, (up, same)
  fixed_key = metrics.melody_adherence(reference, transposed, feature=feature,
                                       key_invariant=False)
  assert fixed_key.shift == 0 and fixed_key.similarity < up.similarity - 0.1


def test_retrieval_matches_brute_force():
  rng = np.random.default_rng(0)
  ids = ['a', 'a', 'a', 'b', 'b', 'c', 'c', 'd']
  timbres = ['instrument', 'hum', 'instrument', 'whistle', 'instrument', 'hum', 'instrument',
             'instrument']
  sim = rng.uniform(size=(8, 8))
  sim = (sim + sim.T) / 2
  shared = np.ones((8, 8), bool)
  shared[0, 2] = shared[2, 0] = False
  subsets = metrics.retrieval_pairs(ids, timbres, shared)
  assert subsets['all'].sum() == 6 + 2 + 2
  assert subsets['shared'].sum() == 8 and not subsets['shared'][0, 2]
  assert subsets['cross_timbre'].sum() == 8
  np.testing.assert_array_equal(np.argwhere(subsets['voice_to_instrument']),
                                [[1, 0], [1, 2], [3, 4], [5, 6]])
  got = metrics.same_melody_retrieval(sim, ids, subsets['all'])
  hits, chance = [], []
  for q in range(8):
    for p in range(8):
      if p == q or ids[p] != ids[q]:
        continue
      gallery = [p] + [x for x in range(8) if ids[x] != ids[q]]
      hits.append(all(sim[q, p] > sim[q, x] for x in gallery[1:]))
      chance.append(1 / len(gallery))
  assert got['num_pairs'] == len(hits)
  np.testing.assert_allclose(got['top1'], np.mean(hits))
  np.testing.assert_allclose(got['chance'], np.mean(chance))


def test_clip_similarities():
  rng = np.random.default_rng(1)
  emb = rng.standard_normal((3, 2, 5))
  emb[1, 1] = 2 * emb[0, 0]                      # clip 1's second window = clip 0's first
  sim = metrics.window_embedding_similarity(emb)
  np.testing.assert_allclose(sim[0, 1], 1.0)
  assert sim[0, 2] < 1.0
  # Chroma baselines are key-invariant: a rotated copy of a clip's chroma matches it fully.
  frames = rng.uniform(size=(2, 6, 12))
  windows = [[frames[0], frames[1]], [np.roll(frames[1], 5, axis=-1), frames[0][::-1]],
             [rng.uniform(size=(6, 12)), rng.uniform(size=(6, 12))]]
  windows = [[w / np.linalg.norm(w, axis=-1, keepdims=True) for w in clip] for clip in windows]
  mean_sim = metrics.chroma_mean_similarity(windows)
  dtw_sim = metrics.chroma_dtw_similarity(windows)
  np.testing.assert_allclose([mean_sim[0, 1], dtw_sim[0, 1]], 1.0, rtol=1e-9)
  assert dtw_sim[0, 2] < 1.0 and np.allclose(dtw_sim, dtw_sim.T)
