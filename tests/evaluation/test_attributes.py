"""The attribute classifier of the embedded corpus: labels, accuracy, softmax heads, save/load."""
import json
import os

import numpy as np
import pytest

from musiclm_jax.evaluation import attributes

CLASSES = attributes.CLASSES


def example(**fields):
  base = {'instruments': [b'violin', b'cello'], 'tempo_bpm': np.float32(100.0),
          'key_tonic': b'D', 'mode': b'major', 'drums': np.bool_(False), 'dynamics': b'soft'}
  base.update(fields)
  return base


def test_class_lists():
  assert len(CLASSES['instrument']) == 37 and len(set(CLASSES['instrument'])) == 37
  assert CLASSES['instrument'][:2] == ('piano', 'harpsichord')
  assert CLASSES['instrument'][-2:] == ('humming', 'whistling')
  assert CLASSES['tempo'] == ('slow', 'medium', 'fast')
  assert len(CLASSES['key']) == 24 and CLASSES['key'][0] == 'C major'
  assert CLASSES['key'][12 + 9] == 'A minor' and CLASSES['key'][1] == 'Db major'
  assert attributes.ATTRIBUTES == ('instrument', 'tempo', 'key', 'mode', 'drums', 'dynamics')


def test_labels_from_examples():
  examples = [
      example(),
      example(instruments=['humming'], tempo_bpm=79.9, key_tonic='A#', mode='major',
              drums=False, dynamics='loud'),
      example(instruments=[b'whistling'], tempo_bpm=80.0, key_tonic=b'C#', mode=b'minor',
              drums=True, dynamics=b'medium'),
      example(instruments=['theremin'], tempo_bpm=116.0, key_tonic='H', mode='minor'),
      example(instruments=[], tempo_bpm=float('nan'), key_tonic='Gb', mode='dorian'),
  ]
  labels = attributes.labels_from_examples(examples)
  index = lambda attr, name: CLASSES[attr].index(name)
  np.testing.assert_array_equal(labels['instrument'], [
      index('instrument', 'violin'), index('instrument', 'humming'),
      index('instrument', 'whistling'), -1, -1])
  np.testing.assert_array_equal(labels['tempo'], [1, 0, 1, 2, -1])
  np.testing.assert_array_equal(labels['key'], [
      index('key', 'D major'), index('key', 'Bb major'), index('key', 'C# minor'), -1, -1])
  np.testing.assert_array_equal(labels['mode'], [0, 0, 1, 1, -1])
  np.testing.assert_array_equal(labels['drums'], [0, 0, 1, 0, 0])
  np.testing.assert_array_equal(labels['dynamics'], [0, 2, 1, 0, 0])
  assert all(v.dtype == np.int64 for v in labels.values())
  # A dict of columns gives the same; a subset of attributes reads only their fields.
  columns = {k: [e[k] for e in examples] for k in examples[0]}
  for name, value in attributes.labels_from_examples(columns).items():
    np.testing.assert_array_equal(value, labels[name])
  only_drums = attributes.labels_from_examples([{'drums': True}], {'drums': ('no', 'yes')})
  assert list(only_drums) == ['drums'] and only_drums['drums'].tolist() == [1]


def test_labels_errors_and_key_names():
  assert attributes.key_class('A#', 'major') == 'Bb major'
  assert attributes.key_class('Cb', 'major') == 'B major'
  assert [attributes.pitch_class(t) for t in ('C', 'B#', 'E-', 'F##', 'Fb')] == [0, 0, 3, 7, 4]
  with pytest.raises(ValueError, match="tonic 'X'"):
    attributes.pitch_class('X')
  with pytest.raises(ValueError, match="example 0: no field 'tempo_bpm'"):
    attributes.labels_from_examples([{'instruments': ['piano']}])
  with pytest.raises(ValueError, match='no label rule'):
    attributes.labels_from_examples([example()], {'genre': ('folk',)})
  with pytest.raises(ValueError, match='different lengths'):
    attributes.labels_from_examples({'drums': [True], 'mode': ['major', 'minor']},
                                    {'drums': ('no', 'yes')})


def test_attribute_accuracy_by_hand():
  labels = {'tempo': np.array([0, 0, 1, 2, -1])}
  predicted = {'tempo': np.array([0, 1, 1, 0, 2])}
  result = attributes.attribute_accuracy(predicted, labels)['tempo']
  # Labelled clips: (0, 0) right, (0, 1), (1, 1) right, (2, 0); recalls 1/2, 1, 0.
  assert result['n'] == 4 and result['num_classes'] == 3
  assert result['accuracy'] == 0.5
  assert result['balanced_accuracy'] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
  assert result['majority_chance'] == 0.5 and result['uniform_chance'] == pytest.approx(1 / 3)
  assert result['confusion'] == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]
  # Probabilities are argmaxed; their width sets the number of classes.
  probs = np.eye(4)[[0, 1, 1, 0, 2]] * 0.7 + 0.075
  from_probs = attributes.attribute_accuracy({'x': probs}, {'x': labels['tempo']})['x']
  assert from_probs['accuracy'] == 0.5 and from_probs['num_classes'] == 4
  assert from_probs['confusion'][1] == [0, 1, 0, 0]
  # classes= sets C; only absent classes do not count in the balanced accuracy.
  wide = attributes.attribute_accuracy(predicted, labels, classes={'tempo': 'abcde'})['tempo']
  assert wide['num_classes'] == 5 and wide['balanced_accuracy'] == result['balanced_accuracy']
  empty = attributes.attribute_accuracy({'drums': np.array([1])}, {'drums': np.array([-1])})
  assert empty['drums']['n'] == 0 and np.isnan(empty['drums']['accuracy'])


def test_attribute_accuracy_errors():
  y = {'drums': np.array([0, 1])}
  with pytest.raises(ValueError, match="predicted has no 'drums'"):
    attributes.attribute_accuracy({}, y)
  with pytest.raises(ValueError, match='drums: 3 predictions for 2 labels'):
    attributes.attribute_accuracy({'drums': np.array([0, 1, 1])}, y)
  with pytest.raises(ValueError, match=r"labels\['drums'\]: indices must lie in \[-1, 2\)"):
    attributes.attribute_accuracy({'drums': np.array([0, 1])}, {'drums': np.array([0, 2])})
  with pytest.raises(ValueError, match=r"labels\['drums'\]: expected int"):
    attributes.attribute_accuracy({'drums': np.array([0, 1])}, {'drums': np.array([0.0, 1.0])})
  with pytest.raises(ValueError, match=r"predicted\['drums'\]: indices must lie"):
    attributes.attribute_accuracy({'drums': np.array([0, 5])}, y)


def test_fit_softmax_separable_and_absent_classes():
  rng = np.random.default_rng(0)
  centres = np.array([[3.0, 0.0], [0.0, 3.0], [-3.0, -3.0]])
  y = np.repeat([0, 2, 3], 20)   # class 1 never occurs
  x = centres[[0, 1, 2]][np.repeat([0, 1, 2], 20)] + rng.normal(0, 0.5, (60, 2))
  weights, bias = attributes.fit_softmax(x, y, 4, l2=1e-3)
  assert weights.shape == (2, 4) and bias.shape == (4,)
  assert bias[1] == -np.inf and not weights[:, 1].any()
  probs = attributes._softmax_rows(x @ weights + bias)
  assert (probs[:, 1] == 0).all()
  np.testing.assert_allclose(probs.sum(axis=1), 1.0)
  assert (np.argmax(probs, axis=1) == y).all()
  again = attributes.fit_softmax(x, y, 4, l2=1e-3)
  np.testing.assert_array_equal(again[0], weights)  # deterministic


def test_fit_softmax_matches_sklearn():
  sklearn_linear = pytest.importorskip('sklearn.linear_model')
  rng = np.random.default_rng(1)
  x = rng.normal(size=(80, 5))
  y = np.argmax(x[:, :3] + rng.normal(0, 0.7, (80, 3)), axis=1)
  l2 = 0.05
  weights, bias = attributes.fit_softmax(x, y, 3, l2=l2)
  # sklearn minimises C * sum(CE) + |W|^2 / 2, i.e. ours with l2 = 1 / (C n).
  model = sklearn_linear.LogisticRegression(C=1.0 / (l2 * len(y)), tol=1e-10, max_iter=5000)
  model.fit(x, y)
  np.testing.assert_allclose(attributes._softmax_rows(x @ weights + bias),
                             model.predict_proba(x), atol=2e-4)


def test_chroma_heads_are_transposition_equivariant():
  rng = np.random.default_rng(2)
  profile = np.array([6.4, 2.2, 3.5, 2.3, 4.4, 4.1, 2.5, 5.2, 2.4, 3.7, 2.3, 2.9])  # major
  tonics = rng.integers(0, 12, 40)
  chroma = np.stack([np.roll(profile, t) for t in tonics]) + rng.uniform(0, 1.5, (40, 12))
  features = {'chroma': chroma / chroma.sum(axis=1, keepdims=True)}
  head = attributes.fit_head('key', features, tonics.astype(np.int64), 24, ('chroma',), 0.01)
  assert head.rotate
  probs = head.predict_proba(features)
  assert np.mean(np.argmax(probs, axis=1) == tonics) > 0.9
  shifted = head.predict_proba({'chroma': np.roll(features['chroma'], 5, axis=1)})
  # Up 5 semitones: the major keys' probabilities move up by 5.
  np.testing.assert_allclose(shifted[:, :12], np.roll(probs[:, :12], 5, axis=1), atol=2e-3)


@pytest.fixture(scope='module')
def fitted(tiny_corpus_dir, tmp_path_factory):
  """A classifier fitted on the tiny corpus's train split (12 clips of 4 s), and its dir."""
  out_dir = str(tmp_path_factory.mktemp('attribute_classifier') / 'classifier')
  classifier = attributes.fit_attribute_classifier(
      out_dir, config='tiny', data_dir=tiny_corpus_dir, validation_split='validation',
      l2_grid=(0.01, 1.0))
  return classifier, out_dir


def test_fit_on_tiny_corpus_beats_chance_on_its_training_data(fitted):
  classifier, out_dir = fitted
  assert classifier.attributes == attributes.ATTRIBUTES
  record = classifier.record
  assert record['train']['num_clips'] == 12 and record['corpus']['config'] == 'tiny'
  assert set(record['validation']) == set(attributes.ATTRIBUTES)
  for attribute, result in record['train']['accuracy'].items():
    counts = record['train']['class_counts'][attribute]
    if len(counts) > 1:  # something to learn
      assert result['accuracy'] > result['majority_chance'], (attribute, result)
  with open(os.path.join(out_dir, 'classifier.json')) as f:
    assert json.load(f)['format'] == attributes.FORMAT
  assert sorted(os.listdir(out_dir)) == ['classifier.json', 'weights.npz']
  assert not [n for n in os.listdir(os.path.dirname(out_dir)) if n.startswith('.')]


def test_save_load_round_trips_predictions(fitted, tiny_corpus_dir, tmp_path):
  classifier, out_dir = fitted
  loaded = attributes.AttributeClassifier.load(out_dir)
  assert loaded.attributes == classifier.attributes and loaded.classes == classifier.classes
  clips = [e['audio'] for e in attributes.iter_corpus('test', config='tiny',
                                                       data_dir=tiny_corpus_dir)]
  features = classifier.features(clips)
  probs = classifier.predict_proba_from_features(features)
  # From audio (float this time, int16 above), through the saved and loaded weights.
  loaded_probs = loaded.predict_proba(np.stack(clips).astype(np.float32) / 32768.0)
  for attribute in classifier.attributes:
    assert probs[attribute].shape == (len(clips), len(classifier.classes[attribute]))
    np.testing.assert_array_equal(loaded_probs[attribute], probs[attribute])
    np.testing.assert_allclose(probs[attribute].sum(axis=1), 1.0)
  # One clip alone gets the same answer (probabilities up to BLAS rounding).
  predicted = loaded.predict(clips[:1])
  for attribute, value in predicted.items():
    assert value.dtype == np.int64 and value.tolist() == [np.argmax(probs[attribute][0])]
  # Saving again needs overwrite; the copy written with it loads the same.
  with pytest.raises(FileExistsError, match='overwrite'):
    loaded.save(out_dir)
  copy = str(tmp_path / 'copy')
  loaded.save(copy)
  loaded.save(copy, overwrite=True)
  again = attributes.AttributeClassifier.load(copy).predict_proba_from_features(features)
  for attribute in classifier.attributes:
    np.testing.assert_array_equal(again[attribute], probs[attribute])


def test_silence_and_noise_get_finite_probabilities(fitted):
  classifier, _ = fitted
  rng = np.random.default_rng(3)
  clips = [np.zeros(72000, np.float32), rng.normal(0, 0.1, 80000).astype(np.float32)]
  for attribute, probs in classifier.predict_proba(clips).items():
    assert np.isfinite(probs).all(), attribute
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
  # At 16 kHz the clips are resampled to the classifier's 24 kHz.
  at_16k = classifier.predict_proba([clips[1][:48000]], sample_rate=16000)
  assert at_16k['drums'].shape == (1, 2)


def test_fit_and_load_errors(fitted, tmp_path):
  _, out_dir = fitted
  with pytest.raises(FileExistsError, match='exists'):
    attributes.fit_attribute_classifier(out_dir, config='tiny')
  with pytest.raises(ValueError, match='attributes'):
    attributes.fit_attribute_classifier(str(tmp_path / 'x'), attributes=('genre',))
  with pytest.raises(FileNotFoundError, match='classifier.json: not an attribute classifier'):
    attributes.AttributeClassifier.load(str(tmp_path))
  broken = tmp_path / 'broken'
  attributes.AttributeClassifier.load(out_dir).save(str(broken))
  record = json.loads((broken / 'classifier.json').read_text())
  record['heads']['tempo']['features'] = ['chroma']
  (broken / 'classifier.json').write_text(json.dumps(record))
  with pytest.raises(ValueError, match='head tempo arrays have shapes'):
    attributes.AttributeClassifier.load(str(broken))
  record['format'] = 'something else'
  (broken / 'classifier.json').write_text(json.dumps(record))
  with pytest.raises(ValueError, match='format'):
    attributes.AttributeClassifier.load(str(broken))
  with pytest.raises(ValueError, match='shorter than one musicnn patch'):
    attributes.AttributeClassifier.load(out_dir).predict([np.zeros(24000, np.float32)])
  with pytest.raises(ValueError, match='wrap it in a list'):
    attributes.AttributeClassifier.load(out_dir).predict(np.zeros(96000, np.float32))


def test_cli_evaluate_prints_table_and_writes_report(fitted, tiny_corpus_dir, tmp_path, capsys):
  _, out_dir = fitted
  report_dir = str(tmp_path / 'report')
  assert attributes.main(['evaluate', f'--classifier_dir={out_dir}', '--config=tiny',
                          f'--data_dir={tiny_corpus_dir}', '--split=test',
                          f'--out={tmp_path / "result.json"}',
                          f'--report_dir={report_dir}']) == 0
  printed = capsys.readouterr().out
  assert '| attribute | classes | clips | accuracy | majority chance |' in printed
  assert '| instrument | 37 | 2 |' in printed and '| key | 24 | 2 |' in printed
  result = json.loads((tmp_path / 'result.json').read_text())
  assert result['num_clips'] == 2 and len(result['accuracy']['key']['confusion']) == 24
  assert os.path.exists(os.path.join(report_dir, 'plots', 'confusion_instrument.png'))
  assert '| tempo |' in open(os.path.join(report_dir, 'report.md')).read()
