"""Melody training data: pairs of crops of two renderings of one melody, aligned on its notes.

The embedded corpus renders each melody several times (musiclm_jax/data/embedded_music/): other
instruments, tempos, keys and registers, hummed and whistled, each a 10 s excerpt starting at a
random downbeat of the (looped) tune. Two renderings are a positive pair for the triplet loss
only where they sound the same notes, so crops are aligned on the melody, not on the clock:

1. `pair_renderings` (SeqIO preprocessor) groups the stream by `melody_id` into pairs of two
   different renderings (`tf.data.Dataset.group_by_window`, window 2). On the repeated training
   stream a melody's pending rendering waits for the next one to arrive, so with three
   renderings the pairs rotate through all three combinations over successive epochs. A melody
   with a single rendering in a split never pairs; memory holds at most one pending rendering
   per melody.
2. `aligned_crops` finds where the two clips sit in the tune (`align_renderings`): each melody
   note's position in quarter notes is start_seconds * tempo / 60 and its written pitch is the
   sounding pitch minus the rendering's `transposition`; at the offset between the clips with
   the longest shared passage (a run of consecutive notes both play, same written pitch at the
   same tune position, nothing else in between), a pair is kept when that passage has at least
   `min_matched_notes` notes and lasts at least `min_shared_seconds` in each clip (default half
   a window). The two crops are then centred on the same point of the tune, drawn uniformly
   (SeqIO's per-example seed) among the points where both windows fit inside their clips and
   the centre inside the shared passage; when no such point exists, the middle of the shared
   passage, the windows pushed inside their clips. At different tempos the two windows span
   different lengths of tune: around the centre, the slower one's notes are all in the faster
   one as far as the passage goes.
   Pairs that do not align (two excerpts of a long tune that share no passage, or share less
   than the minimum: about 27% of the default corpus's pairs at 4 s windows) are dropped and
   counted in `SKIPPED` (`skipped_pairs()`).

Key. The renderings of a melody are transposed (key_shift -5..+6 semitones plus octave moves into
the instrument's or voice's register), and they are positives regardless: the embedding is
trained to be transposition-invariant (the same intervals and rhythm are the same melody). That
is what a user humming a tune in any key wants, and what the data give; a melody conditioner
that must also fix the key needs it from elsewhere (e.g. the MuLan text, "in D minor").

Examples after `aligned_crops` (with `DatasetConfig(feature_converter='audio',
task_feature_lengths={'audio': W, 'positive_audio': W, 'melody_label': 1})` the batches are what
`MelodyModel` trains on):
  audio, positive_audio   float32 [W] crops of the two renderings (W = task_feature_lengths
                          ['audio'] samples, 4 s in the paper), in [-1, 1)
  melody_label            int32 [1]: a hash of melody_id in [1, 2^31 - 2] (0 is padding); equal
                          labels are positives in the loss (two melodies colliding in one batch
                          is a ~1e-7 event at batch 64)
  id, positive_id, melody_id, timbre, positive_timbre   strings, for inspection
  anchor_start_seconds, positive_start_seconds, shared_seconds   float32 scalars

Tasks (tasks/melody.py): embedded_music_melody, embedded_music_tiny_melody.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from typing import Optional

import numpy as np
import seqio

from musiclm_jax.data import preprocessors
from musiclm_jax.common.tf_setup import quiet_tensorflow

tf = quiet_tensorflow()
logger = logging.getLogger(__name__)

SAMPLE_RATE = 24000
PAIR_FEATURES = ('audio', 'melody_notes', 'tempo_bpm', 'transposition', 'timbre', 'id',
                 'melody_id')
LABEL_BUCKETS = 2**31 - 1
_OFFSET_GRID = 96            # candidate offsets are rounded to 1/96 quarter note
_TOLERANCE_QUARTERS = 0.02   # two notes match when their tune positions differ by less

_side = preprocessors._side_feature  # pylint: disable=protected-access
MELODY_FEATURES = {
    'audio': _side(tf.float32, 1),
    'positive_audio': _side(tf.float32, 1),
    'melody_label': _side(tf.int32, 1),
    'id': _side(tf.string, 0),
    'positive_id': _side(tf.string, 0),
    'melody_id': _side(tf.string, 0),
    'timbre': _side(tf.string, 0),
    'positive_timbre': _side(tf.string, 0),
    'anchor_start_seconds': _side(tf.float32, 0),
    'positive_start_seconds': _side(tf.float32, 0),
    'shared_seconds': _side(tf.float32, 0),
}

SKIPPED: collections.Counter = collections.Counter()
_SKIPPED_LOCK = threading.Lock()


def skipped_pairs() -> dict[str, int]:
  """Pairs dropped by `aligned_crops` in this process so far, by reason.

  Reasons: 'no_common_notes' (no written pitch in common), 'no_alignment' (the longest shared
  passage has fewer than `min_matched_notes` notes: the clips play different passages),
  'short_overlap' (they share a passage shorter than `min_shared_seconds`). Every pass over the
  data counts again.
  """
  with _SKIPPED_LOCK:
    return dict(SKIPPED)


def reset_skipped_pairs() -> None:
  with _SKIPPED_LOCK:
    SKIPPED.clear()


def _count_skip(reason: str) -> None:
  with _SKIPPED_LOCK:
    SKIPPED[reason] += 1


# ---------------------------------------------------------------------------
# Alignment (numpy)
# ---------------------------------------------------------------------------


def tune_positions(notes: np.ndarray, tempo_bpm: float, transposition: int
                   ) -> tuple[np.ndarray, np.ndarray]:
  """(quarter-note position from the clip start [n], written MIDI pitch [n]) of melody_notes."""
  notes = np.asarray(notes, np.float64).reshape(-1, 3)
  return notes[:, 0] * float(tempo_bpm) / 60.0, np.rint(notes[:, 2] - transposition).astype(
      np.int64)


@dataclasses.dataclass(frozen=True)
class Alignment:
  """Where two renderings of a melody sit relative to each other in the tune.

  Attributes:
    offset_quarters: d such that a note at q quarters into clip B is at q + d quarters into
      clip A (the same tune position).
    matched_notes: notes in the shared passage: the longest run of consecutive notes that both
      clips play at that offset (same written pitch, same tune position), with no note of either
      clip in between that the other does not play.
    match_fraction: the share of the notes either clip plays where both clips overlap in the
      tune that the other plays too (1.0 for two excerpts of the same passage; less when a tune
      repeats a phrase with different continuations).
    shared_start: start of the shared passage (its first note), in quarters into clip A.
    shared_end: its end (the next note that is not shared, or the end of the overlap), in
      quarters into clip A.
  """
  offset_quarters: float
  matched_notes: int
  match_fraction: float
  shared_start: float
  shared_end: float


def _shared_run(qa, wa, qb, wb, offset, quarters_a, quarters_b
                ) -> tuple[int, float, float, float]:
  """(notes, start, end, match fraction) of the longest shared run of notes at one offset."""
  lo, hi = max(0.0, offset), min(quarters_a, offset + quarters_b)
  tol = _TOLERANCE_QUARTERS
  in_a = (qa >= lo - tol) & (qa < hi)
  qb_a = qb + offset
  in_b = (qb_a >= lo - tol) & (qb_a < hi)
  pa, pitch_a, pb, pitch_b = qa[in_a], wa[in_a], qb_a[in_b], wb[in_b]
  pair = (np.abs(pa[:, None] - pb[None, :]) <= tol) & (pitch_a[:, None] == pitch_b[None, :])
  match_a, match_b = pair.any(axis=1), pair.any(axis=0)
  fraction = (match_a.sum() + match_b.sum()) / max(len(pa) + len(pb), 1)
  # Every note of the overlap in tune order: A's (shared or not) and B's unshared ones, which
  # break a run as A's unshared ones do.
  position = np.concatenate([pa, pb[~match_b]])
  shared = np.concatenate([match_a, np.zeros(int((~match_b).sum()), bool)])
  order = np.argsort(position, kind='stable')
  position, shared = position[order], shared[order]
  best = (0, lo, lo)
  i = 0
  while i < len(shared):
    if not shared[i]:
      i += 1
      continue
    j = i
    while j < len(shared) and shared[j]:
      j += 1
    end = position[j] if j < len(shared) else hi
    if j - i > best[0]:
      best = (j - i, float(position[i]), float(end))
    i = j
  return best[0], best[1], best[2], float(fraction)


def align_renderings(notes_a: np.ndarray, tempo_a: float, transposition_a: int,
                     clip_seconds_a: float, notes_b: np.ndarray, tempo_b: float,
                     transposition_b: int, clip_seconds_b: float) -> Optional[Alignment]:
  """The offset between two renderings of a melody with the longest shared passage.

  Candidate offsets are the differences of tune positions of notes with the same written pitch.
  At each, the shared passage is the longest run of consecutive notes both clips play (same
  written pitch within 0.02 quarters of the same tune position; see `Alignment`); the best
  offset has the most notes in it, ties broken by the passage's length, then by the smaller
  offset. Offsets are tried in decreasing order of their total number of matching notes, which
  bounds the run, so few are scored in full.

  Args:
    notes_a: float [n, 3] (start_seconds, end_seconds, sounding MIDI pitch) of clip A.
    tempo_a: clip A's tempo (quarter notes per minute).
    transposition_a: semitones clip A's written pitches were moved by.
    clip_seconds_a: clip A's length.
    notes_b, tempo_b, transposition_b, clip_seconds_b: the same for clip B.

  Returns:
    The best `Alignment`, or None when no written pitch is common to both clips.
  """
  qa, wa = tune_positions(notes_a, tempo_a, transposition_a)
  qb, wb = tune_positions(notes_b, tempo_b, transposition_b)
  same = wa[:, None] == wb[None, :]
  if not same.any():
    return None
  diff = qa[:, None] - qb[None, :]
  candidates = np.unique(np.rint(diff[same] * _OFFSET_GRID) / _OFFSET_GRID)
  counts = np.concatenate([
      (same[None] & (np.abs(diff[None] - chunk[:, None, None]) <= _TOLERANCE_QUARTERS)
       ).any(axis=2).sum(axis=1)
      for chunk in np.array_split(candidates, max(1, len(candidates) // 64))])
  quarters_a = clip_seconds_a * tempo_a / 60.0
  quarters_b = clip_seconds_b * tempo_b / 60.0
  best, best_key = None, None
  for index in np.argsort(-counts, kind='stable'):
    if best is not None and counts[index] < best.matched_notes:
      break  # a run never holds more notes than match at its offset
    offset = float(candidates[index])
    notes, start, end, fraction = _shared_run(qa, wa, qb, wb, offset, quarters_a, quarters_b)
    key = (notes, end - start, -abs(offset))
    if best_key is None or key > best_key:
      best_key = key
      best = Alignment(offset, notes, fraction, start, end)
  return best


def aligned_window_starts(alignment: Alignment, tempo_a: float, clip_seconds_a: float,
                          tempo_b: float, clip_seconds_b: float, window_seconds: float,
                          u: float) -> tuple[float, float]:
  """Start times (seconds) of two windows centred on the same tune position.

  The centre is drawn as `u` in [0, 1) over the tune positions where both windows lie inside
  their clips and the centre inside the shared passage; when there are none, the middle of the
  shared passage, each window then pushed inside its clip.
  """
  qs_a, qs_b = tempo_a / 60.0, tempo_b / 60.0  # quarters per second
  d = alignment.offset_quarters
  half_a, half_b = 0.5 * window_seconds * qs_a, 0.5 * window_seconds * qs_b
  lo = max(alignment.shared_start, half_a, d + half_b)
  hi = min(alignment.shared_end, clip_seconds_a * qs_a - half_a,
           d + clip_seconds_b * qs_b - half_b)
  if hi >= lo:
    centre = lo + float(u) * (hi - lo)
  else:
    centre = 0.5 * (alignment.shared_start + alignment.shared_end)
  start_a = min(max(centre / qs_a - 0.5 * window_seconds, 0.0),
                max(clip_seconds_a - window_seconds, 0.0))
  start_b = min(max((centre - d) / qs_b - 0.5 * window_seconds, 0.0),
                max(clip_seconds_b - window_seconds, 0.0))
  return start_a, start_b


def align_pair(notes_a, num_notes_a, tempo_a, transposition_a, samples_a, notes_b, num_notes_b,
               tempo_b, transposition_b, samples_b, u, *, window_samples: int,
               sample_rate: int = SAMPLE_RATE, min_matched_notes: int = 3,
               min_shared_seconds: Optional[float] = None
               ) -> tuple[np.bool_, np.int64, np.int64, np.float32]:
  """`aligned_crops`'s numpy step: (ok, start sample A, start sample B, shared seconds).

  Notes arrays may be padded past num_notes (rows are cut there). `ok` is false (and the pair
  counted in `SKIPPED` by reason) when the clips do not share a long enough passage.
  """
  window_seconds = window_samples / sample_rate
  if min_shared_seconds is None:
    min_shared_seconds = 0.5 * window_seconds
  clip_a, clip_b = float(samples_a) / sample_rate, float(samples_b) / sample_rate
  alignment = align_renderings(np.asarray(notes_a)[:int(num_notes_a)], float(tempo_a),
                               int(transposition_a), clip_a,
                               np.asarray(notes_b)[:int(num_notes_b)], float(tempo_b),
                               int(transposition_b), clip_b)
  fail = (np.bool_(False), np.int64(0), np.int64(0), np.float32(0.0))
  if alignment is None:
    _count_skip('no_common_notes')
    return fail
  if alignment.matched_notes < min_matched_notes:
    _count_skip('no_alignment')
    return fail
  span = alignment.shared_end - alignment.shared_start
  shared = min(span * 60.0 / float(tempo_a), span * 60.0 / float(tempo_b))
  if shared < min_shared_seconds:
    _count_skip('short_overlap')
    return fail
  start_a, start_b = aligned_window_starts(alignment, float(tempo_a), clip_a, float(tempo_b),
                                           clip_b, window_seconds, float(u))
  return (np.bool_(True), np.int64(round(start_a * sample_rate)),
          np.int64(round(start_b * sample_rate)), np.float32(shared))


# ---------------------------------------------------------------------------
# SeqIO preprocessors
# ---------------------------------------------------------------------------


def melody_label(melody_id):
  """int32 label in [1, 2^31 - 2] of a melody_id string tensor (0 is kept for padding)."""
  bucket = tf.strings.to_hash_bucket_fast(melody_id, LABEL_BUCKETS - 1)
  return tf.cast(bucket + 1, tf.int32)


def pair_renderings(dataset):
  """Groups the examples of each `melody_id` into pairs of two different renderings.

  Keeps PAIR_FEATURES (plus `num_notes`, `num_samples`), each with a leading axis of 2; notes and
  audio are padded to the longer of the two (notes with -1 rows, audio with zeros). Renderings
  wait in memory until their melody's next rendering arrives (see the module docstring); a
  pair of two copies of one rendering (`id` equal, possible across epochs) is dropped.
  """
  missing = [k for k in PAIR_FEATURES if k not in dataset.element_spec]
  if missing:
    raise KeyError(f'pair_renderings: the examples lack {missing} (have '
                   f'{sorted(dataset.element_spec)}); it needs an embedded_music-style corpus')

  def prepare(ex):
    out = {k: ex[k] for k in PAIR_FEATURES}
    out['num_notes'] = tf.shape(ex['melody_notes'])[0]
    out['num_samples'] = tf.shape(ex['audio'])[0]
    return out

  ds = dataset.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  spec = ds.element_spec
  padded_shapes = {k: s.shape for k, s in spec.items()}
  padding_values = {k: (tf.constant('', tf.string) if s.dtype == tf.string else
                        tf.constant(-1 if k == 'melody_notes' else 0, s.dtype))
                    for k, s in spec.items()}

  def key(ex):
    return tf.strings.to_hash_bucket_fast(ex['melody_id'], 2**62)

  def reduce(unused_key, window):
    return window.padded_batch(2, padded_shapes=padded_shapes, padding_values=padding_values)

  ds = ds.group_by_window(key_func=key, reduce_func=reduce, window_size=2)
  return ds.filter(lambda p: tf.logical_and(tf.shape(p['id'])[0] == 2,
                                            tf.not_equal(p['id'][0], p['id'][-1])))


def _to_float(x):
  if x.dtype == tf.int16:
    return tf.cast(x, tf.float32) / 32768.0
  return tf.cast(x, tf.float32)


def _crop(x, start, n):
  x = _to_float(x)[start:start + n]
  return tf.ensure_shape(tf.pad(x, [[0, n - tf.shape(x)[0]]]), [n])


def aligned_crops(dataset, sequence_length=None, *, window_samples: Optional[int] = None,
                  sample_rate: int = SAMPLE_RATE, min_matched_notes: int = 3,
                  min_shared_seconds: Optional[float] = None):
  """Pairs from `pair_renderings` -> melody-aligned crops of both (see the module docstring).

  Args:
    dataset: pairs from `pair_renderings`.
    sequence_length: SeqIO's task feature lengths; the crop is sequence_length['audio'] samples.
    window_samples: the crop length, when not given by `sequence_length`.
    sample_rate: the audio's sample rate.
    min_matched_notes: fewest notes in the shared passage.
    min_shared_seconds: shortest shared passage, in each clip's seconds (default half a crop).

  Returns:
    Examples with MELODY_FEATURES.
  """
  n = window_samples or (sequence_length or {}).get('audio')
  if not n:
    raise ValueError("aligned_crops: no crop length: give task_feature_lengths={'audio': "
                     'SAMPLES, ...} (DatasetConfig) or window_samples')
  n = int(n)

  def align_fn(*args):
    return align_pair(*args, window_samples=n, sample_rate=sample_rate,
                      min_matched_notes=min_matched_notes,
                      min_shared_seconds=min_shared_seconds)

  @seqio.map_over_dataset(num_seeds=1)
  def align(pair, seed):
    u = tf.random.stateless_uniform([], seed, dtype=tf.float32)
    args = []
    for i in (0, 1):
      args += [pair['melody_notes'][i], pair['num_notes'][i], pair['tempo_bpm'][i],
               pair['transposition'][i], pair['num_samples'][i]]
    ok, start_a, start_b, shared = tf.numpy_function(
        align_fn, args + [u], [tf.bool, tf.int64, tf.int64, tf.float32], stateful=False)
    return {**pair, 'aligned': tf.ensure_shape(ok, []),
            'starts': tf.cast(tf.stack([tf.ensure_shape(start_a, []),
                                        tf.ensure_shape(start_b, [])]), tf.int32),
            'shared_seconds': tf.ensure_shape(shared, [])}

  def crop(pair):
    starts = pair['starts']
    return {
        'audio': _crop(pair['audio'][0], starts[0], n),
        'positive_audio': _crop(pair['audio'][1], starts[1], n),
        'melody_label': melody_label(pair['melody_id'][0])[None],
        'id': pair['id'][0], 'positive_id': pair['id'][1],
        'melody_id': pair['melody_id'][0],
        'timbre': pair['timbre'][0], 'positive_timbre': pair['timbre'][1],
        'anchor_start_seconds': tf.cast(starts[0], tf.float32) / sample_rate,
        'positive_start_seconds': tf.cast(starts[1], tf.float32) / sample_rate,
        'shared_seconds': pair['shared_seconds'],
    }

  ds = align(dataset)
  ds = ds.filter(lambda pair: pair['aligned'])
  return ds.map(crop, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
