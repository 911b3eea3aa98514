"""Prompts that name one instrument: is that instrument heard in what the pipeline makes?

A user who types "a solo flute melody" must hear a flute. For the lead instruments most common
in the evaluated split (classes of the attribute classifier's instrument head), the pipeline
generates one clip per prompt style, and the classifier names the instrument it hears:

  plain       'a solo flute melody'
  musiccaps   'The recording features a folk tune played on a flute. It is a calm, melodic
              piece of good recording quality.'

Scores (`instrument_prompt_section`, the eval's 'instrument_prompts' section):

  named_accuracy      the share of clips whose predicted instrument is the one their prompt
                      names (overall and per style)
  chance_floor        the share predicted as one given *other* instrument of the set (the mean
                      over the others): what the same clips score against a prompt they did not
                      get, the floor a pipeline that ignores the instrument sits at
  named_probability   the classifier's mean probability of the named instrument, beside
                      other_probability (the mean over the set's other instruments)
  real_accuracy       the classifier on real clips of the split whose lead is one of these
                      instruments (up to `real_per_instrument` each): the ceiling
  predicted           {instrument: {style: the predicted instrument}}
"""
from __future__ import annotations

import collections
from typing import Any, Callable, Sequence

import numpy as np

from musiclm_jax.mulan.metrics import with_article

PROMPT_STYLES = ('plain', 'musiccaps')
_QUALITY = 'It is a calm, melodic piece of good recording quality.'
# The voice "instruments" of the corpus, said the way captions say them.
VOICES = {'humming': 'someone humming', 'whistling': 'someone whistling'}


def instrument_prompt(instrument: str, style: str) -> str:
  """The prompt of `style` (PROMPT_STYLES) that names `instrument` (a class name)."""
  voice = VOICES.get(instrument)
  if style == 'plain':
    return f'{voice} a melody' if voice else f'a solo {instrument} melody'
  if style == 'musiccaps':
    played = (f'{voice} a folk tune' if voice
              else f'a folk tune played on {with_article(instrument)}')
    return f'The recording features {played}. {_QUALITY}'
  raise ValueError(f'style={style!r}: one of {PROMPT_STYLES}')


def most_common_instruments(labels: np.ndarray, classes: Sequence[str], count: int) -> list[str]:
  """The `count` lead instruments most frequent among `labels` (class indices, -1 unknown),
  ties broken by class order."""
  counts = collections.Counter(int(i) for i in labels if i >= 0)
  ranked = sorted(counts, key=lambda i: (-counts[i], i))
  return [classes[i] for i in ranked[:count]]


def instrument_prompt_section(generate: Callable[[Sequence[str]], np.ndarray], classifier,
                              labels: np.ndarray, real: np.ndarray, *, instruments: int = 8,
                              real_per_instrument: int = 4) -> dict[str, Any]:
  """The 'instrument_prompts' section of the eval (module docstring).

  Args:
    generate: prompts -> float32 [len(prompts), samples] audio (the eval's generator, with its
      seconds, seed and sampling).
    classifier: an `attributes.AttributeClassifier` (or anything with `classes` and
      `predict_proba(wavs) -> {attribute: [n, classes]}`), None: skipped.
    labels: int [n] each real clip's lead instrument, an index into
      classifier.classes['instrument'] (-1: not one of them).
    real: float32 [n, samples] the split's clips, row i labelled labels[i].
    instruments: how many of the split's most common lead instruments to prompt for (0: skip).
    real_per_instrument: real clips per instrument for the ceiling.
  """
  if instruments <= 0:
    return {'skipped': 'instrument_prompts=0'}
  if classifier is None:
    return {'skipped': 'no attribute classifier'}
  if 'instrument' not in classifier.classes:
    return {'skipped': 'the attribute classifier has no instrument head'}
  classes = list(classifier.classes['instrument'])
  labels = np.asarray(labels)
  chosen = most_common_instruments(labels, classes, instruments)
  if len(chosen) < 2:
    return {'skipped': f'{len(chosen)} known lead instrument(s) in the split; the chance floor '
                       'needs at least 2'}
  rows = [(name, style) for name in chosen for style in PROMPT_STYLES]
  audio = generate([instrument_prompt(name, style) for name, style in rows])
  probs = np.asarray(classifier.predict_proba(audio)['instrument'], np.float64)
  predicted = np.argmax(probs, axis=1)
  named = np.array([classes.index(name) for name, _ in rows])
  others = [np.array([classes.index(o) for o in chosen if o != name]) for name, _ in rows]
  hit = predicted == named
  section: dict[str, Any] = {
      'instruments': chosen,
      'clips': len(rows),
      'named_accuracy': float(np.mean(hit)),
      'chance_floor': float(np.mean([np.mean(predicted[i] == o) for i, o in enumerate(others)])),
      'named_probability': float(np.mean(probs[np.arange(len(rows)), named])),
      'other_probability': float(np.mean([probs[i, o].mean() for i, o in enumerate(others)])),
      'by_style': {style: float(np.mean([h for h, (_, s) in zip(hit, rows) if s == style]))
                   for style in PROMPT_STYLES},
      'predicted': {name: {style: classes[predicted[i]] for i, (n, style) in enumerate(rows)
                           if n == name} for name in chosen},
      'prompts': {style: instrument_prompt('INSTRUMENT', style) for style in PROMPT_STYLES},
  }
  picks = np.array([i for name in chosen
                    for i in np.flatnonzero(labels == classes.index(name))[:real_per_instrument]])
  real_pred = np.argmax(np.asarray(classifier.predict_proba(real[picks])['instrument']), 1)
  section['real_accuracy'] = float(np.mean(real_pred == labels[picks]))
  section['real_clips'] = int(len(picks))
  return section
