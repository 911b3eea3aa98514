"""Melody pairs: note alignment of two renderings, and the aligned-pair pipeline on the tiny corpus."""
from __future__ import annotations

import numpy as np
import pytest

from musiclm_jax.melody import data as melody_data

# A tune: (onset in quarters, length in quarters, written MIDI pitch), 8 quarters long.
TUNE = [(0, 1, 60), (1, 0.5, 62), (1.5, 0.5, 64), (2, 1, 65), (3, 1, 67), (4, 0.5, 69),
        (4.5, 0.5, 67), (5, 1, 65), (6, 1, 64), (7, 1, 62)]


def _render_notes(start_quarters, tempo, transposition, clip_seconds, tune=TUNE, period=8.0):
  """melody_notes of a looped tune as render.melody_voice_notes gives them."""
  rows = []
  clip_quarters = clip_seconds * tempo / 60.0
  for repeat in range(int(start_quarters // period), int(np.ceil((start_quarters +
                                                                  clip_quarters) / period)) + 1):
    for onset, length, pitch in tune:
      q = onset + repeat * period - start_quarters
      if 0 <= q < clip_quarters:
        rows.append((q * 60 / tempo, min((q + length) * 60 / tempo, clip_seconds),
                     pitch + transposition))
  return np.asarray(sorted(rows), np.float32)


@pytest.mark.parametrize('start_a,tempo_a,tr_a,start_b,tempo_b,tr_b', [
    (0.0, 90.0, 3, 2.0, 140.0, -17),
    (3.0, 120.0, 0, 0.0, 66.0, 12),
    (1.0, 100.0, -5, 1.0, 100.0, 7),
])
def test_alignment_recovers_the_offset_and_centres_windows_on_one_tune_position(
    start_a, tempo_a, tr_a, start_b, tempo_b, tr_b):
  clip = 6.0
  a = _render_notes(start_a, tempo_a, tr_a, clip)
  b = _render_notes(start_b, tempo_b, tr_b, clip)
  al = melody_data.align_renderings(a, tempo_a, tr_a, clip, b, tempo_b, tr_b, clip)
  assert al is not None and al.match_fraction == 1.0 and al.matched_notes >= 5
  # Offsets are defined modulo the loop period (8 quarters).
  assert abs((al.offset_quarters - (start_b - start_a) + 4) % 8 - 4) < 1e-3
  for u in (0.0, 0.5, 0.99):
    sa, sb = melody_data.aligned_window_starts(al, tempo_a, clip, tempo_b, clip, 2.0, u)
    assert 0 <= sa <= clip - 2.0 and 0 <= sb <= clip - 2.0
    centre_a = (sa + 1.0) * tempo_a / 60.0            # quarters into clip A
    centre_b = (sb + 1.0) * tempo_b / 60.0 + al.offset_quarters
    assert abs(centre_a - centre_b) < 1e-6, (centre_a, centre_b)


def test_a_repeated_phrase_with_two_endings_shares_only_the_phrase():
  phrase = TUNE[:5]                                               # quarters 0-4; endings at 4
  ending_1 = [(o, l, p) for o, l, p in TUNE[5:]]
  ending_2 = [(o, l, p + 2) for o, l, p in TUNE[5:]]              # the same rhythm, other notes
  a = _render_notes(0.0, 90.0, 0, 5.0, tune=phrase + ending_1)
  b = _render_notes(0.0, 120.0, 5, 4.0, tune=phrase + ending_2)
  al = melody_data.align_renderings(a, 90.0, 0, 5.0, b, 120.0, 5, 4.0)
  assert al.offset_quarters == 0.0 and al.matched_notes == 5
  assert (al.shared_start, al.shared_end) == (0.0, pytest.approx(4.0, abs=1e-4))  # ending 1
  assert al.match_fraction < 1.0


def test_different_tunes_do_not_align():
  rng = np.random.default_rng(0)
  other = [(o, l, int(p)) for (o, l, _), p in zip(TUNE, rng.integers(48, 84, len(TUNE)))]
  a = _render_notes(0.0, 100.0, 0, 6.0)
  b = _render_notes(0.0, 100.0, 0, 6.0, tune=other)
  al = melody_data.align_renderings(a, 100.0, 0, 6.0, b, 100.0, 0, 6.0)
  assert al is None or al.matched_notes < 3
  melody_data.reset_skipped_pairs()
  ok, *_ = melody_data.align_pair(a, len(a), 100.0, 0, 6 * 24000, b, len(b), 100.0, 0,
                                  6 * 24000, 0.5, window_samples=48000)
  assert not ok and sum(melody_data.skipped_pairs().values()) == 1


def test_pairing_needs_the_corpus_features():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  ds = tf.data.Dataset.from_tensors({'audio': tf.zeros([4], tf.int16), 'id': 'x'})
  with pytest.raises(KeyError, match='melody_notes'):
    melody_data.pair_renderings(ds)


def test_aligned_pairs_from_the_tiny_corpus(tiny_corpus_dir):
  """Pairs are two renderings of one melody; their crops are cut where the source says, and
  are centred on the same point of the tune."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from musiclm_jax.data import seqio_input  # pylint: disable=g-import-not-at-top
  window = 24000
  config = seqio_input.DatasetConfig(
      'embedded_music_tiny_melody', {'audio': window, 'positive_audio': window,
                                     'melody_label': 1},
      split='train', batch_size=1, shuffle=False, module='tasks.melody',
      tfds_data_dir=tiny_corpus_dir, feature_converter='audio')
  import seqio  # pylint: disable=g-import-not-at-top
  import tasks.melody  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  seqio.set_tfds_data_dir_override(tiny_corpus_dir)
  try:
    pairs = list(seqio.get_dataset('embedded_music_tiny_melody', dict(config.task_feature_lengths),
                                   dataset_split='train', shuffle=False, num_epochs=1,
                                   feature_converter=seqio.PassThroughFeatureConverter()
                                   ).as_numpy_iterator())
  finally:
    seqio.set_tfds_data_dir_override(None)
  source = {ex['id'].decode(): ex for ex in tfds.as_numpy(tfds.builder(
      'embedded_music/tiny', data_dir=tiny_corpus_dir).as_dataset(split='train'))}
  assert len(pairs) >= 1, melody_data.skipped_pairs()
  for p in pairs:
    a, b = source[p['id'].decode()], source[p['positive_id'].decode()]
    assert a['melody_id'] == b['melody_id'] == p['melody_id'] and p['id'] != p['positive_id']
    assert p['audio'].shape == p['positive_audio'].shape == (window,)
    assert p['melody_label'].shape == (1,) and p['melody_label'][0] > 0
    assert p['timbre'] == a['timbre'] and p['positive_timbre'] == b['timbre']
    for crop, src, start in ((p['audio'], a, p['anchor_start_seconds']),
                             (p['positive_audio'], b, p['positive_start_seconds'])):
      s = int(round(float(start) * 24000))
      np.testing.assert_array_equal(crop, src['audio'][s:s + window].astype(np.float32) / 32768)
    al = melody_data.align_renderings(a['melody_notes'], a['tempo_bpm'], a['transposition'], 4.0,
                                      b['melody_notes'], b['tempo_bpm'], b['transposition'], 4.0)
    assert al.matched_notes >= 3
    centre_a = (float(p['anchor_start_seconds']) + 0.5) * a['tempo_bpm'] / 60
    centre_b = (float(p['positive_start_seconds']) + 0.5) * b['tempo_bpm'] / 60 + al.offset_quarters
    clamped = any(float(s) in (0.0, 3.0) for s in (p['anchor_start_seconds'],
                                                   p['positive_start_seconds']))
    assert clamped or abs(centre_a - centre_b) < 0.05, (centre_a, centre_b)
  # Through the trainer's reader: batches of what MelodyModel trains on.
  batch = next(seqio_input.numpy_batches(seqio_input.get_host_dataset(config, num_epochs=None)))
  assert {k: v.shape for k, v in batch.items()} == {'audio': (1, window),
                                                    'positive_audio': (1, window),
                                                    'melody_label': (1, 1)}
