"""Melody evaluation: adherence of generated audio to an input melody, and same-melody retrieval.

Melody adherence (`melody_adherence`): how closely one recording follows the melody of another,
as 1 - the mean per-step cost of the best DTW alignment of their melodic features, in [0, 1]
(1: the same melody at any tempo profile). Two features:
  * 'chroma': librosa CQT chroma (12 pitch classes, ~11.7 frames/s at 24 kHz), each frame
    normalised; the cost of two frames is their cosine distance (in [0, 1] for non-negative
    chroma). Sensitive to accompaniment (chords add pitch classes), no pitch tracker needed.
  * 'pitch': the melody's pitch contour from `librosa.pyin` (voiced frames only, in MIDI); the
    cost of two frames is their circular pitch-class distance / 6, so a melody sung an octave
    down is the same melody. pyin is slow (about real time / 1.5 on one core) and expects one
    dominant voice.
The alignment is `librosa.sequence.dtw` with steps (1, 1), (1, 2), (2, 1): local tempo ratios
between 1/2 and 2, no degenerate paths that park one sequence on a single frame; the cost is
the accumulated cost over the number of cells on the path. With `key_invariant` (default) the
second recording is also compared transposed by each of the 12 semitone shifts and the best
shift counts (`AdherenceResult.shift`): a hummed input in another key is followed when the
output keeps its intervals. basic-pitch transcription (../shared/OFFLINE_RESOURCES.md) would be
a third feature; it is not wired in.

Same-melody retrieval (`same_melody_retrieval`, `evaluate_split`, the CLI below): over a split of
the embedded corpus (every melody rendered several times, hummed, whistled or on instruments),
each ordered pair (query q, target p) of two renderings of one melody is a retrieval task: the
gallery is p and every clip of every other melody (N = 1 + those clips); top-1 is right when p
scores strictly higher than every other-melody clip. Chance is 1 / N. Pair subsets:
  all            every pair of renderings of one melody
  shared         pairs whose clips play a common passage of the tune (musiclm_jax/melody/data.py
                 `align_renderings`: a run of at least 3 notes both play, lasting at least
                 `min_shared_seconds` in both); two excerpts of a long tune that share no note
                 cannot be matched by any melody feature, so this is the meaningful set
  cross_timbre   shared pairs of different timbre classes (instrument / hum / whistle)
  voice_to_instrument   shared pairs whose query is hummed or whistled and target is played on
                 instruments: what a user humming a tune does
Clip similarity is the best match over window pairs (windows of 4 s every `hop_seconds`):
  * melody_embedding: cosine of the trained embeddings (`MelodyEncoder.embed_windows`);
  * chroma_mean (baseline, no learning): cosine of the windows' mean CQT chroma vectors,
    maximised over the 12 rotations (key-invariant);
  * chroma_dtw (baseline, no learning): 1 - DTW cost of the windows' chroma sequences (as in
    `melody_adherence`), maximised over the 12 rotations.

  .venv/bin/python -m musiclm_jax.melody.metrics --model_dir=runs/melody_tiny --split=test
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
from typing import Any, Callable, Optional, Sequence

import numpy as np

SAMPLE_RATE = 24000
CHROMA_HOP = 2048          # ~11.7 frames per second at 24 kHz (a multiple of 2^6 for the CQT)
PYIN_FMIN = 65.0           # C2
PYIN_FMAX = 2093.0         # C7
STEP_SIZES = np.array([[1, 1], [1, 2], [2, 1]])
VOICE_TIMBRES = ('hum', 'whistle')


# ---------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------


def chroma(wav: Any, sample_rate: int = SAMPLE_RATE, hop_length: int = CHROMA_HOP) -> np.ndarray:
  """CQT chroma of mono audio: float32 [frames, 12], each frame L2-normalised (silence: 0)."""
  import librosa  # pylint: disable=g-import-not-at-top
  wav = np.asarray(wav, np.float32).reshape(-1)
  c = librosa.feature.chroma_cqt(y=wav, sr=sample_rate, hop_length=hop_length).T
  norm = np.linalg.norm(c, axis=1, keepdims=True)
  return np.where(norm > 1e-8, c / np.maximum(norm, 1e-8), 0.0).astype(np.float32)


def pitch_contour(wav: Any, sample_rate: int = SAMPLE_RATE, hop_length: int = 512,
                  fmin: float = PYIN_FMIN, fmax: float = PYIN_FMAX) -> np.ndarray:
  """The voiced frames' pitch (pyin) in MIDI: float [voiced frames] (unvoiced frames dropped)."""
  import librosa  # pylint: disable=g-import-not-at-top
  wav = np.asarray(wav, np.float32).reshape(-1)
  f0, voiced, _ = librosa.pyin(wav, fmin=fmin, fmax=fmax, sr=sample_rate,
                               frame_length=2048, hop_length=hop_length)
  keep = voiced & np.isfinite(f0)
  return librosa.hz_to_midi(f0[keep]).astype(np.float64)


# ---------------------------------------------------------------------------
# DTW
# ---------------------------------------------------------------------------


def dtw_cost(cost: np.ndarray) -> float:
  """Mean cost per path cell of the best (1,1)/(1,2)/(2,1)-step alignment (librosa's DTW).

  inf when no such path exists (one sequence more than about twice as long as the other).
  """
  import librosa  # pylint: disable=g-import-not-at-top
  cost = np.asarray(cost, np.float64)
  n, m = cost.shape
  # Each step advances one sequence by 1 or 2 and the other by 1: the end is reachable only
  # when neither sequence is more than twice as long (in steps) as the other.
  if n == 0 or m == 0 or m - 1 > 2 * (n - 1) or n - 1 > 2 * (m - 1):
    return float('inf')
  try:
    acc, path = librosa.sequence.dtw(C=cost, step_sizes_sigma=STEP_SIZES,
                                     weights_add=np.zeros(3), weights_mul=np.ones(3))
  except librosa.util.exceptions.ParameterError:  # no warping path
    return float('inf')
  total = acc[-1, -1]
  return float(total / len(path)) if np.isfinite(total) else float('inf')


def batched_dtw_cost(cost: np.ndarray) -> np.ndarray:
  """`dtw_cost` of many [..., n, m] cost matrices at once (numpy, vectorised over all but n).

  The same recurrence as librosa's with steps (1, 1), (1, 2), (2, 1), weights 1:
  D[i, j] = C[i, j] + min(D[i-1, j-1], D[i-1, j-2], D[i-2, j-1]), D[0, 0] = C[0, 0]; the result
  is D[n-1, m-1] over the number of cells on the chosen path.
  """
  cost = np.asarray(cost, np.float64)
  *batch, n, m = cost.shape
  inf = np.inf
  acc = np.full(tuple(batch) + (n + 2, m + 2), inf)   # two rows/columns of padding in front
  cells = np.zeros(tuple(batch) + (n + 2, m + 2))
  acc[..., 2, 2] = cost[..., 0, 0]
  cells[..., 2, 2] = 1
  for i in range(n):
    r = i + 2
    cand = np.stack([acc[..., r - 1, 1:m + 1], acc[..., r - 1, 0:m],
                     acc[..., r - 2, 1:m + 1]], axis=-1)            # [..., m, 3] for j = 0..m-1
    cand_cells = np.stack([cells[..., r - 1, 1:m + 1], cells[..., r - 1, 0:m],
                           cells[..., r - 2, 1:m + 1]], axis=-1)
    best = np.argmin(cand, axis=-1)
    prev = np.take_along_axis(cand, best[..., None], -1)[..., 0]
    prev_cells = np.take_along_axis(cand_cells, best[..., None], -1)[..., 0]
    row = cost[..., i, :] + prev
    if i == 0:
      row[..., 0] = cost[..., 0, 0]
      prev_cells[..., 0] = 0
    acc[..., r, 2:] = row
    cells[..., r, 2:] = prev_cells + 1
  total = acc[..., n + 1, m + 1]
  return np.where(np.isfinite(total), total / np.maximum(cells[..., n + 1, m + 1], 1), inf)


# ---------------------------------------------------------------------------
# Adherence
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AdherenceResult:
  """Melody adherence of one recording to another.

  Attributes:
    similarity: 1 - cost, in [0, 1] (0 when no alignment exists).
    cost: mean per-cell DTW cost of the best alignment (inf when none).
    shift: semitones added to the second recording's pitch classes in the best alignment (0
      unless key_invariant).
    feature: 'chroma' or 'pitch'.
  """
  similarity: float
  cost: float
  shift: int
  feature: str


def _pitch_class_cost(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  diff = np.abs(np.mod(a[:, None] - b[None, :], 12.0))
  return np.minimum(diff, 12.0 - diff) / 6.0


def adherence_from_features(ref: np.ndarray, gen: np.ndarray, feature: str = 'chroma',
                            key_invariant: bool = True) -> AdherenceResult:
  """`melody_adherence` of precomputed features (chroma [n, 12] or pitch contours [n] in MIDI)."""
  shifts = range(12) if key_invariant else (0,)
  best = (float('inf'), 0)
  for shift in shifts:
    if feature == 'chroma':
      rolled = np.roll(gen, shift, axis=1)
      cost = 1.0 - np.clip(np.asarray(ref, np.float64) @ np.asarray(rolled, np.float64).T,
                           0.0, 1.0)
    elif feature == 'pitch':
      cost = _pitch_class_cost(np.asarray(ref, np.float64), np.asarray(gen, np.float64) + shift)
    else:
      raise ValueError(f"feature must be 'chroma' or 'pitch', got {feature!r}")
    c = dtw_cost(cost) if cost.size else float('inf')
    if c < best[0]:
      best = (c, shift)
  cost, shift = best
  similarity = 0.0 if not np.isfinite(cost) else float(np.clip(1.0 - cost, 0.0, 1.0))
  return AdherenceResult(similarity, cost, shift, feature)


def melody_adherence(reference_wav: Any, generated_wav: Any, sample_rate: int = SAMPLE_RATE,
                     feature: str = 'chroma', key_invariant: bool = True) -> AdherenceResult:
  """How closely `generated_wav` follows the melody of `reference_wav` (module docstring).

  Args:
    reference_wav: the input melody (e.g. the user's humming), mono float audio.
    generated_wav: the generated audio, mono, same sample rate.
    sample_rate: their sample rate.
    feature: 'chroma' or 'pitch' (pyin contour).
    key_invariant: also try the 12 transpositions of the generated audio (best one counts).

  Returns:
    An `AdherenceResult`; similarity 1 means the same melody, 0 nothing in common.
  """
  if feature == 'chroma':
    ref, gen = chroma(reference_wav, sample_rate), chroma(generated_wav, sample_rate)
  elif feature == 'pitch':
    ref, gen = pitch_contour(reference_wav, sample_rate), pitch_contour(generated_wav,
                                                                        sample_rate)
  else:
    raise ValueError(f"feature must be 'chroma' or 'pitch', got {feature!r}")
  return adherence_from_features(ref, gen, feature, key_invariant)


# ---------------------------------------------------------------------------
# Same-melody retrieval
# ---------------------------------------------------------------------------


def window_embedding_similarity(emb: np.ndarray) -> np.ndarray:
  """Clip similarity of window embeddings [N, W, D]: the best cosine over window pairs [N, N]."""
  e = np.asarray(emb, np.float64)
  e = e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
  sims = np.einsum('awd,bvd->abwv', e, e)
  return sims.reshape(sims.shape[0], sims.shape[1], -1).max(-1)


def chroma_mean_similarity(window_chroma: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
  """Baseline: the best cosine over window pairs and 12 rotations of mean chroma vectors.

  Args:
    window_chroma: per clip, per window, chroma [frames, 12].
  """
  means = []
  for clip in window_chroma:
    m = np.stack([w.mean(axis=0) for w in clip])
    means.append(m / np.maximum(np.linalg.norm(m, axis=-1, keepdims=True), 1e-12))
  n = len(means)
  x = np.stack(means)                                                # [N, W, 12]
  rolled = np.stack([np.roll(x, s, axis=-1) for s in range(12)])     # [12, N, W, 12]
  sims = np.einsum('awc,sbvc->absvw', x, rolled).reshape(n, n, -1)
  return sims.max(-1)


def chroma_dtw_similarity(window_chroma: Sequence[Sequence[np.ndarray]],
                          progress: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
  """Baseline: the best 1 - DTW cost over window pairs and 12 rotations of chroma sequences."""
  windows = [w for clip in window_chroma for w in clip]
  per_clip = len(window_chroma[0])
  frames = min(len(w) for w in windows)
  x = np.stack([w[:frames] for w in windows]).astype(np.float64)     # [N * W, F, 12]
  rolled = np.stack([np.roll(x, s, axis=-1) for s in range(12)], 1)  # [N * W, 12, F, 12]
  total = len(windows)
  sim = np.full((total, total), -np.inf)
  for i in range(total):
    cost = 1.0 - np.clip(np.einsum('fc,bsgc->bsfg', x[i], rolled[i:]), 0.0, 1.0)
    best = 1.0 - batched_dtw_cost(cost).min(axis=1)                  # [total - i]
    sim[i, i:] = best
    sim[i:, i] = best
    if progress is not None:
      progress(i + 1, total)
  n = len(window_chroma)
  return sim.reshape(n, per_clip, n, per_clip).max(axis=(1, 3))


def retrieval_pairs(melody_ids: Sequence[str], timbres: Sequence[str],
                    shared: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
  """Bool [N, N] masks of the (query, target) pairs of each subset (module docstring).

  Args:
    melody_ids: the clips' melodies.
    timbres: the clips' timbre classes ('instrument', 'hum', 'whistle').
    shared: optional [N, N] bool, pairs whose clips play a common passage.
  """
  ids = np.asarray(melody_ids)
  timbre = np.asarray(timbres)
  n = len(ids)
  same = (ids[:, None] == ids[None, :]) & ~np.eye(n, dtype=bool)
  subsets = {'all': same}
  if shared is not None:
    shared = same & np.asarray(shared, bool)
    voice = np.isin(timbre, VOICE_TIMBRES)
    subsets['shared'] = shared
    subsets['cross_timbre'] = shared & (timbre[:, None] != timbre[None, :])
    subsets['voice_to_instrument'] = shared & voice[:, None] & (timbre == 'instrument')[None, :]
  return subsets


def same_melody_retrieval(similarity: np.ndarray, melody_ids: Sequence[str],
                          pairs: np.ndarray) -> dict[str, float]:
  """Top-1 same-melody retrieval among N (module docstring) over the (q, p) pairs in `pairs`.

  Args:
    similarity: [N, N] clip similarities (higher is closer).
    melody_ids: the clips' melodies.
    pairs: [N, N] bool, the (query, target) pairs to score.

  Returns:
    {'top1': fraction right, 'chance': mean 1 / N over the pairs, 'num_pairs', 'gallery':
    mean N}; top1 and chance are NaN without pairs.
  """
  sim = np.asarray(similarity, np.float64)
  ids = np.asarray(melody_ids)
  other = ids[:, None] != ids[None, :]
  best_other = np.where(other, sim, -np.inf).max(axis=1)            # per query
  gallery = 1 + other.sum(axis=1)
  q, p = np.nonzero(pairs)
  if len(q) == 0:
    return {'top1': float('nan'), 'chance': float('nan'), 'num_pairs': 0, 'gallery': 0.0}
  hits = sim[q, p] > best_other[q]
  return {'top1': float(hits.mean()), 'chance': float(np.mean(1.0 / gallery[q])),
          'num_pairs': int(len(q)), 'gallery': float(gallery[q].mean())}


def shared_passages(notes: Sequence[np.ndarray], tempos: Sequence[float],
                    transpositions: Sequence[int], clip_seconds: Sequence[float],
                    melody_ids: Sequence[str], min_shared_seconds: float,
                    min_matched_notes: int = 3) -> np.ndarray:
  """[N, N] bool: same-melody clips that play a common passage of >= min_shared_seconds each."""
  from musiclm_jax.melody.data import align_renderings  # pylint: disable=g-import-not-at-top
  n = len(notes)
  out = np.zeros((n, n), bool)
  for a in range(n):
    for b in range(a + 1, n):
      if melody_ids[a] != melody_ids[b]:
        continue
      al = align_renderings(notes[a], tempos[a], transpositions[a], clip_seconds[a],
                            notes[b], tempos[b], transpositions[b], clip_seconds[b])
      if al is None or al.matched_notes < min_matched_notes:
        continue
      span = al.shared_end - al.shared_start
      if min(span * 60.0 / tempos[a], span * 60.0 / tempos[b]) >= min_shared_seconds:
        out[a, b] = out[b, a] = True
  return out


def _windows(wav: np.ndarray, window: int, hop: int) -> list[np.ndarray]:
  from musiclm_jax.melody.encoder import num_windows  # pylint: disable=g-import-not-at-top
  wav = np.pad(wav, (0, max(0, window - len(wav))))
  return [wav[k * hop:k * hop + window] for k in range(num_windows(len(wav), window, hop))]


def load_split(split: str, tfds_name: str = 'embedded_music/default:1.1.0',
               tfds_data_dir: Optional[str] = None, limit: Optional[int] = None
               ) -> dict[str, list]:
  """A split of an embedded_music corpus as lists: audio (float32), melody_ids, timbres, notes,
  tempos, transpositions, ids."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from musiclm_jax.data import embedded_music  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  ds = tfds.builder(tfds_name.split(':')[0], data_dir=tfds_data_dir,
                    version=tfds_name.split(':')[1] if ':' in tfds_name else None
                    ).as_dataset(split=split, shuffle_files=False)
  out = collections.defaultdict(list)
  text = lambda v: v.decode('utf-8') if isinstance(v, bytes) else str(v)
  for i, ex in enumerate(tfds.as_numpy(ds)):
    if limit is not None and i >= limit:
      break
    audio = np.asarray(ex['audio'])
    out['audio'].append(audio.astype(np.float32) / 32768.0 if audio.dtype == np.int16
                        else audio.astype(np.float32))
    out['melody_ids'].append(text(ex['melody_id']))
    out['ids'].append(text(ex['id']))
    out['timbres'].append(text(ex['timbre']))
    out['notes'].append(np.asarray(ex['melody_notes'], np.float32))
    out['tempos'].append(float(ex['tempo_bpm']))
    out['transpositions'].append(int(ex['transposition']))
  # Sorted by id, so the evaluation does not depend on the order TFDS stored the clips in.
  order = np.argsort(out['ids'], kind='stable')
  return {k: [v[i] for i in order] for k, v in out.items()}


def evaluate_split(data: dict[str, list], similarities: dict[str, np.ndarray],
                   min_shared_seconds: float = 4.0) -> dict[str, dict[str, dict[str, float]]]:
  """{method: {subset: same_melody_retrieval(...)}} for each [N, N] similarity given."""
  shared = shared_passages(data['notes'], data['tempos'], data['transpositions'],
                           [len(a) / SAMPLE_RATE for a in data['audio']], data['melody_ids'],
                           min_shared_seconds)
  subsets = retrieval_pairs(data['melody_ids'], data['timbres'], shared)
  return {method: {name: same_melody_retrieval(sim, data['melody_ids'], mask)
                   for name, mask in subsets.items()}
          for method, sim in similarities.items()}


def format_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
  """A markdown table: rows are methods (and chance), columns the pair subsets."""
  methods = list(results)
  subsets = list(results[methods[0]])
  head = '| method | ' + ' | '.join(
      f'{s} (n={results[methods[0]][s]["num_pairs"]}, N={results[methods[0]][s]["gallery"]:.0f})'
      for s in subsets) + ' |'
  lines = [head, '|' + '---|' * (len(subsets) + 1)]
  for m in methods:
    lines.append(f'| {m} | ' + ' | '.join(f'{results[m][s]["top1"]:.3f}' for s in subsets) + ' |')
  lines.append('| chance (1/N) | ' + ' | '.join(f'{results[methods[0]][s]["chance"]:.3f}'
                                                 for s in subsets) + ' |')
  return '\n'.join(lines)


def embed_clips(network, params, audio: Sequence[np.ndarray], batch_size: int = 8) -> np.ndarray:
  """[N, windows, D] window embeddings of equal-length clips with a `MelodyEncoder`."""
  import jax  # pylint: disable=g-import-not-at-top
  from musiclm_jax.melody.encoder import MelodyEncoder  # pylint: disable=g-import-not-at-top
  fn = jax.jit(lambda p, a: network.apply({'params': p}, a, method=MelodyEncoder.embed_windows))
  x = np.stack(audio).astype(np.float32)
  out = []
  for i in range(0, len(x), batch_size):
    chunk = x[i:i + batch_size]
    pad = batch_size - len(chunk)  # one compiled shape
    chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], np.float32)])
    out.append(np.asarray(fn(params, chunk))[:batch_size - pad])
  return np.concatenate(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m musiclm_jax.melody.metrics',
      description='Same-melody retrieval across renderings (top-1 among N) of a trained melody '
                  'embedder on a split of the embedded corpus, beside chance and chroma '
                  'baselines.')
  parser.add_argument('--model_dir', help='a `musiclm-jax train` melody run directory')
  parser.add_argument('--conditioner_dir', help='or a melody conditioner directory')
  parser.add_argument('--split', default='test')
  parser.add_argument('--tfds_name', default='embedded_music/default:1.1.0')
  parser.add_argument('--tfds_data_dir', default=None)
  parser.add_argument('--hop_seconds', type=float, default=None,
                      help="window hop for the clip similarity (default: the encoder's, 3 s)")
  parser.add_argument('--min_shared_seconds', type=float, default=4.0)
  parser.add_argument('--baselines', default='chroma_mean,chroma_dtw',
                      help="comma-separated: chroma_mean, chroma_dtw (or '' for none)")
  parser.add_argument('--limit', type=int, default=None, help='read at most this many clips')
  parser.add_argument('--step', type=int, default=None, help='checkpoint step (default latest)')
  parser.add_argument('--output_json', default=None, help='also write the results here')
  args = parser.parse_args(argv)
  if bool(args.model_dir) == bool(args.conditioner_dir):
    parser.error('give exactly one of --model_dir and --conditioner_dir')

  if args.model_dir:
    from musiclm_jax.melody.conditioning import load_melody_run  # pylint: disable=g-import-not-at-top
    network, params, step = load_melody_run(args.model_dir, args.step)
    source = f'{args.model_dir} step {step}'
  else:
    from musiclm_jax.melody.conditioning import load_melody_conditioner  # pylint: disable=g-import-not-at-top
    cond = load_melody_conditioner(args.conditioner_dir)
    network, params, source = cond.network, cond.params, args.conditioner_dir
  if args.hop_seconds:
    network = network.clone(hop_seconds=args.hop_seconds)
  data = load_split(args.split, args.tfds_name, args.tfds_data_dir, args.limit)
  print(f'{args.split}: {len(data["audio"])} clips of {len(set(data["melody_ids"]))} melodies; '
        f'windows of {network.window_seconds:g} s every {network.hop_seconds:g} s; '
        f'embedder {source}', file=sys.stderr)
  sims = {'melody_embedding': window_embedding_similarity(
      embed_clips(network, params, data['audio']))}
  baselines = [b for b in args.baselines.split(',') if b]
  if baselines:
    window, hop = network.window_samples, network.hop_samples
    window_chroma = [[chroma(w) for w in _windows(a, window, hop)] for a in data['audio']]
    for name in baselines:
      if name == 'chroma_mean':
        sims[name] = chroma_mean_similarity(window_chroma)
      elif name == 'chroma_dtw':
        sims[name] = chroma_dtw_similarity(window_chroma)
      else:
        parser.error(f'unknown baseline {name!r}')
  results = evaluate_split(data, sims, args.min_shared_seconds)
  print(format_table(results))
  if args.output_json:
    with open(args.output_json, 'w') as f:
      json.dump({'source': source, 'split': args.split, 'clips': len(data['audio']),
                 'hop_seconds': network.hop_seconds,
                 'min_shared_seconds': args.min_shared_seconds, 'results': results}, f,
                indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
