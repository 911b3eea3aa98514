"""`musiclm-jax eval --gin_file=runs/eval.gin`: a pipeline folder scored over a corpus split.

Every clip of the split (embedded_music by default, its 'test' split) has a caption and
metadata. The pipeline generates audio from each caption, and the generated clips are scored
beside references that put each number on a scale:

  FAD          musicnn 'penultimate' Fréchet distance to real audio. Always at equal clip
               counts (FAD is biased upward by roughly a constant over N): the split is cut into
               two halves A and B (seeded); every system is scored by FAD(real A, its clips of
               the B captions). Floor: real B (two halves of the real split); anchors: white
               noise with each real clip's RMS, digital silence. Also FAD of all generated clips
               against all real ones, and FAD-inf (frechet.fad_infinity) when there are at least
               `fad_inf_min_clips` clips. `fad_embedders` picks the embedders ('musicnn',
               'mulan': the pipeline's MuLan audio tower, 'vggish' and 'trill': local
               SavedModels, see embedders.py); the first gives the headline `fad` section and
               the systems' 'fad' column, each further one a 'fad_NAME' column, and with more
               than one, `fad_by_embedder` tabulates them all.
  KLD          musicnn tag posteriors, KL(real_i || generated_i), paired by caption (kld.py);
               references: generated from a shuffled caption, and real clips of other captions.
               From the first of `fad_embedders` with tag posteriors (embedders without a
               classifier, MuLan, VGGish, TRILL, give none); skipped, with the reason, when none
               has them.
  MCC          MuLan cycle consistency (mulan/metrics.py): the cosine between each caption's
               MuLan text embedding and the MuLan audio embedding of the audio generated from it;
               ceiling: the real clip; floor: audio generated from a shuffled caption.
  attributes   an attribute classifier (musiclm_jax/evaluation/attributes.py, fitted on real
               audio) on the generated audio, against the labels of the caption's clip; ceiling:
               the classifier on the real clips; floor: on audio generated from shuffled
               captions (a fixed derangement: no caption keeps its own clip).
  melody       with a melody-conditioned pipeline: a few hummed / whistled clips of the split
               are the tunes, an instrument caption of the split the text; chroma DTW adherence
               (melody/metrics.py) of the generated audio to the tune, beside the same caption
               without the tune (floor) and a real instrument rendering of the same melody
               (ceiling, when the split has one). Skipped, with the reason, otherwise.
  instrument_prompts  prompts that name one instrument (evaluation/prompts.py: a plain and a
               MusicCaps-style prompt for each of the split's `instrument_prompts` most common
               lead instruments): how often the attribute classifier hears the instrument named,
               beside the chance floor (another instrument of the set) and the classifier on
               real clips of those instruments (ceiling).

Diagnostics ("everything sounds like noise: which stage is broken?"), `diagnostics=True`:
  opus_6kbps                   the real clips through Opus at 6 kbps (the tiny codec's bitrate;
                               when opus-tools is installed): the codec's baseline;
  codec_resynthesis            the real clips encoded and decoded by the pipeline's codec
                               (multi-scale log-mel distance and SI-SNR to the input, and the
                               scores above): the ceiling of everything generated;
  ground_truth_semantic_coarse the real clips' semantic and coarse tokens given, only the fine
                               stage generates;
  ground_truth_semantic        the real clips' semantic tokens given, coarse and fine generate;
  teacher_forced               each stage LM's loss and accuracy on the real clips' tokens
                               (the sequence laid out by its StageSpec as in training, MuLan
                               audio tokens of the clip as conditioning; for the MuLan-conditioned
                               stages also with the caption's MuLan text tokens, as at sampling),
                               beside the uniform loss ln(codebook size).
  Read the `systems` table top to bottom: real, (Opus,) codec, +fine, +coarse, +semantic (the full
  pipeline), shuffled; the row where the scores fall is the stage that loses the quality.

Training curves: the stage runs the pipeline was assembled from (pipeline.json's `sources`)
hold the eval scalars written at each evaluated checkpoint (RUN/eval/, train/trainer.py);
report.md plots each stage's eval loss and accuracy over training steps (metrics over
checkpoints), or says why a stage has none (its run folder is missing or has no eval events).

Writes metrics.json, report.md (tables, confusion-matrix and training-curve plots),
training_curves.json and TensorBoard scalars into `out_dir` (musiclm_jax/evaluation/report.py)
and returns the metrics.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import gin
import numpy as np

from musiclm_jax.audio import opus
from musiclm_jax.melody import conditioning as melody_conditioning
from musiclm_jax.evaluation import embedders as embedders_lib  # registers vggish/trill_embedder
from musiclm_jax.evaluation import prompts as prompts_lib

logger = logging.getLogger(__name__)

SAMPLE_RATE = 24000
DEFAULT_DATASET = 'embedded_music/default'
DEFAULT_CLASSIFIER_DIR = 'runs/attribute_classifier'
VOICE_TIMBRES = ('hum', 'whistle')
# The rows of the quality ladder, from the real audio down to the floors.
SYSTEMS = ('real', 'opus_6kbps', 'codec_resynthesis', 'ground_truth_semantic_coarse', 'ground_truth_semantic',
           'generated', 'shuffled_captions', 'noise', 'silence')
# Fewer clips than this: FAD-inf (an extrapolation over subset sizes) is not reported.
FAD_INF_MIN_CLIPS = 50
# `fad_embedders` names: musicnn (MTT 'penultimate'), the pipeline's MuLan audio tower, and the
# SavedModels of embedders.SAVED_MODEL_EMBEDDERS.
FAD_EMBEDDERS = ('musicnn', 'mulan') + tuple(embedders_lib.SAVED_MODEL_EMBEDDERS)
# The pipeline parts whose source runs' eval curves the report plots, and the scalars plotted.
CURVE_PARTS = ('semantic_stage', 'coarse_stage', 'fine_stage')
CURVE_METRICS = ('eval/loss', 'eval/accuracy', 'eval/loss_unconditional',
                 'eval/accuracy_unconditional', 'eval/loss/window_start',
                 'eval/loss_unconditional/window_start')


class EvalError(ValueError):
  """A problem with the evaluation's inputs (pipeline folder, dataset, split, length)."""


# ---------------------------------------------------------------------------------------------
# The split.


@dataclasses.dataclass
class SplitClips:
  """The clips of a split with their captions and metadata, sorted by id.

  Attributes:
    audio: float32 clips in [-1, 1], one per example (24 kHz mono).
    examples: {feature: per-clip values} of every other feature (str for text, list of str
      for text sequences, numbers and bools as numpy scalars).
  """
  audio: list[np.ndarray]
  examples: dict[str, list[Any]]

  def __len__(self) -> int:
    return len(self.audio)

  @property
  def captions(self) -> list[str]:
    return list(self.examples['caption'])

  def select(self, indices: Sequence[int]) -> 'SplitClips':
    return SplitClips([self.audio[i] for i in indices],
                      {k: [v[i] for i in indices] for k, v in self.examples.items()})


def _text(value: Any) -> Any:
  if isinstance(value, bytes):
    return value.decode('utf-8')
  if isinstance(value, np.ndarray) and value.dtype == object:
    return [_text(v) for v in value]
  return value


def read_split(dataset: str = DEFAULT_DATASET, split: str = 'test',
               data_dir: Optional[str] = None) -> SplitClips:
  """Every clip of a TFDS split of an audio corpus with a caption, sorted by id.

  Args:
    dataset: TFDS name with config, e.g. 'embedded_music/default' (the corpus must be built:
      `musiclm-jax build_data`).
    split: 'test', 'validation', 'train', or any TFDS split expression.
    data_dir: the TFDS data directory (default ~/tensorflow_datasets).

  Raises:
    EvalError: the dataset is not built, the split unknown, or no clip has a caption.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if dataset.split('/')[0] == 'embedded_music':
    from musiclm_jax.data import embedded_music  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  try:
    builder = tfds.builder(dataset, data_dir=data_dir)
    if not builder.is_prepared():
      raise EvalError(f'dataset {dataset} is not built in {builder.data_dir} (build it with '
                      '`musiclm-jax build_data`, or set data_dir)')
    ds = builder.as_dataset(split=split, shuffle_files=False)
  except EvalError:
    raise
  except (tfds.core.registered.DatasetNotFoundError, ValueError, KeyError,
          AssertionError) as e:
    raise EvalError(f'dataset {dataset} split {split!r}: {str(e).splitlines()[0]}') from e
  audio, columns = [], {}
  for example in tfds.as_numpy(ds):
    if 'caption' not in example or 'audio' not in example:
      raise EvalError(f'dataset {dataset}: examples need audio and caption features, got '
                      f'{sorted(example)}')
    caption = _text(example['caption'])
    if not caption.strip():
      continue  # as in training: a clip without a caption is not a text-to-music example
    wav = np.asarray(example['audio'])
    audio.append(wav.astype(np.float32) / 32768.0 if wav.dtype == np.int16
                 else wav.astype(np.float32))
    for key, value in example.items():
      if key != 'audio':
        columns.setdefault(key, []).append(_text(value))
  if not audio:
    raise EvalError(f'dataset {dataset} split {split!r} has no clip with a caption')
  order = (np.argsort(columns['id'], kind='stable') if 'id' in columns
           else np.arange(len(audio)))
  return SplitClips([audio[i] for i in order], {k: [v[i] for i in order]
                                                 for k, v in columns.items()})


def derangement(n: int, seed: int = 0) -> np.ndarray:
  """A seeded permutation of range(n) without fixed points (one cycle); n >= 2."""
  if n < 2:
    raise ValueError(f'a derangement needs at least 2 items, got {n}')
  order = np.random.default_rng([seed, 1]).permutation(n)
  out = np.empty(n, np.int64)
  out[order] = np.roll(order, -1)  # order[k] takes order[k + 1]'s caption
  return out


# ---------------------------------------------------------------------------------------------
# Batching.


def _in_batches(fn: Callable[[Any], Any], items: Sequence[Any], batch_size: int,
                desc: str = '', progress: bool = False) -> np.ndarray:
  """fn over items in batches of one size (the last padded with its last item, then dropped),
  so a jitted fn compiles once; outputs concatenated."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  n = len(items)
  size = max(1, min(int(batch_size), n))
  outputs = []
  for start in tqdm(range(0, n, size), desc=desc, disable=not progress, dynamic_ncols=True,
                    leave=False):
    index = np.minimum(np.arange(start, start + size), n - 1)
    if isinstance(items, np.ndarray):
      batch = items[index]
    else:
      batch = [items[i] for i in index]
    outputs.append(np.asarray(fn(batch))[:min(size, n - start)])
  return np.concatenate(outputs)


def generate_audio(pipeline, captions: Sequence[str], seconds: float, *, batch_size: int,
                   seed: int = 0, ground_truth: Optional[Mapping[str, np.ndarray]] = None,
                   sampling: Optional[Mapping[str, Any]] = None, desc: str = 'generate',
                   progress: bool = False) -> np.ndarray:
  """float32 [n, samples] audio generated from each caption (one sample each), in batches.

  Batch b is seeded `seed + its first index`, so the same captions and seed give the same
  audio, and runs that differ only in captions or ground truth get the same random draws.

  Args:
    pipeline: a loaded `Pipeline`.
    captions: n prompts.
    seconds: seconds per clip.
    batch_size: prompts per generate call (the last batch is padded to the same shapes).
    seed: the base seed.
    ground_truth: {'semantic_tokens' | 'coarse_tokens': per-caption tokens [n, ...]} given to
      `generate_tokens` instead of generating them.
    sampling: more `generate_tokens` keywords (guidance_scale, temperatures, top_k).
    desc: the progress bar's label.
    progress: show a progress bar.
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  n = len(captions)
  size = max(1, min(int(batch_size), n))
  out = []
  for start in tqdm(range(0, n, size), desc=desc, disable=not progress, dynamic_ncols=True,
                    unit='batch'):
    index = np.minimum(np.arange(start, start + size), n - 1)
    given = {k: np.asarray(v)[index] for k, v in (ground_truth or {}).items()}
    generation = pipeline.generate_tokens([captions[i] for i in index], seconds,
                                          seed=seed + start, **dict(sampling or {}), **given)
    out.append(generation.audio[:min(size, n - start)])
  return np.concatenate(out).astype(np.float32)


def tokenize_clips(pipeline, audio: np.ndarray, batch_size: int, progress: bool = False
                   ) -> tuple[np.ndarray, np.ndarray]:
  """`Pipeline.tokenize_audio` of clips [n, samples] in batches of one shape: (semantic
  [n, frames], codec [n, frames, levels])."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  n = len(audio)
  size = max(1, min(int(batch_size), n))
  semantic, codec = [], []
  for start in tqdm(range(0, n, size), desc='tokenize', disable=not progress,
                    dynamic_ncols=True, leave=False):
    s, c = pipeline.tokenize_audio(audio[np.minimum(np.arange(start, start + size), n - 1)])
    semantic.append(s[:min(size, n - start)])
    codec.append(c[:min(size, n - start)])
  return np.concatenate(semantic), np.concatenate(codec)


# ---------------------------------------------------------------------------------------------
# Teacher-forced stage metrics.


def stage_sequences(pipeline, stage: str, audio: np.ndarray, semantic: np.ndarray,
                    codec: np.ndarray, mulan_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """A stage's training sequences of real clips: (tokens int32 [m, L], loss weights [m, L]).

  Each clip is cut into non-overlapping windows of the stage's training crop (or the whole
  clip when shorter, as training crops a shorter clip); each window is laid out by the stage's
  StageSpec (`flatten`) from the clip's tokens: time-aligned streams from `semantic` / `codec`,
  the MuLan stream from `mulan_tokens`, the melody stream from the melody conditioner on the
  window's audio (looped past the clip's end, as the pipeline does).

  Args:
    pipeline: the loaded `Pipeline`.
    stage: 'semantic', 'coarse' or 'fine'.
    audio: float32 [n, samples] the clips (whole units).
    semantic: int32 [n, frames] their semantic tokens (`Pipeline.tokenize_audio`).
    codec: int32 [n, frames, levels] their codec tokens.
    mulan_tokens: int32 [n, levels] the MuLan tokens to condition on.
  """
  from musiclm_jax.stages.spec import (CODEC_FEATURE, MELODY_FEATURE, MULAN_FEATURE,  # pylint: disable=g-import-not-at-top
                                       SEMANTIC_FEATURE)
  s = pipeline.stages[stage]
  spec, unit = s.spec, s.unit
  clip_units = audio.shape[1] // unit
  window = min(s.units(float(s.record['crop_seconds'])), clip_units)
  if window < 1:
    raise EvalError(f'the {stage} stage: clips of {audio.shape[1]} samples are shorter than one '
                    f'of its frames ({unit} samples)')
  features = {SEMANTIC_FEATURE: semantic[..., None], CODEC_FEATURE: codec}
  tokens, weights = [], []
  for first in range(0, clip_units - window + 1, window):
    a, b = first * unit, (first + window) * unit
    codes = {}
    for stream in spec.streams:
      if stream.time_aligned:
        levels = slice(stream.first_level, stream.first_level + stream.num_levels)
        codes[stream.name] = features[stream.feature][:, a // stream.hop_samples:
                                                      b // stream.hop_samples, levels]
      elif stream.feature == MULAN_FEATURE:
        codes[stream.name] = np.asarray(mulan_tokens, np.int32)
      elif stream.feature == MELODY_FEATURE:
        network = pipeline.melody.network
        length = melody_conditioning.segment_samples(network.window_samples,
                                                     network.hop_samples, stream.frames)
        codes[stream.name] = np.asarray(
            pipeline.melody.tokens(melody_conditioning.looped_segment(audio, a, length)),
            np.int32)
      else:
        raise EvalError(f'the {stage} stage: no tokens for its stream {stream.name!r} '
                        f'({stream.feature})')
    t, w = spec.flatten(codes)
    tokens.append(np.asarray(t, np.int32))
    weights.append(np.asarray(w, np.int32))
  return np.concatenate(tokens), np.concatenate(weights)


def stage_metrics_fn(pipeline, stage: str) -> Callable[[Any, Any], Any]:
  """The stage model's `eval_metrics` on (decoder params, batch), jitted."""
  import jax  # pylint: disable=g-import-not-at-top
  model = pipeline.stages[stage].model
  return jax.jit(lambda params, batch: model.eval_metrics({'model': params}, {}, batch))


def teacher_forced_metrics(pipeline, stage: str, tokens: np.ndarray, weights: np.ndarray, *,
                           batch_size: int = 8,
                           metrics_fn: Optional[Callable[[Any, Any], Any]] = None
                           ) -> dict[str, float]:
  """The stage model's evaluation metrics (StageModel.eval_metrics) over training sequences.

  Args:
    pipeline: the loaded `Pipeline`.
    stage: which stage.
    tokens: int32 [m, L] sequences (`stage_sequences`).
    weights: [m, L] loss weights (1 on the predicted stream).
    batch_size: sequences per call (the last batch padded with weight-0 rows).
    metrics_fn: `stage_metrics_fn(pipeline, stage)` (made here when None; pass one to reuse
      its compilation).

  Returns:
    {metric: mean over predicted tokens}: 'loss', 'accuracy', per level, unconditional.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  s = pipeline.stages[stage]
  metrics_fn = metrics_fn or stage_metrics_fn(pipeline, stage)
  m = tokens.shape[0]
  size = max(1, min(int(batch_size), m))
  sums: dict[str, list[float]] = {}
  for start in range(0, m, size):
    index = np.minimum(np.arange(start, start + size), m - 1)
    t = tokens[index]
    w = weights[index] * (np.arange(start, start + size) < m)[:, None]
    batch = {'decoder_input_tokens': jnp.asarray(np.pad(t[:, :-1], ((0, 0), (1, 0)))),
             'decoder_target_tokens': jnp.asarray(t),
             'decoder_loss_weights': jnp.asarray(w.astype(np.int32))}
    for name, (num, den) in metrics_fn(s.params, batch).items():
      total = sums.setdefault(name, [0.0, 0.0])
      total[0] += float(num)
      total[1] += float(den)
  return {name: (num / den if den else float('nan')) for name, (num, den) in sums.items()}


def teacher_forced_section(pipeline, audio: np.ndarray, semantic: np.ndarray,
                           codec: np.ndarray, mulan_audio: np.ndarray, mulan_text: np.ndarray,
                           *, batch_size: int, progress: bool = False) -> dict[str, Any]:
  """{stage: teacher-forced metrics} on real clips (module docstring, diagnostics)."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  from musiclm_jax.generate.pipeline import STAGES  # pylint: disable=g-import-not-at-top
  from musiclm_jax.stages.spec import MULAN_FEATURE  # pylint: disable=g-import-not-at-top
  out = {}
  for stage in tqdm(STAGES, desc='teacher-forced', disable=not progress, dynamic_ncols=True):
    s = pipeline.stages[stage]
    fn = stage_metrics_fn(pipeline, stage)
    tokens, weights = stage_sequences(pipeline, stage, audio, semantic, codec, mulan_audio)
    result = teacher_forced_metrics(pipeline, stage, tokens, weights, batch_size=batch_size,
                                    metrics_fn=fn)
    # Overall metrics first, then per level in level order (jit returns the keys sorted).
    result = dict(sorted(result.items(), key=lambda kv: (
        '/level_' in kv[0], int(kv[0].rsplit('_', 1)[1]) if '/level_' in kv[0] else 0,
        not kv[0].startswith('loss'))))
    result['uniform_loss'] = math.log(s.spec.target.codebook_size)
    result['sequences'] = int(tokens.shape[0])
    window = min(s.units(float(s.record['crop_seconds'])), audio.shape[1] // s.unit)
    result['window_seconds'] = window * s.unit / SAMPLE_RATE
    if any(c.feature == MULAN_FEATURE for c in s.spec.conditions):
      tokens, weights = stage_sequences(pipeline, stage, audio, semantic, codec, mulan_text)
      text = teacher_forced_metrics(pipeline, stage, tokens, weights, batch_size=batch_size,
                                    metrics_fn=fn)
      result['loss_text_conditioned'] = text['loss']
      result['accuracy_text_conditioned'] = text['accuracy']
    out[stage] = result
  return out


# ---------------------------------------------------------------------------------------------
# Scores.


def _jsonable(value: Any) -> Any:
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.ndarray):
    return _jsonable(value.tolist())
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None if math.isnan(value) else value
  return value


@functools.lru_cache(maxsize=1)
def _mel_and_snr_fn() -> Callable[[Any], Any]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from musiclm_jax.codec import losses  # pylint: disable=g-import-not-at-top

  def fn(pairs):
    reference, estimate = pairs[:, 0], pairs[:, 1]
    return jnp.stack([losses.multi_scale_mel_distance(reference, estimate,
                                                      sample_rate=SAMPLE_RATE),
                      losses.si_snr(reference, estimate)], axis=1)

  return jax.jit(fn)


def mel_distance_and_snr(reference: np.ndarray, estimate: np.ndarray, batch_size: int = 8
                         ) -> dict[str, float]:
  """Mean multi-scale log-mel distance and SI-SNR (codec/losses.py) of paired clips [n, samples].
  """
  scores = _in_batches(_mel_and_snr_fn(), np.stack([reference, estimate], axis=1), batch_size)
  return {'mel_distance': float(np.mean(scores[:, 0])), 'si_snr_db': float(np.mean(scores[:, 1]))}


def melody_section(pipeline, clips: SplitClips, evaluated: SplitClips,
                   generated: np.ndarray, samples: int, *, max_clips: int, seed: int,
                   sampling: Mapping[str, Any], progress: bool = False) -> dict[str, Any]:
  """Melody adherence of melody-conditioned generation (module docstring), or why skipped."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  from musiclm_jax.melody import metrics as melody_metrics  # pylint: disable=g-import-not-at-top
  if not pipeline.has_melody:
    return {'skipped': 'the pipeline\'s semantic stage is not conditioned on melody tokens '
                       '(assemble a pipeline with a melody conditioner and a melody-conditioned '
                       'semantic stage)'}
  timbres = clips.examples.get('timbre')
  if timbres is None:
    return {'skipped': 'the dataset has no timbre feature to find hummed or whistled clips by'}
  voice = [i for i, t in enumerate(timbres) if t in VOICE_TIMBRES][:max_clips]
  if not voice:
    return {'skipped': f'the split has no hummed or whistled clip (timbre in {VOICE_TIMBRES})'}
  eval_timbres = evaluated.examples.get('timbre', [''] * len(evaluated))
  texts = [i for i, t in enumerate(eval_timbres) if t not in VOICE_TIMBRES] or list(
      range(len(evaluated)))
  melody_ids = clips.examples.get('melody_id')
  rows = []
  for j, i in enumerate(tqdm(voice, desc='melody', disable=not progress, dynamic_ncols=True)):
    tune = np.resize(clips.audio[i], samples)  # looped when shorter
    k = texts[j % len(texts)]
    audio = pipeline.generate_tokens(evaluated.captions[k], samples / SAMPLE_RATE, melody=tune,
                                     seed=seed + j, **dict(sampling)).audio[0]
    row = {'id': clips.examples.get('id', [str(i)] * len(clips))[i], 'timbre': timbres[i],
           'caption': evaluated.captions[k],
           'with_melody': melody_metrics.melody_adherence(tune, audio).similarity,
           'text_only': melody_metrics.melody_adherence(tune, generated[k]).similarity}
    if melody_ids is not None:
      same = [p for p, (m, t) in enumerate(zip(melody_ids, timbres))
              if m == melody_ids[i] and t not in VOICE_TIMBRES]
      if same:
        row['real_rendering'] = melody_metrics.melody_adherence(
            tune, np.resize(clips.audio[same[0]], samples)).similarity
    rows.append(row)
  out = {'feature': 'chroma', 'key_invariant': True, 'clips': len(rows),
         'with_melody': float(np.mean([r['with_melody'] for r in rows])),
         'text_only_floor': float(np.mean([r['text_only'] for r in rows]))}
  ceiling = [r['real_rendering'] for r in rows if 'real_rendering' in r]
  out['real_rendering_ceiling'] = (float(np.mean(ceiling)) if ceiling else
                                   'no instrument rendering of these melodies in the split')
  out['per_clip'] = {row.pop('id'): row for row in rows}
  return out


def fad_section(embeddings: Mapping[str, np.ndarray], embedder: Any, real: np.ndarray, *,
                seed: int = 0, fad_inf_min_clips: int = FAD_INF_MIN_CLIPS) -> dict[str, Any]:
  """FAD of every system at equal clip counts, with its floor and anchors (module docstring).

  Args:
    embeddings: {system: [n, d] embeddings, row i of the audio of caption i}; 'real' (the
      real clips) and 'generated' are needed.
    embedder: embeds the noise and silence anchors (`clip_outputs`).
    real: float32 [n, samples] the real clips (the noise takes each one's RMS).
    seed: seeds the halves and the noise.
    fad_inf_min_clips: FAD-inf of all generated clips from this many clips on.

  Returns:
    {'clips_per_set', 'reference', 'real_halves_floor', each system's FAD, 'noise',
    'silence', 'generated_all_clips': {'clips', 'fad'}, 'fad_inf'}, or {'skipped': why}.
  """
  from musiclm_jax.evaluation import frechet  # pylint: disable=g-import-not-at-top
  count, samples = real.shape
  if count < 4:
    return {'skipped': f'{count} clips; FAD at equal counts needs at least 4 (two halves of 2)'}
  rng = np.random.default_rng([seed, 2])
  order = rng.permutation(count)
  half = count // 2
  ref_index, eval_index = order[:half], order[half:2 * half]
  reference = embeddings['real'][ref_index]
  noise = [rng.standard_normal(samples).astype(np.float32) *
           np.float32(np.sqrt(np.mean(real[i].astype(np.float64) ** 2))) for i in eval_index]
  scored = {name: emb[eval_index] for name, emb in embeddings.items()}
  scored['noise'] = embedder.clip_outputs(noise).embeddings
  scored['silence'] = embedder.clip_outputs([np.zeros(samples, np.float32)] * half).embeddings
  out: dict[str, Any] = {
      'clips_per_set': half,
      'reference': (f'real clips of half A ({half} clips); every row: its clips of the other '
                    'half\'s captions')}
  for name in [s for s in SYSTEMS if s in scored]:
    out['real_halves_floor' if name == 'real' else name] = frechet.fad(reference, scored[name])
  out['generated_all_clips'] = {'clips': count, 'fad': frechet.fad(embeddings['real'],
                                                                    embeddings['generated'])}
  if count >= fad_inf_min_clips:
    fit = frechet.fad_infinity_fit(embeddings['real'], embeddings['generated'], seed=seed)
    out['fad_inf'] = {'generated': fit.value, 'r2': fit.r2, 'slope': fit.slope}
  else:
    out['fad_inf'] = {'skipped': f'{count} clips; FAD-inf needs at least {fad_inf_min_clips} '
                                 '(fad_inf_min_clips)'}
  return out


# Names of the attribute rows (system -> row) and back.
_ATTRIBUTE_ROWS = {'real': 'real_ceiling', 'shuffled_captions': 'shuffled_floor'}
_ATTRIBUTE_ROWS_BACK = {v: k for k, v in _ATTRIBUTE_ROWS.items()}


def attributes_section(classifier: Any, audio: Mapping[str, np.ndarray],
                       examples: Mapping[str, Sequence[Any]]
                       ) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, list[str]]]]:
  """Attribute accuracy of every system against the labels of each caption's clip.

  Args:
    classifier: an `attributes.AttributeClassifier` (or anything with `classes` and
      `predict(wavs) -> {attribute: int [n]}`).
    audio: {system: [n, samples] audio, row i of caption i}.
    examples: the clips' metadata columns (`SplitClips.examples`): the labels.

  Returns:
    ({'balanced_accuracy': {row: {attribute: value}}, row: attribute_accuracy's result for
    each system}, confusions {attribute (generated) or 'ATTRIBUTE_real': (matrix, classes)});
    rows are the system names, 'real' as 'real_ceiling', 'shuffled_captions' as
    'shuffled_floor'.
  """
  from musiclm_jax.evaluation import attributes  # pylint: disable=g-import-not-at-top
  labels = attributes.labels_from_examples(examples, classes=classifier.classes)
  section: dict[str, Any] = {'balanced_accuracy': {}}
  confusions = {}
  for name, wavs in audio.items():
    result = attributes.attribute_accuracy(classifier.predict(wavs), labels,
                                           classes=classifier.classes)
    row = _ATTRIBUTE_ROWS.get(name, name)
    section['balanced_accuracy'][row] = {a: r['balanced_accuracy'] for a, r in result.items()}
    section[row] = result
    for attr, r in result.items():
      if name in ('generated', 'real') and 'confusion' in r:
        key = attr if name == 'generated' else f'{attr}_real'
        confusions[key] = (np.asarray(r['confusion']), list(classifier.classes[attr]))
  return section, confusions


# ---------------------------------------------------------------------------------------------
# FAD embedders and training curves.


def embedder_name(embedder: Any) -> str:
  """An embedder's name in the metrics: its `name`, 'musicnn' for musicnn, else its class's."""
  name = getattr(embedder, 'name', None)
  if isinstance(name, str) and name:
    return name
  from musiclm_jax.evaluation import musicnn  # pylint: disable=g-import-not-at-top
  if isinstance(embedder, musicnn.MusicnnEmbedder):
    return 'musicnn'
  return type(embedder).__name__


def _entries(fad_embedders: Any) -> list[Any]:
  if isinstance(fad_embedders, str) or hasattr(fad_embedders, 'clip_outputs'):
    return [fad_embedders]
  return list(fad_embedders or ())


def resolve_fad_embedders(fad_embedders: Any, *, pipeline: Any, musicnn_embedder: Any = None,
                          batch_size: int = 8) -> list[tuple[str, Any]]:
  """(name, embedder) of each entry of `fad_embedders`, loaded; the first is the headline.

  Args:
    fad_embedders: names from FAD_EMBEDDERS ('musicnn', 'mulan', 'vggish', 'trill'), or
      embedder objects (`clip_outputs(wavs)`, see embedders.py), in report order.
    pipeline: the loaded `Pipeline`: 'mulan' embeds with its `mulan` conditioner, the MuLan
      audio tower MCC uses.
    musicnn_embedder: what 'musicnn' names (None: `musicnn.default_embedder()`).
    batch_size: clips per MuLan call.

  Raises:
    EvalError: no entry, an unknown name, a name twice, or a SavedModel embedder without a
      loadable model folder (the message names the binding and the folder).
  """
  entries = _entries(fad_embedders)
  if not entries:
    raise EvalError(f'evaluate_pipeline.fad_embedders is empty: name at least one of '
                    f'{FAD_EMBEDDERS}')
  out: list[tuple[str, Any]] = []
  for entry in entries:
    if isinstance(entry, str):
      name = entry.strip().lower()
      if name == 'musicnn':
        from musiclm_jax.evaluation import musicnn  # pylint: disable=g-import-not-at-top
        embedder = (musicnn.default_embedder() if musicnn_embedder is None
                    else musicnn_embedder)
      elif name == 'mulan':
        embedder = embedders_lib.MulanAudioEmbedder(pipeline.mulan, batch_size=batch_size)
      elif name in embedders_lib.SAVED_MODEL_EMBEDDERS:
        try:
          embedder = embedders_lib.SAVED_MODEL_EMBEDDERS[name]()
        except embedders_lib.EmbedderError as e:
          raise EvalError(f'evaluate_pipeline.fad_embedders names {name!r}: {e}') from e
      else:
        raise EvalError(f'evaluate_pipeline.fad_embedders: unknown embedder {entry!r}; expected '
                        f'one of {FAD_EMBEDDERS} or an object with clip_outputs(wavs)')
    elif hasattr(entry, 'clip_outputs'):
      name, embedder = embedder_name(entry), entry
    else:
      raise EvalError(f'evaluate_pipeline.fad_embedders: {entry!r} ({type(entry).__name__}) is '
                      f'neither a name from {FAD_EMBEDDERS} nor an embedder (clip_outputs)')
    if any(name == n for n, _ in out):
      raise EvalError(f'evaluate_pipeline.fad_embedders names {name!r} twice')
    out.append((name, embedder))
  return out


def fad_summary(section: Mapping[str, Any], dim: Optional[int] = None) -> dict[str, Any]:
  """One embedder's `fad_section` as a table row: each system's FAD, all clips', FAD-inf."""
  if 'skipped' in section:
    return {'skipped': section['skipped']}
  row: dict[str, Any] = {} if dim is None else {'dim': int(dim)}
  row.update({k: v for k, v in section.items() if isinstance(v, float)})
  row['generated_all_clips'] = section['generated_all_clips']['fad']
  if 'generated' in section.get('fad_inf', {}):
    row['fad_inf'] = section['fad_inf']['generated']
  return row


def training_curves(record: Mapping[str, Any], parts: Sequence[str] = CURVE_PARTS,
                    metrics: Sequence[str] = CURVE_METRICS) -> dict[str, Any]:
  """The eval scalars of each part's source run over its checkpoints (module docstring).

  Args:
    record: pipeline.json (its 'sources': {part: the run folder it came from}).
    parts: the parts to read.
    metrics: the scalar tags to read from RUN/eval/ (the trainer's 'eval/...' scalars).

  Returns:
    {part: {tag: [(step, value), ...]}, or a string saying why the part has no curves}.
  """
  from musiclm_jax.evaluation import report  # pylint: disable=g-import-not-at-top
  sources = record.get('sources') or {}
  out: dict[str, Any] = {}
  for part in parts:
    source = sources.get(part)
    if not source:
      out[part] = 'pipeline.json records no source run for this part'
      continue
    eval_dir = os.path.join(source, 'eval')
    if not os.path.isdir(source):
      out[part] = (f'its source run {source} is missing (moved, or the pipeline was assembled '
                   'on another machine)')
    elif not os.path.isdir(eval_dir):
      out[part] = (f'its source {source} has no eval/ folder of TensorBoard events (not a '
                   'training run, or trained without an eval split)')
    else:
      curves = report.read_scalar_curves(eval_dir, tags=metrics)
      out[part] = curves or f'no {", ".join(metrics)} scalars in {eval_dir}'
  return out


# ---------------------------------------------------------------------------------------------
# The evaluation.


def _instrument_labels(examples: Any, classes: Mapping[str, Sequence[str]]) -> np.ndarray:
  """int [n] each clip's lead instrument among classes['instrument'] (-1: another or none)."""
  if not classes['instrument']:
    return np.full(len(next(iter(examples.values()), [])), -1, np.int64)
  from musiclm_jax.evaluation import attributes  # pylint: disable=g-import-not-at-top
  return attributes.labels_from_examples(examples, classes)['instrument']


def _load_classifier(classifier_dir: Optional[str]) -> tuple[Any, Optional[str]]:
  """(AttributeClassifier, None) or (None, why the attribute scores are skipped)."""
  if classifier_dir is None:
    return None, 'classifier_dir=None'
  if not os.path.isdir(classifier_dir):
    return None, (f'no attribute classifier at {classifier_dir} (fit one on real audio: '
                  f'python -m musiclm_jax.evaluation.attributes fit --out_dir={classifier_dir})')
  try:
    from musiclm_jax.evaluation import attributes  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return None, f'musiclm_jax.evaluation.attributes cannot be imported ({e})'
  return attributes.AttributeClassifier.load(classifier_dir), None


@gin.configurable
def evaluate_pipeline(pipeline_dir: str = gin.REQUIRED,
                      out_dir: str = gin.REQUIRED, *,
                      dataset: str = DEFAULT_DATASET,
                      split: str = 'test',
                      data_dir: Optional[str] = None,
                      max_examples: Optional[int] = None,
                      seconds: Optional[float] = None,
                      classifier_dir: Optional[str] = DEFAULT_CLASSIFIER_DIR,
                      batch_size: int = 8,
                      seed: int = 0,
                      diagnostics: bool = True,
                      melody_clips: int = 4,
                      instrument_prompts: int = 8,
                      fad_inf_min_clips: int = FAD_INF_MIN_CLIPS,
                      guidance_scale: Any = None,
                      temperatures: Any = None,
                      top_k: Any = None,
                      mesh_shape: Any = None,
                      progress: bool = True,
                      fad_embedders: Any = ('musicnn',),
                      embedder: Any = None,
                      classifier: Any = None,
                      training_curves_parts: Sequence[str] = CURVE_PARTS) -> dict[str, Any]:
  """Scores a pipeline folder over a corpus split and writes the report (module docstring).

  Args:
    pipeline_dir: the pipeline folder (`musiclm-jax assemble_pipeline`).
    out_dir: where metrics.json, report.md, the plots and TensorBoard scalars go.
    dataset: TFDS name of the corpus ('embedded_music/default'; 'embedded_music/tiny' in
      tests).
    split: the split to score (its clips are sorted by id).
    data_dir: TFDS data directory (default ~/tensorflow_datasets).
    max_examples: score only the first this-many clips (None: all).
    seconds: seconds generated per caption and cut from each real clip (default: the shortest
      clip), rounded down to whole 40 ms units; at least 3 s (one musicnn patch) when
      `fad_embedders` names musicnn without an `embedder` for it.
    classifier_dir: the fitted attribute classifier (attributes.AttributeClassifier); None or
      a missing folder: the attribute scores are skipped, with the reason in the metrics.
    batch_size: captions per generate call (and clips per model call).
    seed: seeds generation, the halves of the FAD split, the caption derangement and noise.
    diagnostics: also score codec resynthesis, ground-truth substitution and teacher forcing.
    melody_clips: hummed / whistled clips of the split used for melody adherence.
    instrument_prompts: prompt for this many of the split's most common lead instruments, two
      prompts each, and score whether the classifier hears the instrument named
      (evaluation/prompts.py; 0: skip).
    fad_inf_min_clips: report FAD-inf only with at least this many clips.
    guidance_scale, temperatures, top_k: sampling overrides (`Pipeline.generate_tokens`);
      default pipeline.json's.
    mesh_shape: sample the stage LMs on a device mesh (`Pipeline.load`), e.g. 'auto'.
    progress: progress bars (stderr).
    fad_embedders: the FAD embedders, the first the headline (module docstring): names from
      FAD_EMBEDDERS ('musicnn'; 'mulan': the pipeline's MuLan audio tower; 'vggish', 'trill':
      local SavedModels, folders bound by `vggish_embedder.saved_model_dir` /
      `trill_embedder.saved_model_dir`) or embedder objects.
    embedder: what 'musicnn' names in `fad_embedders` (default musicnn MTT 'penultimate'):
      anything with `clip_outputs(wavs)` returning `.embeddings` [n, d] and `.tags` [n, tags]
      probabilities (or None: no KLD from it), as `MusicnnEmbedder` does.
    classifier: an attribute classifier to use instead of loading `classifier_dir`.
    training_curves_parts: the pipeline parts whose source runs' eval curves the report plots
      (empty: none).

  Returns:
    The metrics (also in out_dir/metrics.json).

  Raises:
    EvalError: a missing or broken pipeline folder, an unbuilt dataset or unknown split, too
      few clips or seconds; the message names the culprit.
  """
  from musiclm_jax.evaluation import kld  # pylint: disable=g-import-not-at-top
  from musiclm_jax.evaluation import report  # pylint: disable=g-import-not-at-top
  from musiclm_jax.generate.pipeline import Pipeline, PipelineError  # pylint: disable=g-import-not-at-top
  from musiclm_jax.mulan import metrics as mulan_metrics  # pylint: disable=g-import-not-at-top
  started = time.perf_counter()
  timings: dict[str, float] = {}

  def lap(name: str, since: float) -> float:
    now = time.perf_counter()
    timings[name] = round(now - since, 2)
    return now

  # ---- inputs, checked before anything slow
  try:
    pipeline = Pipeline.load(pipeline_dir, mesh_shape=mesh_shape)
  except PipelineError as e:
    raise EvalError(f'pipeline_dir={os.fspath(pipeline_dir)!r}: {e}') from e
  clips = read_split(dataset, split, data_dir)
  count = len(clips) if max_examples is None else min(len(clips), int(max_examples))
  if count < 2:
    raise EvalError(f'{dataset} split {split!r}: {count} clip(s) to score; the shuffled-caption '
                    'floor needs at least 2 (4 for FAD)')
  evaluated = clips.select(range(count))
  unit = pipeline.unit_samples
  shortest = min(len(a) for a in evaluated.audio)
  if seconds is None:
    samples = shortest // unit * unit
  else:
    samples = int(round(float(seconds) * SAMPLE_RATE)) // unit * unit
    if samples > shortest:
      raise EvalError(f'seconds={seconds}: the shortest clip of {dataset}/{split} lasts '
                      f'{shortest / SAMPLE_RATE:g} s')
  from musiclm_jax.evaluation import musicnn  # pylint: disable=g-import-not-at-top
  names_musicnn = any(isinstance(e, str) and e.strip().lower() == 'musicnn'
                      for e in _entries(fad_embedders))
  if (names_musicnn and embedder is None
      and samples < musicnn.min_input_samples(SAMPLE_RATE)):
    raise EvalError(f'seconds={samples / SAMPLE_RATE:g}: musicnn (FAD, KLD) needs clips of at '
                    f'least {musicnn.min_input_samples(SAMPLE_RATE) / SAMPLE_RATE:.2f} s')
  seconds = samples / SAMPLE_RATE
  real = np.stack([a[:samples] for a in evaluated.audio]).astype(np.float32)
  captions = evaluated.captions
  shuffle = derangement(count, seed)
  shuffled = [captions[i] for i in shuffle]
  sampling = {k: v for k, v in (('guidance_scale', guidance_scale),
                                ('temperatures', temperatures), ('top_k', top_k))
              if v is not None}
  fad_embedder_list = resolve_fad_embedders(fad_embedders, pipeline=pipeline,
                                            musicnn_embedder=embedder, batch_size=batch_size)
  headline_name, embedder = fad_embedder_list[0]
  if classifier is None:
    classifier, classifier_skipped = _load_classifier(classifier_dir)
  else:
    classifier_skipped = None
  t = lap('load', started)

  # ---- audio of every system
  audio: dict[str, np.ndarray] = {'real': real}
  gen = dict(batch_size=batch_size, seed=seed, sampling=sampling, progress=progress)
  audio['generated'] = generate_audio(pipeline, captions, seconds, desc='generate', **gen)
  t = lap('generate', t)
  audio['shuffled_captions'] = generate_audio(pipeline, shuffled, seconds,
                                              desc='generate (shuffled captions)', **gen)
  t = lap('generate_shuffled', t)
  metrics: dict[str, Any] = {}
  diagnostics_out: dict[str, Any] = {}
  if diagnostics:
    semantic, codec = tokenize_clips(pipeline, real, batch_size, progress)
    resynthesis = _in_batches(pipeline.decode_audio, codec, batch_size)[:, :samples]
    audio['codec_resynthesis'] = resynthesis
    diagnostics_out['codec_resynthesis'] = {
        'levels': int(codec.shape[2]), **mel_distance_and_snr(real, resynthesis, batch_size)}
    t = lap('codec_resynthesis', t)
    if opus.available():
      # The codec's baseline at the tiny codec's bitrate, on the same clips.
      audio['opus_6kbps'] = np.stack([opus.roundtrip(c, SAMPLE_RATE, 6.0) for c in real])
      diagnostics_out['opus_6kbps'] = mel_distance_and_snr(real, audio['opus_6kbps'], batch_size)
      t = lap('opus', t)
    else:
      diagnostics_out['opus_6kbps'] = {'skipped': 'opusenc / opusdec not installed (Debian '
                                                  'opus-tools)'}
    coarse = pipeline.stages['coarse'].spec.target
    coarse_codes = codec[..., coarse.first_level:coarse.first_level + coarse.num_levels]
    audio['ground_truth_semantic'] = generate_audio(
        pipeline, captions, seconds, desc='generate (ground-truth semantic)',
        ground_truth={'semantic_tokens': semantic}, **gen)
    audio['ground_truth_semantic_coarse'] = generate_audio(
        pipeline, captions, seconds, desc='generate (ground-truth semantic + coarse)',
        ground_truth={'semantic_tokens': semantic, 'coarse_tokens': coarse_codes}, **gen)
    t = lap('generate_ground_truth', t)
    mulan_audio = _in_batches(pipeline.mulan.audio_tokens, real, batch_size)
    mulan_text = _in_batches(pipeline.text_tokens, captions, batch_size)
    diagnostics_out['teacher_forced'] = teacher_forced_section(
        pipeline, real, semantic, codec, mulan_audio, mulan_text, batch_size=batch_size,
        progress=progress)
    t = lap('teacher_forced', t)

  # ---- FAD and KLD (musicnn or fad_embedders), MCC (MuLan), attributes
  anchored = count >= 4  # FAD needs two halves of at least 2 clips
  systems: dict[str, dict[str, Any]] = {
      name: {} for name in SYSTEMS
      if name in audio or (anchored and name in ('noise', 'silence'))}
  all_outputs: dict[str, dict[str, Any]] = {}
  fad_by_embedder: dict[str, Any] = {}
  for index, (ename, e) in enumerate(fad_embedder_list):
    outputs = {name: e.clip_outputs(list(wavs)) for name, wavs in audio.items()}
    all_outputs[ename] = outputs
    fad = fad_section({name: outputs[name].embeddings for name in audio}, e, real,
                      seed=seed, fad_inf_min_clips=fad_inf_min_clips)
    column = 'fad' if index == 0 else f'fad_{ename}'
    for name in systems:
      value = fad.get('real_halves_floor' if name == 'real' else name)
      if isinstance(value, float):
        systems[name][column] = value
    if index == 0:
      metrics['fad'] = fad
    fad_by_embedder[ename] = fad_summary(fad, np.shape(outputs['real'].embeddings)[1])
    t = lap('musicnn' if ename == 'musicnn' else f'embed_{ename}', t)
  if len(fad_embedder_list) > 1:
    metrics['fad_by_embedder'] = fad_by_embedder

  # KLD: tag posteriors of the first embedder that has a classifier.
  no_tags = [n for n, _ in fad_embedder_list if all_outputs[n]['real'].tags is None]
  tagger = next((n for n, _ in fad_embedder_list if n not in no_tags), None)
  if tagger is None:
    metrics['kld'] = {'skipped': f'none of fad_embedders ({", ".join(no_tags)}) gives tag '
                                 'posteriors (no classifier); add musicnn for KLD'}
  else:
    outputs = all_outputs[tagger]
    real_tags = outputs['real'].tags
    kld_out = {name: kld.kl_divergence(real_tags, outputs[name].tags)
               for name in audio if name != 'real'}
    for name, value in kld_out.items():
      systems[name]['kld'] = value
    # A reference scale: real music of other captions (KLD of a real clip to itself is 0).
    kld_out['real_other_clips'] = kld.kl_divergence(real_tags, real_tags[shuffle])
    metrics['kld'] = kld_out

  text_emb = _in_batches(pipeline.mulan.embed_text, captions, batch_size)
  mcc = {}
  for name, wavs in audio.items():
    emb = _in_batches(pipeline.mulan.embed_audio, wavs, batch_size)
    mcc[name] = mulan_metrics.paired_cosine(text_emb, emb)
    systems[name]['mcc'] = mcc[name]
  metrics['mcc'] = {'real_ceiling' if k == 'real' else k: v for k, v in mcc.items()}
  t = lap('mulan', t)

  if classifier is None:
    metrics['attributes'], confusions = {'skipped': classifier_skipped}, {}
  else:
    metrics['attributes'], confusions = attributes_section(classifier, audio,
                                                           evaluated.examples)
    for name, accuracy in metrics['attributes']['balanced_accuracy'].items():
      systems[_ATTRIBUTE_ROWS_BACK.get(name, name)]['attribute_balanced_accuracy'] = (
          float(np.mean(list(accuracy.values()))) if accuracy else None)
  t = lap('attributes', t)

  for name in ('generated', 'shuffled_captions', 'ground_truth_semantic',
               'ground_truth_semantic_coarse'):
    if name in audio:
      systems[name]['mel_distance'] = mel_distance_and_snr(real, audio[name],
                                                           batch_size)['mel_distance']
  if 'codec_resynthesis' in audio:
    systems['codec_resynthesis']['mel_distance'] = (
        diagnostics_out['codec_resynthesis']['mel_distance'])
  if 'opus_6kbps' in audio:
    systems['opus_6kbps']['mel_distance'] = diagnostics_out['opus_6kbps']['mel_distance']

  metrics['melody'] = melody_section(pipeline, clips, evaluated, audio['generated'], samples,
                                     max_clips=melody_clips, seed=seed, sampling=sampling,
                                     progress=progress)
  t = lap('melody', t)

  if classifier is None:
    metrics['instrument_prompts'] = {'skipped': classifier_skipped}
  else:
    instrument_classes = {'instrument': classifier.classes.get('instrument', [])}
    metrics['instrument_prompts'] = prompts_lib.instrument_prompt_section(
        lambda texts: generate_audio(pipeline, texts, seconds, desc='generate (instrument '
                                     'prompts)', **gen),
        classifier,
        _instrument_labels(evaluated.examples, instrument_classes), real,
        instruments=instrument_prompts)
  t = lap('instrument_prompts', t)

  metrics['diagnostics'] = (diagnostics_out if diagnostics
                            else {'skipped': 'diagnostics=False'})
  # The report's order: the quality ladder first, then each score's section.
  metrics = {'systems': systems, **metrics}
  metrics['setup'] = {
      'pipeline_dir': os.path.abspath(os.fspath(pipeline_dir)), 'dataset': dataset,
      'split': split, 'clips': count, 'clips_in_split': len(clips), 'seconds': seconds,
      'seed': seed, 'batch_size': batch_size,
      'sampling': {stage: pipeline.sampling[stage].to_json() for stage in pipeline.sampling},
      'sampling_overrides': sampling,
      'embedder': f'{getattr(embedder, "model", type(embedder).__name__)} '
                  f'{getattr(embedder, "feature", "")}'.strip(),
      'fad_embedders': [n for n, _ in fad_embedder_list],
      'kld': (f'softmax over the {tagger} tag logits, KL(real || system)' if tagger
              else 'skipped'),
      'classifier_dir': classifier_dir,
      'attribute_classes': ({a: ', '.join(c) for a, c in classifier.classes.items()}
                            if classifier is not None else None),
      'shuffled_caption_of': shuffle.tolist()}
  lap('scores', t)
  timings['total'] = round(time.perf_counter() - started, 2)
  metrics['setup']['timings_seconds'] = timings
  metrics = _jsonable(metrics)

  notes = [
      f'{count} clips of {seconds:g} s from {dataset} split {split!r}, one generation per '
      'caption.',
      'FAD is biased upward at small sample sizes (roughly a constant over N): compare only '
      'numbers computed at the same clip count, i.e. the rows of one table; the real-halves '
      'floor is the best a generator can score at this count.',
      'Shuffled captions: each clip\'s caption replaced by another clip\'s (a fixed '
      'derangement), the floor of the caption-dependent scores (MCC, attributes, KLD).',
      'Quality ladder (systems): real -> codec resynthesis -> ground-truth semantic + coarse '
      '(fine generated) -> ground-truth semantic (coarse + fine generated) -> generated (all '
      'stages); the step where the scores fall shows the stage that loses the quality.',
  ]
  for section in ('kld', 'attributes', 'melody', 'instrument_prompts', 'diagnostics'):
    if isinstance(metrics[section], Mapping) and 'skipped' in metrics[section]:
      notes.append(f'{section}: skipped ({metrics[section]["skipped"]}).')
  fad = metrics['fad']
  if isinstance(fad.get('fad_inf'), Mapping) and 'skipped' in fad['fad_inf']:
    notes.append(f'FAD-inf: skipped ({fad["fad_inf"]["skipped"]}).')
  if len(fad_embedder_list) > 1:
    notes.append(f'FAD embedders: {", ".join(n for n, _ in fad_embedder_list)}; the first '
                 f'({headline_name}) gives the systems table\'s fad column, each other one a '
                 'fad_NAME column; fad_by_embedder has them all side by side.')
  if tagger is not None and no_tags:
    notes.append(f'KLD: from {tagger}\'s tag posteriors; {", ".join(no_tags)} give no tag '
                 'posteriors (no classifier), so no KLD of theirs.')
  # Each part's curves, or why it has none (report.md's training-curves section says which).
  curves = training_curves(pipeline.record, parts=training_curves_parts)
  os.makedirs(out_dir, exist_ok=True)
  path = report.write_report(
      out_dir, metrics,
      title=f'Pipeline evaluation: {os.path.basename(os.path.abspath(pipeline_dir))} on '
            f'{dataset} {split}',
      confusions=confusions, notes=notes, training_curves=curves)
  logger.info('evaluate_pipeline: wrote %s', path)
  print(f'evaluate_pipeline: wrote {path}')
  return metrics
