"""The evaluation report: metrics.json, report.md, plots and TensorBoard scalars."""
import json
import os

import numpy as np
import pytest

from musiclm_jax.evaluation import report

METRICS = {
    'fad': 3.25,
    'num_clips': 90,
    'model': 'semantic_stage_tiny',
    'real_audio': {
        'tempo': {'accuracy': 0.8125, 'balanced_accuracy': 0.75, 'n': 16,
                  'confusion': [[5, 1, 0], [0, 4, 2], [0, 0, 4]]},
        'drums': {'accuracy': 0.9375, 'balanced_accuracy': 0.9, 'n': 16},
    },
    'kld': {'softmax': {'mean': 0.123456}, 'bernoulli': 1.5},
}
CONFUSIONS = {'tempo': ([[5, 1, 0], [0, 4, 2], [0, 0, 4]], ['slow', 'medium', 'fast']),
              'drums': (np.array([[7, 1], [0, 8]]), ['no', 'yes'])}
HISTORY = {'generated/accuracy/tempo': [(2000, 0.5), (1000, 0.375), (3000, 0.625)],
           'generated/accuracy/drums': [(1000, 0.6), (3000, 0.7)],
           'fad': [(1000, 9.5), (3000, 4.0)]}


def scalar_events(logdir):
  """({tag: [(step, value)]} of the scalars, all tensor tags) in the event files under logdir."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  accumulator = event_accumulator.EventAccumulator(logdir, size_guidance={'tensors': 0})
  accumulator.Reload()
  tags = accumulator.Tags()['tensors']
  scalars = {}
  for tag in tags:
    events = accumulator.Tensors(tag)
    if all(tf.make_ndarray(e.tensor_proto).ndim == 0 for e in events):
      # By step: two writers' files in one second sort by TF's process-wide file counter as
      # text ('...9.v2' after '...10.v2'), so file order is not write order.
      scalars[tag] = sorted((e.step, float(tf.make_ndarray(e.tensor_proto))) for e in events)
  return scalars, tags


def test_report_writes_every_file_and_tables(tmp_path):
  out = str(tmp_path / 'report')
  path = report.write_report(out, METRICS, title='Text adherence, tiny', step=3000,
                             confusions=CONFUSIONS, history=HISTORY,
                             notes=['90 test captions', 'shuffled captions: the floor'])
  assert path == os.path.join(out, 'report.md')
  with open(os.path.join(out, 'metrics.json')) as f:
    assert json.load(f) == METRICS
  with open(os.path.join(out, 'history.json')) as f:
    history = json.load(f)
  assert history['generated/accuracy/tempo'] == [[1000, 0.375], [2000, 0.5], [3000, 0.625]]
  plots = sorted(os.listdir(os.path.join(out, 'plots')))
  assert plots == ['confusion_drums.png', 'confusion_tempo.png', 'history_fad.png',
                   'history_generated_accuracy.png']
  for name in plots:
    with open(os.path.join(out, 'plots', name), 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert not [n for n in os.listdir(out) if n.startswith('.')]  # no temporary files left

  text = open(path).read()
  assert text.startswith('# Text adherence, tiny\n')
  assert 'Step 3000.' in text and '- shuffled captions: the floor' in text
  assert '| fad | 3.25 |' in text and '| num_clips | 90 |' in text
  assert '| model | semantic_stage_tiny |' in text
  # A mapping of records is one table, a column per key; lists are left to metrics.json.
  assert '| | accuracy | balanced_accuracy | n |' in text
  assert '| tempo | 0.8125 | 0.75 | 16 |' in text and '| drums | 0.9375 | 0.9 | 16 |' in text
  assert '(confusion: in metrics.json)' in text
  assert '### kld' in text and '| bernoulli | 1.5 |' in text and '| softmax | 0.1235 |' in text
  assert '![tempo confusion matrix](plots/confusion_tempo.png)' in text
  assert '![generated/accuracy](plots/history_generated_accuracy.png)' in text
  assert '| step | tempo | drums |' in text and '| 2000 | 0.5 |  |' in text


def test_report_tensorboard_scalars_and_images(tmp_path):
  out = str(tmp_path / 'tb_report')
  report.write_report(out, METRICS, title='t', step=7, confusions=CONFUSIONS)
  report.write_report(out, {'fad': 2.0}, title='t', step=9)
  scalars, tags = scalar_events(os.path.join(out, 'tensorboard'))
  assert scalars['fad'] == [(7, 3.25), (9, 2.0)]
  assert scalars['real_audio/tempo/accuracy'] == [(7, 0.8125)]
  assert scalars['kld/softmax/mean'] == [(7, pytest.approx(0.123456))]
  assert 'model' not in scalars and not any('confusion' in t for t in scalars
                                            if t.startswith('real_audio'))
  images = [t for t in tags if t.startswith('confusion/')]
  assert sorted(images) == ['confusion/drums', 'confusion/tempo']


def test_report_numpy_values_and_no_tensorboard(tmp_path):
  metrics = {'a': np.float32(0.5), 'b': np.int64(3), 'c': np.arange(3), 'd': np.bool_(True),
             'e': float('nan')}
  path = report.write_report(str(tmp_path), metrics, title='numpy', tensorboard=False)
  with open(tmp_path / 'metrics.json') as f:
    loaded = json.load(f)
  assert loaded['a'] == 0.5 and loaded['b'] == 3 and loaded['c'] == [0, 1, 2]
  assert loaded['d'] is True and np.isnan(loaded['e'])
  assert not os.path.exists(tmp_path / 'tensorboard')
  assert not os.path.exists(tmp_path / 'history.json')
  text = open(path).read()
  assert '| a | 0.5 |' in text and '| e | nan |' in text


def test_report_rejects_bad_inputs(tmp_path):
  out = str(tmp_path)
  with pytest.raises(ValueError, match=r"confusions\['tempo'\]: 3 classes in the matrix, 2"):
    report.write_report(out, {}, title='t', confusions={'tempo': (np.eye(3), ['a', 'b'])})
  with pytest.raises(ValueError, match='square'):
    report.write_report(out, {}, title='t', confusions={'x': (np.ones((2, 3)), ['a', 'b'])})
  with pytest.raises(ValueError, match=r"history\['fad'\]\[1\]"):
    report.write_report(out, {}, title='t', history={'fad': [(1, 2.0), (3,)]})
  with pytest.raises(TypeError, match='metrics/a/b: object'):
    report.write_report(out, {'a': {'b': object()}}, title='t')
  with pytest.raises(TypeError, match='JSON keys are strings'):
    report.write_report(out, {1: 2.0}, title='t')
  with pytest.raises(ValueError, match='title'):
    report.write_report(out, {}, title='')
  assert os.listdir(out) == []  # nothing written before the inputs are checked
