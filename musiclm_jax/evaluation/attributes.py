r"""Attribute classifier of the embedded corpus: judges whether audio follows its caption.

Text adherence on `embedded_music` asks whether audio generated from a caption has the
attributes the caption states. This module trains, on the corpus's real train split and
independently of our own models (so that it can judge them), one classifier per attribute:

  attribute   classes
  instrument  the lead instrument (instruments[0]) among the renderer's 35 GM melody
              instruments, plus 'humming' and 'whistling' (the voice timbres, which captions
              name as they name instruments): 37 classes
  tempo       'slow' / 'medium' / 'fast': captions.tempo_band of tempo_bpm (the caption's words)
  key         tonic and mode, 24 classes ('C major' ... 'B minor'; spelled as render.key_name)
  mode        'major' / 'minor': the key head's probabilities summed over tonics (a linear
              head on the chroma cannot tell modes apart once it is transposition-invariant)
  drums       'no' / 'yes'
  dynamics    'soft' / 'medium' / 'loud'

Every clip of the corpus has every attribute, so labels_from_examples gives -1 only for values
outside these classes (an unknown instrument name, a malformed key: logged), which
attribute_accuracy ignores. Hummed and whistled clips are labelled 'humming' / 'whistling'
for instrument and 'no' for drums (they never have drums, and captions say so).

Features (fixed by FeatureConfig, recorded with the classifier), per clip:
  musicnn_*   musicnn's (MTT) 'penultimate' (200), 'max_pool' (753), 'mean_pool' (753) and tag
              probabilities (50), each averaged over the clip's 3 s patches (musicnn.py);
  chroma      librosa chroma_cqt averaged over frames, normalised to sum 1 (12: for the key);
  tempo       the autocorrelation tempogram of the onset strength averaged over frames, read at
              32 log-spaced tempi (8 per octave from 30 BPM), with librosa's global tempo
              estimate, the onset rate and the mean onset strength (35);
  loudness    clip RMS, frame RMS percentiles (10, 50, 90) and peak, in dBFS (5);
  mfcc        mean and standard deviation of 20 MFCCs (40).
Each attribute's head reads the groups in HEAD_FEATURES, chosen on the validation split of the
default corpus (instrument: musicnn penultimate + max_pool + MFCC; tempo: the tempo group;
key: the chroma; drums: musicnn max_pool; dynamics: loudness); musicnn mean_pool and tags are
there for other choices (fit_attribute_classifier's head_features).

Heads: multinomial logistic regression (softmax), features standardised with the training
mean and standard deviation, L2 penalty on the weights, classes weighted inversely to their
training frequency ('balanced', the default), fitted by L-BFGS (scipy) from zeros:
deterministic. The L2 strength of each head is chosen from a grid by balanced accuracy on the
validation split (the test split is never seen). The key head is trained on all 12
transpositions of each clip (chroma rotated, tonic label shifted), which makes it
transposition-equivariant and gives it 12 times the data. Classes that never occur in
training get probability 0.

Saved as a directory (written atomically: a staging folder renamed into place):
  classifier.json   format tag, classes, feature config, heads' feature groups and L2,
                    training statistics, validation accuracy;
  weights.npz       per head '<attr>/mean', '<attr>/std', '<attr>/weights', '<attr>/bias';
                    'mode/marginal' [24, 2] (read with allow_pickle=False).

  python -m musiclm_jax.evaluation.attributes fit --out_dir=runs/attribute_classifier
  python -m musiclm_jax.evaluation.attributes evaluate \
      --classifier_dir=runs/attribute_classifier --split=test

`evaluate` prints per-attribute accuracy and balanced accuracy on real audio (the ceiling of
text adherence) beside majority and uniform chance.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import os
import time
import warnings
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from musiclm_jax.common.tf_setup import quiet_tensorflow
from musiclm_jax.data.embedded_music import captions as captions_lib
from musiclm_jax.data.embedded_music import render as render_lib
from musiclm_jax.data.model_dir import write_directory_atomically
from musiclm_jax.evaluation import musicnn

FORMAT = 'musiclm_jax.attribute_classifier/1'
RECORD_NAME = 'classifier.json'
WEIGHTS_NAME = 'weights.npz'

MODES = ('major', 'minor')
PITCH_CLASSES = 12
CLASSES: dict[str, tuple[str, ...]] = {
    # GM program order (families stay together in confusion matrices), then the voices.
    'instrument': tuple(render_lib.MELODY_INSTRUMENTS[p][0]
                        for p in sorted(render_lib.MELODY_INSTRUMENTS))
                  + (render_lib.HUM_NAME, render_lib.WHISTLE_NAME),
    'tempo': tuple(captions_lib.TEMPO_BANDS),
    'key': tuple(f'{render_lib.key_name(pc, mode)} {mode}' for mode in MODES
                 for pc in range(PITCH_CLASSES)),
    'mode': MODES,
    'drums': ('no', 'yes'),
    'dynamics': tuple(render_lib.DYNAMICS),
}
ATTRIBUTES = tuple(CLASSES)

FEATURE_GROUPS = ('musicnn_penultimate', 'musicnn_max_pool', 'musicnn_mean_pool',
                  'musicnn_tags', 'chroma', 'tempo', 'loudness', 'mfcc')
# Groups whose values rotate with a transposition (the key head's augmentation).
ROTATABLE_GROUPS = ('chroma',)
# Validation accuracy (balanced) of the choices on the default corpus: instrument 0.91 (0.90)
# with penultimate + max_pool + mfcc (max_pool alone 0.90, penultimate alone 0.86, mfcc alone
# 0.78); tempo 0.86 with the tempo group alone (+ max_pool 0.89, within the noise of 90 clips;
# the rhythm features alone are less exposed to a generator's timbre); drums 1.00 with
# max_pool; dynamics 1.00 with loudness; key 0.81 (0.73) with the chroma.
HEAD_FEATURES: dict[str, tuple[str, ...]] = {
    'instrument': ('musicnn_penultimate', 'musicnn_max_pool', 'mfcc'),
    'tempo': ('tempo',),
    'key': ('chroma',),
    'drums': ('musicnn_max_pool',),
    'dynamics': ('loudness',),
}
# Attributes read off another head's probabilities: {attribute: (source, class -> source
# classes)}.
MARGINALS: dict[str, tuple[str, dict[str, tuple[str, ...]]]] = {
    'mode': ('key', {mode: tuple(k for k in CLASSES['key'] if k.endswith(' ' + mode))
                     for mode in MODES}),
}
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)

Audio = Union[np.ndarray, Sequence[np.ndarray]]


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
  """How clip features are computed (saved with the classifier; see the module docstring).

  Attributes:
    sample_rate: the rate the features are computed at (clips at another rate are resampled).
    musicnn_model: 'MTT_musicnn' or 'MSD_musicnn'.
    hop_length: librosa hop for chroma, onsets, RMS and MFCC.
    n_mfcc: MFCC coefficients (their mean and standard deviation are features).
    tempo_min_bpm: the slowest tempo the tempogram is read at.
    tempo_octaves: octaves of tempi above it.
    tempo_bins_per_octave: tempogram readings per octave.
    tempogram_win_length: librosa tempogram window (onset frames).
  """
  sample_rate: int = musicnn.DEFAULT_INPUT_SAMPLE_RATE
  musicnn_model: str = 'MTT_musicnn'
  hop_length: int = 512
  n_mfcc: int = 20
  tempo_min_bpm: float = 30.0
  tempo_octaves: int = 4
  tempo_bins_per_octave: int = 8
  tempogram_win_length: int = 384

  def group_dims(self) -> dict[str, int]:
    return {
        'musicnn_penultimate': musicnn.FEATURE_DIMS['penultimate'],
        'musicnn_max_pool': musicnn.FEATURE_DIMS['max_pool'],
        'musicnn_mean_pool': musicnn.FEATURE_DIMS['mean_pool'],
        'musicnn_tags': len(musicnn.TAGS[self.musicnn_model]),
        'chroma': PITCH_CLASSES,
        'tempo': self.tempo_octaves * self.tempo_bins_per_octave + 3,
        'loudness': 5,
        'mfcc': 2 * self.n_mfcc,
    }


# Features.


def _db(x) -> np.ndarray:
  return 20.0 * np.log10(np.maximum(np.asarray(x, np.float64), 1e-5))


def librosa_features(wav: np.ndarray, config: FeatureConfig,
                     groups: Iterable[str]) -> dict[str, np.ndarray]:
  """The librosa feature groups ('chroma', 'tempo', 'loudness', 'mfcc') of one float clip."""
  import librosa  # pylint: disable=g-import-not-at-top
  groups = set(groups)
  sr, hop = config.sample_rate, config.hop_length
  out = {}
  if 'chroma' in groups:
    with warnings.catch_warnings():  # silence has no tuning to estimate: its chroma is 0
      warnings.filterwarnings('ignore', message='Trying to estimate tuning')
      chroma = librosa.feature.chroma_cqt(y=wav, sr=sr, hop_length=hop).mean(axis=1)
    out['chroma'] = chroma / max(float(chroma.sum()), 1e-8)
  if 'tempo' in groups:
    envelope = librosa.onset.onset_strength(y=wav, sr=sr, hop_length=hop)
    tempogram = librosa.feature.tempogram(onset_envelope=envelope, sr=sr, hop_length=hop,
                                          win_length=config.tempogram_win_length)
    autocorrelation = tempogram.mean(axis=1)
    num_bins = config.tempo_octaves * config.tempo_bins_per_octave
    bpm = config.tempo_min_bpm * 2.0 ** (np.arange(num_bins) / config.tempo_bins_per_octave)
    lags = 60.0 * sr / (hop * bpm)  # onset frames per beat
    readings = np.interp(lags, np.arange(autocorrelation.shape[0]), autocorrelation)
    estimate = float(librosa.feature.rhythm.tempo(onset_envelope=envelope, sr=sr,
                                                  hop_length=hop)[0])
    onsets = librosa.onset.onset_detect(onset_envelope=envelope, sr=sr, hop_length=hop)
    seconds = wav.shape[0] / sr
    out['tempo'] = np.concatenate([readings, [np.log2(max(estimate, 1.0) / 120.0),
                                              len(onsets) / seconds,
                                              float(envelope.mean())]])
  if 'loudness' in groups:
    frames = _db(librosa.feature.rms(y=wav, hop_length=hop)[0])
    out['loudness'] = np.concatenate([
        [_db(np.sqrt(np.mean(np.square(wav, dtype=np.float64))))],
        np.percentile(frames, [10, 50, 90]), [_db(np.max(np.abs(wav)))]])
  if 'mfcc' in groups:
    mfcc = librosa.feature.mfcc(y=wav, sr=sr, n_mfcc=config.n_mfcc, hop_length=hop)
    out['mfcc'] = np.concatenate([mfcc.mean(axis=1), mfcc.std(axis=1)])
  return {k: np.asarray(v, np.float64) for k, v in out.items()}


def extract_features(wavs: Audio, groups: Iterable[str], *,
                     config: FeatureConfig = FeatureConfig(),
                     sample_rate: Optional[int] = None,
                     embedder: Optional[musicnn.MusicnnEmbedder] = None,
                     chunk_clips: int = 32) -> dict[str, np.ndarray]:
  """Feature groups of clips.

  Args:
    wavs: mono clips: an [n, samples] array or a list of 1-D arrays (float in [-1, 1] or
      integer PCM), each at least about 3 s long (musicnn's patch).
    groups: names from FEATURE_GROUPS.
    config: how features are computed.
    sample_rate: the clips' rate (default config.sample_rate); other rates are resampled.
    embedder: a musicnn embedder of config.musicnn_model at config.sample_rate (default: the
      shared one).
    chunk_clips: clips per musicnn call (bounds memory).

  Returns:
    {group: float64 [n, dim]}.
  """
  groups = tuple(dict.fromkeys(groups))
  unknown = [g for g in groups if g not in FEATURE_GROUPS]
  if unknown:
    raise ValueError(f'unknown feature groups {unknown}; expected names from {FEATURE_GROUPS}')
  if isinstance(wavs, np.ndarray) and wavs.ndim == 1:
    raise ValueError('expected a batch of clips ([n, samples] or a list of 1-D arrays), got one '
                     '1-D signal: wrap it in a list')
  clips = [musicnn.to_float_mono(w, f'clip {i}') for i, w in enumerate(wavs)]
  if not clips:
    raise ValueError('no clips')
  rate = int(sample_rate or config.sample_rate)
  if rate != config.sample_rate:
    import librosa  # pylint: disable=g-import-not-at-top
    clips = [librosa.resample(c, orig_sr=rate, target_sr=config.sample_rate, res_type='soxr_hq')
             for c in clips]
  musicnn_groups = [g for g in groups if g.startswith('musicnn_')]
  librosa_groups = [g for g in groups if not g.startswith('musicnn_')]
  columns: dict[str, list[np.ndarray]] = {g: [] for g in groups}
  if musicnn_groups:
    if embedder is None:
      embedder = musicnn.default_embedder(config.musicnn_model,
                                          input_sample_rate=config.sample_rate)
    if embedder.model != config.musicnn_model or (
        embedder.input_sample_rate != config.sample_rate):
      raise ValueError(f'embedder is {embedder.model} at {embedder.input_sample_rate} Hz; the '
                       f'features need {config.musicnn_model} at {config.sample_rate} Hz')
    for start in range(0, len(clips), chunk_clips):
      patches = [musicnn.audio_patches(c, config.sample_rate, name=f'clip {start + i}')
                 for i, c in enumerate(clips[start:start + chunk_clips])]
      bounds = np.cumsum([0] + [p.shape[0] for p in patches])
      outputs = embedder.patch_outputs(np.concatenate(patches))
      for group in musicnn_groups:
        values = outputs[group[len('musicnn_'):]]
        columns[group].extend(values[a:b].astype(np.float64).mean(axis=0)
                              for a, b in zip(bounds[:-1], bounds[1:]))
  if librosa_groups:
    for clip in clips:
      for group, value in librosa_features(clip, config, librosa_groups).items():
        columns[group].append(value)
  dims = config.group_dims()
  out = {}
  for group in groups:
    out[group] = np.stack(columns[group])
    if out[group].shape[1] != dims[group]:
      raise AssertionError(f'{group}: {out[group].shape[1]} features, expected {dims[group]}')
  return out


# Labels.


def _text(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


_NATURALS = {'C': 0, 'D': 2, 'E': 4, 'F': 5, 'G': 7, 'A': 9, 'B': 11}


def pitch_class(tonic: str) -> int:
  """0-11 of a tonic name: 'C', 'F#', 'Bb', 'C##', 'Cb' (any sharps or flats; '-' is flat)."""
  name = tonic.strip()
  if not name or name[0].upper() not in _NATURALS or any(c not in '#b-' for c in name[1:]):
    raise ValueError(f'tonic {tonic!r}: expected a letter A-G and sharps (#) or flats (b)')
  return (_NATURALS[name[0].upper()] + name.count('#') - name.count('b') - name.count('-')) % 12


def key_class(tonic: str, mode: str) -> str:
  """The key class name of a tonic and mode: ('A#', 'major') -> 'Bb major'."""
  if mode not in MODES:
    raise ValueError(f'mode {mode!r}: expected one of {MODES}')
  return f'{render_lib.key_name(pitch_class(tonic), mode)} {mode}'


def _example_rows(examples) -> list[Mapping[str, Any]]:
  """Examples as a list of dicts; a dict of equal-length columns is turned into rows."""
  if isinstance(examples, Mapping):
    lengths = {k: len(v) for k, v in examples.items()}
    if len(set(lengths.values())) > 1:
      raise ValueError(f'examples: columns of different lengths {lengths}')
    n = next(iter(lengths.values()), 0)
    return [{k: v[i] for k, v in examples.items()} for i in range(n)]
  return list(examples)


class _MissingField(ValueError):
  """An example lacks a field an attribute's label needs."""


def _attribute_value(example: Mapping[str, Any], attribute: str, index: int) -> str:
  """The class name of one attribute of one example.

  Raises:
    _MissingField: the example lacks a field the label needs.
    ValueError: a malformed value (a tempo outside every band, a key that does not parse).
  """
  def field(name):
    if name not in example:
      raise _MissingField(f'example {index}: no field {name!r} (needed for the {attribute} '
                          f'label; fields: {sorted(example)})')
    return example[name]

  if attribute == 'instrument':
    instruments = [_text(x) for x in field('instruments')]
    return instruments[0] if instruments else '<no instruments>'
  if attribute == 'tempo':
    return captions_lib.tempo_band(float(field('tempo_bpm')))
  if attribute == 'key':
    return key_class(_text(field('key_tonic')), _text(field('mode')))
  if attribute == 'mode':
    return _text(field('mode'))
  if attribute == 'drums':
    return 'yes' if bool(field('drums')) else 'no'
  if attribute == 'dynamics':
    return _text(field('dynamics'))
  raise AssertionError(attribute)


def labels_from_examples(examples, classes: Optional[Mapping[str, Sequence[str]]] = None
                         ) -> dict[str, np.ndarray]:
  """Class indices of corpus examples' attributes.

  Args:
    examples: embedded_music examples: a sequence of dicts of TFDS fields (tfds.as_numpy; bytes
      or str), or a dict of columns. Fields read: instruments (the first is the lead),
      tempo_bpm, key_tonic and mode, drums, dynamics (only those of the attributes asked for;
      a missing one raises ValueError).
    classes: {attribute: class names} (default CLASSES; a classifier's `.classes`); the
      attributes must be names from ATTRIBUTES.

  Returns:
    {attribute: int64 [n]} indices into classes[attribute]; -1 where the value is not one of
    the classes (an unknown instrument, a key that does not parse, a NaN tempo: logged as a
    warning).
  """
  classes = dict(CLASSES if classes is None else classes)
  unknown_attributes = [a for a in classes if a not in CLASSES]
  if unknown_attributes:
    raise ValueError(f'no label rule for attributes {unknown_attributes}; expected names from '
                     f'{ATTRIBUTES}')
  rows = _example_rows(examples)
  out = {}
  for attribute, names in classes.items():
    index = {name: i for i, name in enumerate(names)}
    labels = np.full(len(rows), -1, np.int64)
    unknown = collections.Counter()
    for i, row in enumerate(rows):
      try:
        value = _attribute_value(row, attribute, i)
      except _MissingField:
        raise
      except ValueError as e:
        value = f'<{e}>'
      if value in index:
        labels[i] = index[value]
      else:
        unknown[value] += 1
    if unknown:
      logging.warning('labels_from_examples: %d examples with %s values outside its classes '
                      '(labelled -1): %s', sum(unknown.values()), attribute,
                      dict(unknown.most_common(5)))
    out[attribute] = labels
  return out


# Metrics.


def attribute_accuracy(predicted: Mapping[str, Any], labels: Mapping[str, Any], *,
                       classes: Optional[Mapping[str, Sequence[str]]] = None
                       ) -> dict[str, dict[str, Any]]:
  """Accuracy of predicted attributes against labels, ignoring -1 labels.

  Args:
    predicted: {attribute: int [n] class indices, or float [n, C] probabilities (argmax taken)}.
    labels: {attribute: int [n]} (labels_from_examples), -1 where not applicable. Every
      attribute of `labels` must be in `predicted`.
    classes: {attribute: class names}: sets the number of classes C (default: the width of the
      probabilities, else CLASSES for a known attribute, else the largest index + 1).

  Returns:
    {attribute: {'accuracy', 'balanced_accuracy' (the mean over the classes present in the
    labels of the recall of each), 'n' (labelled clips), 'num_classes', 'majority_chance' (the
    accuracy of always answering the labels' most common class), 'uniform_chance' (1 / C: the
    expected accuracy and balanced accuracy of uniform guessing), 'confusion' (C x C counts as
    nested lists, rows = true class, columns = predicted)}}. With no labelled clip the rates
    are NaN.
  """
  out = {}
  for attribute, label_values in labels.items():
    if attribute not in predicted:
      raise ValueError(f'predicted has no {attribute!r} (it has {sorted(predicted)})')
    y = np.asarray(label_values)
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.size == 0):
      raise ValueError(f'labels[{attribute!r}]: expected int [n] class indices, got dtype '
                       f'{y.dtype} shape {y.shape}')
    y = y.astype(np.int64)
    p = np.asarray(predicted[attribute])
    num_classes = None
    if p.ndim == 2:
      num_classes = p.shape[1]
      p = np.argmax(p, axis=1) if p.shape[0] else np.zeros(0, np.int64)
    elif p.ndim != 1 or not (np.issubdtype(p.dtype, np.integer) or p.size == 0):
      raise ValueError(f'predicted[{attribute!r}]: expected int [n] indices or [n, C] '
                       f'probabilities, got dtype {p.dtype} shape {p.shape}')
    p = p.astype(np.int64)
    if p.shape[0] != y.shape[0]:
      raise ValueError(f'{attribute}: {p.shape[0]} predictions for {y.shape[0]} labels')
    if classes is not None and attribute in classes:
      num_classes = len(classes[attribute])
    elif num_classes is None:
      num_classes = len(CLASSES[attribute]) if attribute in CLASSES else int(
          max(y.max(initial=-1), p.max(initial=-1)) + 1)
    if y.min(initial=0) < -1 or y.max(initial=-1) >= num_classes:
      raise ValueError(f'labels[{attribute!r}]: indices must lie in [-1, {num_classes}), got '
                       f'[{y.min()}, {y.max()}]')
    keep = y >= 0
    if p[keep].size and (p[keep].min() < 0 or p[keep].max() >= num_classes):
      raise ValueError(f'predicted[{attribute!r}]: indices must lie in [0, {num_classes})')
    y, p = y[keep], p[keep]
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (y, p), 1)
    n = int(y.shape[0])
    present = confusion.sum(axis=1) > 0
    recalls = np.diagonal(confusion)[present] / confusion.sum(axis=1)[present]
    out[attribute] = {
        'accuracy': float(np.mean(y == p)) if n else float('nan'),
        'balanced_accuracy': float(recalls.mean()) if n else float('nan'),
        'n': n,
        'num_classes': int(num_classes),
        'majority_chance': float(confusion.sum(axis=1).max() / n) if n else float('nan'),
        'uniform_chance': 1.0 / num_classes,
        'confusion': confusion.tolist(),
    }
  return out


def markdown_table(accuracy: Mapping[str, Mapping[str, Any]],
                   classes: Optional[Mapping[str, Sequence[str]]] = None) -> str:
  """attribute_accuracy's result as a Markdown table, each rate beside chance."""
  lines = ['| attribute | classes | clips | accuracy | majority chance | balanced accuracy | '
           'uniform chance |', '|---|---:|---:|---:|---:|---:|---:|']
  for attribute, r in accuracy.items():
    num = len(classes[attribute]) if classes and attribute in classes else r['num_classes']
    lines.append(f"| {attribute} | {num} | {r['n']} | {r['accuracy']:.3f} | "
                 f"{r['majority_chance']:.3f} | {r['balanced_accuracy']:.3f} | "
                 f"{r['uniform_chance']:.3f} |")
  return '\n'.join(lines)


# Softmax regression.


def _softmax_rows(logits: np.ndarray) -> np.ndarray:
  shifted = logits - logits.max(axis=1, keepdims=True)
  e = np.exp(shifted)
  return e / e.sum(axis=1, keepdims=True)


def fit_softmax(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float,
                sample_weight: Optional[np.ndarray] = None,
                max_iterations: int = 500) -> tuple[np.ndarray, np.ndarray]:
  """L2-regularised multinomial logistic regression by L-BFGS from zeros (deterministic).

  Minimises sum_i w_i CE(softmax(x_i W + b), y_i) / sum_i w_i + l2 / 2 |W|^2 (the bias is not
  penalised). Classes absent from y get weights 0 and bias -inf (probability 0).

  Args:
    x: float [n, d] (standardised) features.
    y: int [n] labels in [0, num_classes).
    num_classes: C.
    l2: the penalty.
    sample_weight: float [n] (default ones).
    max_iterations: L-BFGS iterations.

  Returns:
    (weights [d, C], bias [C]) in float64.
  """
  from scipy import optimize  # pylint: disable=g-import-not-at-top
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.int64)
  n, d = x.shape
  w = np.ones(n) if sample_weight is None else np.asarray(sample_weight, np.float64)
  w = w / w.sum()
  present = np.unique(y)
  column = np.full(num_classes, -1)
  column[present] = np.arange(present.size)
  k = present.size
  targets = np.zeros((n, k))
  targets[np.arange(n), column[y]] = 1.0

  def loss_and_grad(theta):
    weights = theta[:d * k].reshape(d, k)
    bias = theta[d * k:]
    logits = x @ weights + bias
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = -np.sum(w * np.sum(targets * log_probs, axis=1)) + 0.5 * l2 * np.sum(weights ** 2)
    residual = (np.exp(log_probs) - targets) * w[:, None]
    grad_w = x.T @ residual + l2 * weights
    grad_b = residual.sum(axis=0)
    return loss, np.concatenate([grad_w.ravel(), grad_b])

  result = optimize.minimize(loss_and_grad, np.zeros(d * k + k), jac=True, method='L-BFGS-B',
                             options={'maxiter': max_iterations})
  weights = np.zeros((d, num_classes))
  bias = np.full(num_classes, -np.inf)
  weights[:, present] = result.x[:d * k].reshape(d, k)
  bias[present] = result.x[d * k:]
  return weights, bias


def _balanced_weights(y: np.ndarray) -> np.ndarray:
  counts = collections.Counter(y.tolist())
  return np.asarray([len(y) / (len(counts) * counts[v]) for v in y.tolist()], np.float64)


def _rotate_label(attribute: str, labels: np.ndarray, shift: int) -> np.ndarray:
  """Key labels of clips transposed up by `shift` semitones (the tonic moves)."""
  if attribute != 'key':
    raise ValueError(f'{attribute}: no transposition rule for its labels')
  return (labels // PITCH_CLASSES) * PITCH_CLASSES + (labels % PITCH_CLASSES + shift) % 12


@dataclasses.dataclass
class Head:
  """One attribute's softmax head over its feature groups (standardised).

  Attributes:
    features: feature group names, concatenated in this order.
    mean, std: [d] standardisation of the concatenated features.
    weights: [d, C].
    bias: [C] (-inf for classes absent from training).
    l2: the penalty it was fitted with.
    rotate: whether it was trained on the 12 transpositions of each clip.
  """
  features: tuple[str, ...]
  mean: np.ndarray
  std: np.ndarray
  weights: np.ndarray
  bias: np.ndarray
  l2: float
  rotate: bool = False

  def inputs(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
    x = np.concatenate([np.asarray(features[g], np.float64) for g in self.features], axis=1)
    return (x - self.mean) / self.std

  def predict_proba(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
    return _softmax_rows(self.inputs(features) @ self.weights + self.bias)


def _augmented(attribute: str, features: Mapping[str, np.ndarray], groups: Sequence[str],
               labels: np.ndarray, rotate: bool) -> tuple[np.ndarray, np.ndarray]:
  """The raw training matrix of a head and its labels (12 transpositions if rotate)."""
  if not rotate:
    return np.concatenate([features[g] for g in groups], axis=1), labels
  xs, ys = [], []
  for shift in range(PITCH_CLASSES):
    xs.append(np.concatenate([np.roll(features[g], shift, axis=1) for g in groups], axis=1))
    ys.append(_rotate_label(attribute, labels, shift))
  return np.concatenate(xs), np.concatenate(ys)


def fit_head(attribute: str, features: Mapping[str, np.ndarray], labels: np.ndarray,
             num_classes: int, groups: Sequence[str], l2: float,
             class_weight: Optional[str] = 'balanced') -> Head:
  """A head fitted on the clips with labels >= 0."""
  keep = labels >= 0
  if not keep.any():
    raise ValueError(f'{attribute}: no labelled training clip')
  rotate = attribute == 'key' and all(g in ROTATABLE_GROUPS for g in groups)
  x, y = _augmented(attribute, {g: features[g][keep] for g in groups}, groups, labels[keep],
                    rotate)
  mean = x.mean(axis=0)
  std = x.std(axis=0)
  std = np.where(std > 1e-8 * np.maximum(1.0, np.abs(mean)), std, 1.0)
  if class_weight not in (None, 'balanced'):
    raise ValueError(f"class_weight={class_weight!r}: expected 'balanced' or None")
  weights, bias = fit_softmax((x - mean) / std, y, num_classes, l2,
                              _balanced_weights(y) if class_weight else None)
  return Head(features=tuple(groups), mean=mean, std=std, weights=weights, bias=bias,
              l2=float(l2), rotate=rotate)


@dataclasses.dataclass
class MarginalHead:
  """An attribute read off another head: the source's class probabilities summed in groups.

  Attributes:
    source: the attribute whose head it reads (e.g. 'key').
    matrix: [C_source, C] 0/1: which source classes make up each class (e.g. the 12 major keys
      make 'major').
  """
  source: str
  matrix: np.ndarray

  def predict_proba_from(self, source_probs: np.ndarray) -> np.ndarray:
    return np.asarray(source_probs, np.float64) @ self.matrix


def marginal_head(attribute: str, classes: Sequence[str],
                  source_classes: Sequence[str]) -> MarginalHead:
  """The MARGINALS head of an attribute over its source head's classes."""
  source, groups = MARGINALS[attribute]
  matrix = np.zeros((len(source_classes), len(classes)))
  for j, name in enumerate(classes):
    for member in groups[name]:
      matrix[list(source_classes).index(member), j] = 1.0
  if not np.allclose(matrix.sum(axis=1), 1.0):
    raise AssertionError(f'{attribute}: every {source} class must fall in exactly one class')
  return MarginalHead(source=source, matrix=matrix)


AnyHead = Union[Head, MarginalHead]


# The classifier.


class AttributeClassifier:
  """Softmax heads over musicnn, chroma, tempo, loudness and MFCC features of clips.

  clf = AttributeClassifier.load('runs/attribute_classifier')
  probs = clf.predict_proba(wavs_24k)        # {attribute: [n, C]}
  acc = attribute_accuracy(clf.predict(wavs_24k), clf.labels_from_examples(examples))
  """

  def __init__(self, heads: Mapping[str, AnyHead], classes: Mapping[str, Sequence[str]],
               feature_config: FeatureConfig = FeatureConfig(),
               record: Optional[Mapping[str, Any]] = None):
    missing = [a for a in heads if a not in classes]
    if missing:
      raise ValueError(f'heads {missing} have no classes')
    for attribute, head in heads.items():
      if isinstance(head, MarginalHead) and not isinstance(heads.get(head.source), Head):
        raise ValueError(f'{attribute} is read off {head.source!r}, which has no softmax head')
    self.heads = dict(heads)
    self.classes = {a: list(classes[a]) for a in self.heads}
    self.feature_config = feature_config
    self.record = dict(record or {})
    self._embedder = None

  @property
  def attributes(self) -> tuple[str, ...]:
    return tuple(self.heads)

  @property
  def feature_groups(self) -> tuple[str, ...]:
    return tuple(dict.fromkeys(g for h in self.heads.values() if isinstance(h, Head)
                               for g in h.features))

  def features(self, wavs: Audio, sample_rate: Optional[int] = None) -> dict[str, np.ndarray]:
    """The feature groups the heads read (extract_features)."""
    if self._embedder is None and any(g.startswith('musicnn_') for g in self.feature_groups):
      self._embedder = musicnn.default_embedder(self.feature_config.musicnn_model,
                                                input_sample_rate=self.feature_config.sample_rate)
    return extract_features(wavs, self.feature_groups, config=self.feature_config,
                            sample_rate=sample_rate, embedder=self._embedder)

  def predict_proba_from_features(self, features: Mapping[str, np.ndarray]
                                  ) -> dict[str, np.ndarray]:
    """{attribute: float [n, C]} from extract_features' groups (see predict_proba)."""
    probs = {a: h.predict_proba(features) for a, h in self.heads.items()
             if isinstance(h, Head)}
    for attribute, head in self.heads.items():
      if isinstance(head, MarginalHead):
        probs[attribute] = head.predict_proba_from(probs[head.source])
    return {a: probs[a] for a in self.heads}

  def predict_proba(self, wavs: Audio, sample_rate: Optional[int] = None
                    ) -> dict[str, np.ndarray]:
    """{attribute: float [n, C]} class probabilities of clips.

    Args:
      wavs: mono clips at `sample_rate` (default feature_config.sample_rate, 24 kHz): an
        [n, samples] array or a list of 1-D arrays (float in [-1, 1] or integer PCM), each at
        least about 3 s long.
      sample_rate: their rate, when not the classifier's (they are resampled).
    """
    return self.predict_proba_from_features(self.features(wavs, sample_rate))

  def predict(self, wavs: Audio, sample_rate: Optional[int] = None) -> dict[str, np.ndarray]:
    """{attribute: int64 [n]}: the most probable class of each clip."""
    return {a: np.argmax(p, axis=1).astype(np.int64)
            for a, p in self.predict_proba(wavs, sample_rate).items()}

  def labels_from_examples(self, examples) -> dict[str, np.ndarray]:
    """labels_from_examples with this classifier's classes."""
    return labels_from_examples(examples, self.classes)

  def save(self, out_dir: str, overwrite: bool = False) -> str:
    """Writes classifier.json and weights.npz into out_dir atomically; returns its path."""
    arrays, specs = {}, {}
    for attribute, head in self.heads.items():
      if isinstance(head, MarginalHead):
        arrays[f'{attribute}/marginal'] = np.asarray(head.matrix, np.float64)
        specs[attribute] = {'marginal_of': head.source}
        continue
      for name in ('mean', 'std', 'weights', 'bias'):
        arrays[f'{attribute}/{name}'] = np.asarray(getattr(head, name), np.float64)
      specs[attribute] = {'features': list(head.features), 'l2': head.l2,
                          'rotate': head.rotate, 'dim': int(head.mean.shape[0])}
    record = dict(self.record)
    record.update(format=FORMAT, attributes=list(self.attributes), classes=self.classes,
                  feature_config=dataclasses.asdict(self.feature_config), heads=specs)

    def write(staging):
      with open(os.path.join(staging, WEIGHTS_NAME), 'wb') as f:
        np.savez(f, **arrays)
      with open(os.path.join(staging, RECORD_NAME), 'w', encoding='utf-8') as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.write('\n')

    path = write_directory_atomically(out_dir, write, overwrite=overwrite,
                                      overwrite_hint='overwrite=True (--overwrite)')
    self.record = record
    return path

  @classmethod
  def load(cls, directory: str) -> AttributeClassifier:
    """Reads a directory written by save / fit_attribute_classifier."""
    record_path = os.path.join(directory, RECORD_NAME)
    if not os.path.exists(record_path):
      raise FileNotFoundError(f'{record_path}: not an attribute classifier directory (make one '
                              'with `python -m musiclm_jax.evaluation.attributes fit`)')
    with open(record_path, encoding='utf-8') as f:
      record = json.load(f)
    if record.get('format') != FORMAT:
      raise ValueError(f'{record_path}: format {record.get("format")!r}, expected {FORMAT!r}')
    known = {f.name for f in dataclasses.fields(FeatureConfig)}
    extra = set(record['feature_config']) - known
    if extra:
      raise ValueError(f'{record_path}: unknown feature_config fields {sorted(extra)}')
    config = FeatureConfig(**record['feature_config'])
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    with np.load(weights_path, allow_pickle=False) as data:
      arrays = {k: np.asarray(data[k]) for k in data.files}
    dims = config.group_dims()
    heads = {}
    for attribute in record['attributes']:
      spec = record['heads'][attribute]
      c = len(record['classes'][attribute])
      if 'marginal_of' in spec:
        source = spec['marginal_of']
        matrix = arrays.get(f'{attribute}/marginal')
        expected = (len(record['classes'].get(source, ())), c)
        if matrix is None or matrix.shape != expected:
          raise ValueError(f'{weights_path}: head {attribute} (read off {source!r}) needs a '
                           f'{attribute}/marginal array of shape {expected}, got '
                           f'{None if matrix is None else matrix.shape}')
        heads[attribute] = MarginalHead(source=source, matrix=matrix)
        continue
      try:
        mean, std, weights, bias = (arrays[f'{attribute}/{n}']
                                    for n in ('mean', 'std', 'weights', 'bias'))
      except KeyError as e:
        raise ValueError(f'{weights_path}: missing array {e}') from None
      unknown = [g for g in spec['features'] if g not in dims]
      if unknown:
        raise ValueError(f'{record_path}: head {attribute} reads unknown feature groups '
                         f'{unknown}')
      d = sum(dims[g] for g in spec['features'])
      if mean.shape != (d,) or std.shape != (d,) or weights.shape != (d, c) or (
          bias.shape != (c,)):
        raise ValueError(f'{weights_path}: head {attribute} arrays have shapes {mean.shape}, '
                         f'{std.shape}, {weights.shape}, {bias.shape}; expected ({d},), '
                         f'({d},), ({d}, {c}), ({c},)')
      heads[attribute] = Head(features=tuple(spec['features']), mean=mean, std=std,
                              weights=weights, bias=bias, l2=float(spec['l2']),
                              rotate=bool(spec['rotate']))
    return cls(heads, record['classes'], config, record)


# Corpus.

LABEL_FIELDS = ('id', 'melody_id', 'caption', 'instruments', 'timbre', 'tempo_bpm', 'key_tonic',
                'mode', 'drums', 'dynamics')


def iter_corpus(split: str, *, config: str = 'default', data_dir: Optional[str] = None,
                max_clips: Optional[int] = None, seed: int = 0
                ) -> Iterator[dict[str, Any]]:
  """Examples of an embedded_music split (the dataset must be built), strings decoded.

  Args:
    split: 'train', 'validation' or 'test'.
    config: the builder config ('default', 'tiny', ...).
    data_dir: TFDS data dir (default ~/tensorflow_datasets).
    max_clips: with fewer clips than the split holds, a seeded random subset of this size (in
      the split's order).
    seed: seeds that subset.

  Yields:
    {'audio': int16 [samples], and LABEL_FIELDS}.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from musiclm_jax.data import embedded_music  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  quiet_tensorflow()
  builder = tfds.builder(f'embedded_music/{config}', data_dir=data_dir)
  if split not in builder.info.splits:
    raise ValueError(f'embedded_music/{config} has no split {split!r} (splits: '
                     f'{sorted(builder.info.splits)})')
  total = builder.info.splits[split].num_examples
  chosen = None
  if max_clips is not None:
    if max_clips < 1:
      raise ValueError(f'max_clips={max_clips} must be positive')
    if max_clips < total:
      chosen = set(np.random.default_rng(seed).choice(total, max_clips, replace=False).tolist())
  ds = builder.as_dataset(split=split, shuffle_files=False)
  for i, example in enumerate(tfds.as_numpy(ds)):
    if chosen is not None and i not in chosen:
      continue
    row = {'audio': np.asarray(example['audio'])}
    for name in LABEL_FIELDS:
      value = example[name]
      if isinstance(value, bytes):
        value = value.decode('utf-8')
      elif isinstance(value, np.ndarray) and value.dtype == object:
        value = [_text(v) for v in value]
      elif isinstance(value, np.generic):
        value = value.item()
      row[name] = value
    yield row


def corpus_features(split: str, groups: Sequence[str], *, config: str = 'default',
                    data_dir: Optional[str] = None, max_clips: Optional[int] = None,
                    seed: int = 0, feature_config: FeatureConfig = FeatureConfig(),
                    chunk_clips: int = 64) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
  """Features and metadata (the examples without audio) of an embedded_music split."""
  chunks: list[dict[str, np.ndarray]] = []
  examples: list[dict[str, Any]] = []
  pending: list[np.ndarray] = []

  def flush():
    if pending:
      chunks.append(extract_features(pending, groups, config=feature_config))
      pending.clear()

  for example in iter_corpus(split, config=config, data_dir=data_dir, max_clips=max_clips,
                             seed=seed):
    pending.append(example.pop('audio'))
    examples.append(example)
    if len(pending) >= chunk_clips:
      flush()
  flush()
  if not examples:
    raise ValueError(f'embedded_music/{config} {split}: no clips')
  return {g: np.concatenate([c[g] for c in chunks]) for g in groups}, examples


def fit_attribute_classifier(out_dir: str, *, split: str = 'train',
                             max_clips: Optional[int] = None, data_dir: Optional[str] = None,
                             config: str = 'default',
                             validation_split: Optional[str] = 'validation',
                             validation_max_clips: Optional[int] = None,
                             attributes: Sequence[str] = ATTRIBUTES,
                             head_features: Optional[Mapping[str, Sequence[str]]] = None,
                             l2_grid: Sequence[float] = L2_GRID,
                             class_weight: Optional[str] = 'balanced', seed: int = 0,
                             feature_config: FeatureConfig = FeatureConfig(),
                             overwrite: bool = False) -> AttributeClassifier:
  """Fits the attribute classifier on an embedded_music split and saves it to out_dir.

  Args:
    out_dir: where to write it (atomically; an existing directory only with overwrite).
    split: the training split.
    max_clips: train on a seeded random subset of this many clips (default all).
    data_dir: TFDS data dir (default ~/tensorflow_datasets).
    config: embedded_music config.
    validation_split: the split that picks each head's L2 from l2_grid (by balanced accuracy;
      ties go to the stronger penalty) and on which validation accuracy is reported; None: no
      validation, every head takes the largest L2 of l2_grid (pass a one-value grid).
    validation_max_clips: cap on validation clips.
    attributes: the heads to fit (names from ATTRIBUTES); an attribute of MARGINALS (mode)
      needs its source (key) among them, unless head_features gives it groups of its own.
    head_features: {attribute: feature groups} overriding HEAD_FEATURES.
    l2_grid: the L2 penalties tried.
    class_weight: 'balanced' (weights inverse to class frequency) or None.
    seed: seeds the max_clips subsets.
    feature_config: how features are computed.
    overwrite: replace an existing out_dir.

  Returns:
    The fitted classifier (its record as saved in classifier.json).
  """
  start = time.time()
  unknown = [a for a in attributes if a not in CLASSES]
  if unknown:
    raise ValueError(f'attributes {unknown}: expected names from {ATTRIBUTES}')
  if not l2_grid or any(not l2 > 0 for l2 in l2_grid):
    raise ValueError(f'l2_grid={l2_grid}: expected positive penalties')
  if os.path.exists(out_dir) and not overwrite:
    raise FileExistsError(f'{os.path.abspath(out_dir)} exists; pass overwrite=True '
                          '(--overwrite) to replace it')
  head_features = dict(head_features or {})
  marginals = [a for a in attributes if a in MARGINALS and a not in head_features]
  for attribute in marginals:
    if MARGINALS[attribute][0] not in attributes:
      raise ValueError(f'{attribute} is read off the {MARGINALS[attribute][0]} head: add '
                       f'{MARGINALS[attribute][0]!r} to attributes (or give {attribute} '
                       'head_features of its own)')
  groups_of = {a: tuple(head_features.get(a, HEAD_FEATURES.get(a, ()))) for a in attributes
               if a not in marginals}
  groups = tuple(dict.fromkeys(g for gs in groups_of.values() for g in gs))
  bad = [g for g in groups if g not in FEATURE_GROUPS]
  if bad:
    raise ValueError(f'head_features name unknown groups {bad}; expected {FEATURE_GROUPS}')
  classes = {a: CLASSES[a] for a in attributes}
  train_x, train_examples = corpus_features(split, groups, config=config, data_dir=data_dir,
                                            max_clips=max_clips, seed=seed,
                                            feature_config=feature_config)
  train_y = labels_from_examples(train_examples, classes)
  val_x = val_y = None
  if validation_split:
    val_x, val_examples = corpus_features(validation_split, groups, config=config,
                                          data_dir=data_dir, max_clips=validation_max_clips,
                                          seed=seed, feature_config=feature_config)
    val_y = labels_from_examples(val_examples, classes)
  feature_seconds = time.time() - start

  heads, selection = {}, {}

  def validation_score(attribute, probs):
    score = attribute_accuracy({attribute: probs}, {attribute: val_y[attribute]},
                               classes=classes)[attribute]
    score.pop('confusion')
    return score

  for attribute in groups_of:
    candidates = []
    for l2 in sorted(l2_grid, reverse=True):
      head = fit_head(attribute, train_x, train_y[attribute], len(classes[attribute]),
                      groups_of[attribute], l2, class_weight)
      score = validation_score(attribute, head.predict_proba(val_x)) if val_x is not None else None
      candidates.append((l2, head, score))
      if val_x is None:
        break  # the strongest penalty of the grid
    if val_x is not None:
      # The best balanced accuracy; ties (and NaN) go to the stronger penalty (listed first).
      best = max(range(len(candidates)), key=lambda i: (
          np.nan_to_num(candidates[i][2]['balanced_accuracy'], nan=-1.0), -i))
    else:
      best = 0
    heads[attribute] = candidates[best][1]
    selection[attribute] = {
        'l2': candidates[best][0],
        'validation': candidates[best][2],
        'grid': [{'l2': l2, **({k: s[k] for k in ('accuracy', 'balanced_accuracy')} if s else {})}
                 for l2, _, s in candidates],
    }
  for attribute in marginals:
    source = MARGINALS[attribute][0]
    head = marginal_head(attribute, classes[attribute], classes[source])
    heads[attribute] = head
    score = None
    if val_x is not None:
      score = validation_score(attribute,
                               head.predict_proba_from(heads[source].predict_proba(val_x)))
    selection[attribute] = {'marginal_of': source, 'validation': score}
  heads = {a: heads[a] for a in attributes}
  selection = {a: selection[a] for a in attributes}

  classifier = AttributeClassifier(heads, classes, feature_config)
  train_accuracy = attribute_accuracy(classifier.predict_proba_from_features(train_x), train_y,
                                      classes=classes)
  record = {
      'corpus': {'config': config, 'split': split, 'data_dir': data_dir,
                 'max_clips': max_clips, 'validation_split': validation_split,
                 'validation_max_clips': validation_max_clips, 'seed': seed},
      'train': {
          'num_clips': len(train_examples),
          'num_melodies': len({e['melody_id'] for e in train_examples}),
          'class_counts': {a: {classes[a][c]: int(n) for c, n in sorted(
              collections.Counter(train_y[a][train_y[a] >= 0].tolist()).items())}
                           for a in attributes},
          'accuracy': {a: {k: v for k, v in r.items() if k != 'confusion'}
                       for a, r in train_accuracy.items()},
      },
      'validation': {a: s['validation'] for a, s in selection.items()} if val_x is not None
                    else None,
      'l2_selection': selection,
      'class_weight': class_weight,
      'seconds': {'features': round(feature_seconds, 1),
                  'total': round(time.time() - start, 1)},
  }
  classifier.record = record
  classifier.save(out_dir, overwrite=overwrite)
  return classifier


def evaluate_on_corpus(classifier: AttributeClassifier, split: str = 'test', *,
                       config: str = 'default', data_dir: Optional[str] = None,
                       max_clips: Optional[int] = None, seed: int = 0) -> dict[str, Any]:
  """attribute_accuracy of a classifier on the real audio of a split (the ceiling)."""
  features, examples = corpus_features(split, classifier.feature_groups, config=config,
                                       data_dir=data_dir, max_clips=max_clips, seed=seed,
                                       feature_config=classifier.feature_config)
  predicted = classifier.predict_proba_from_features(features)
  labels = classifier.labels_from_examples(examples)
  return {'accuracy': attribute_accuracy(predicted, labels, classes=classifier.classes),
          'num_clips': len(examples), 'split': split, 'config': config}


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m musiclm_jax.evaluation.attributes',
                                   description=__doc__.split('\n')[0])
  commands = parser.add_subparsers(dest='command', required=True)
  fit = commands.add_parser('fit', help='train on a split and save the classifier')
  fit.add_argument('--out_dir', required=True)
  fit.add_argument('--split', default='train')
  fit.add_argument('--validation_split', default='validation',
                   help="picks each head's L2; 'none' for no validation")
  fit.add_argument('--max_clips', type=int, default=None)
  fit.add_argument('--overwrite', action='store_true')
  evaluate = commands.add_parser('evaluate', help='accuracy on the real audio of a split')
  evaluate.add_argument('--classifier_dir', required=True)
  evaluate.add_argument('--split', default='test')
  evaluate.add_argument('--max_clips', type=int, default=None)
  evaluate.add_argument('--out', default=None, help='also write the result as JSON here')
  evaluate.add_argument('--report_dir', default=None,
                        help='also write a report (report.md, confusion plots, TensorBoard)')
  for sub in (fit, evaluate):
    sub.add_argument('--config', default='default', help='embedded_music config')
    sub.add_argument('--data_dir', default=None,
                     help='TFDS data dir (default: ~/tensorflow_datasets)')
    sub.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  start = time.time()
  if args.command == 'fit':
    validation = None if args.validation_split.lower() == 'none' else args.validation_split
    classifier = fit_attribute_classifier(
        args.out_dir, split=args.split, max_clips=args.max_clips, data_dir=args.data_dir,
        config=args.config, validation_split=validation, seed=args.seed,
        overwrite=args.overwrite)
    record = classifier.record
    print(f"{args.out_dir}: {record['train']['num_clips']} clips, {time.time() - start:.0f} s")
    if record['validation']:
      print(f'Validation ({validation}):')
      print(markdown_table(record['validation'], classifier.classes))
    return 0
  classifier = AttributeClassifier.load(args.classifier_dir)
  result = evaluate_on_corpus(classifier, args.split, config=args.config,
                              data_dir=args.data_dir, max_clips=args.max_clips, seed=args.seed)
  result.update(classifier_dir=args.classifier_dir, seconds=round(time.time() - start, 1))
  print(f"Real audio, embedded_music/{args.config} {args.split}, {result['num_clips']} clips:")
  print(markdown_table(result['accuracy'], classifier.classes))
  if args.out:
    from musiclm_jax.evaluation import report  # pylint: disable=g-import-not-at-top
    report.write_json_atomically(args.out, result)
  if args.report_dir:
    from musiclm_jax.evaluation import report  # pylint: disable=g-import-not-at-top
    metrics = {a: {k: v for k, v in r.items() if k != 'confusion'}
               for a, r in result['accuracy'].items()}
    confusions = {a: (r['confusion'], classifier.classes[a])
                  for a, r in result['accuracy'].items()}
    path = report.write_report(
        args.report_dir, {'real_audio': metrics}, confusions=confusions,
        title=f'Attribute classifier on real audio: embedded_music/{args.config} {args.split}',
        notes=[f"{result['num_clips']} clips; classifier {args.classifier_dir}."])
    print(f'Report: {path}')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
