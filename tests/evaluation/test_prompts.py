"""Prompts that name one instrument (evaluation/prompts.py): prompts, the chosen instruments and
the scores, against a generator and a classifier whose answers are known."""
from __future__ import annotations

import numpy as np
import pytest

from musiclm_jax.evaluation import prompts

CLASSES = ['piano', 'flute', 'oboe', 'humming', 'violin']


class HearsFirstSample:
  """A classifier that hears class round(audio[0]) (one-hot, with a little mass elsewhere)."""
  classes = {'instrument': CLASSES, 'tempo': ['slow', 'fast']}

  def predict_proba(self, wavs):
    wavs = np.asarray(wavs)
    probs = np.full((len(wavs), len(CLASSES)), 0.05)
    probs[np.arange(len(wavs)), np.round(wavs[:, 0]).astype(int)] = 0.8
    return {'instrument': probs, 'tempo': np.full((len(wavs), 2), 0.5)}


def follows(texts):
  """A generator that plays the instrument its prompt names (the first class named)."""
  out = np.zeros((len(texts), 16), np.float32)
  for i, text in enumerate(texts):
    out[i, 0] = next(c for c, name in enumerate(CLASSES) if name in text)
  return out


def test_prompts_name_the_instrument_in_each_style():
  assert prompts.instrument_prompt('flute', 'plain') == 'a solo flute melody'
  assert 'played on an oboe.' in prompts.instrument_prompt('oboe', 'musiccaps')
  assert prompts.instrument_prompt('humming', 'plain') == 'someone humming a melody'
  assert 'features someone humming a folk tune.' in prompts.instrument_prompt('humming',
                                                                              'musiccaps')
  with pytest.raises(ValueError, match="style='poem'"):
    prompts.instrument_prompt('flute', 'poem')
  # Most frequent first, ties in class order, unknown (-1) labels ignored.
  labels = np.array([2, 1, 2, -1, 4, 1, 0, 2])
  assert prompts.most_common_instruments(labels, CLASSES, 3) == ['oboe', 'flute', 'piano']


def test_a_pipeline_that_plays_what_is_named_scores_one_and_one_that_ignores_it_the_floor():
  labels = np.array([1, 1, 2, 0, 2, 1, -1])  # flute x3, oboe x2, piano x1
  real = np.zeros((len(labels), 16), np.float32)
  real[:, 0] = np.maximum(labels, 0)
  real[3, 0] = 2  # the classifier mistakes the real piano for an oboe
  good = prompts.instrument_prompt_section(follows, HearsFirstSample(), labels, real,
                                           instruments=3, real_per_instrument=2)
  assert good['instruments'] == ['flute', 'oboe', 'piano'] and good['clips'] == 6
  assert good['named_accuracy'] == 1.0 and good['chance_floor'] == 0.0
  assert good['by_style'] == {'plain': 1.0, 'musiccaps': 1.0}
  assert good['named_probability'] == pytest.approx(0.8)
  assert good['other_probability'] == pytest.approx(0.05)
  assert good['predicted']['oboe'] == {'plain': 'oboe', 'musiccaps': 'oboe'}
  # Real clips: flute x2, oboe x2, piano x1 (heard as an oboe): 4 of 5.
  assert good['real_clips'] == 5 and good['real_accuracy'] == pytest.approx(0.8)

  def always_flute(texts):
    out = np.zeros((len(texts), 16), np.float32)
    out[:, 0] = 1
    return out

  bad = prompts.instrument_prompt_section(always_flute, HearsFirstSample(), labels, real,
                                          instruments=3)
  # Right only for the flute prompts (2 of 6); for the others, flute is one of 2 other
  # instruments: floor (0 + 0 + 1/2 + 1/2 + 1/2 + 1/2) / 6.
  assert bad['named_accuracy'] == pytest.approx(2 / 6)
  assert bad['chance_floor'] == pytest.approx(2 / 6)


def test_the_section_says_why_it_is_skipped():
  labels = np.array([1, 1])
  real = np.ones((2, 16), np.float32)
  assert 'instrument_prompts=0' in prompts.instrument_prompt_section(
      follows, HearsFirstSample(), labels, real, instruments=0)['skipped']
  assert 'no attribute classifier' in prompts.instrument_prompt_section(
      follows, None, labels, real)['skipped']
  no_head = type('NoHead', (), {'classes': {'tempo': ['slow', 'fast']}})()
  assert 'no instrument head' in prompts.instrument_prompt_section(
      follows, no_head, labels, real)['skipped']
  assert 'needs at least 2' in prompts.instrument_prompt_section(
      follows, HearsFirstSample(), labels, real)['skipped']
