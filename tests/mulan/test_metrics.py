"""MuLan metrics against numpy: corpus-wide recall, zero-shot accuracy and chance, MCC."""
from __future__ import annotations

import numpy as np
import pytest

from musiclm_jax.mulan import metrics


def _brute_ranks(q, k, texts=None):
  q = q / np.linalg.norm(q, axis=1, keepdims=True)
  k = k / np.linalg.norm(k, axis=1, keepdims=True)
  ranks = []
  for i in range(len(q)):
    s = k @ q[i]
    ranks.append(sum(1 for j in range(len(k)) if s[j] > s[i]
                     and (texts is None or texts[j] != texts[i])))
  return np.asarray(ranks)


def test_recall_matches_brute_force_and_chance():
  rng = np.random.default_rng(0)
  audio = rng.normal(size=(40, 6))
  text = audio + rng.normal(size=(40, 6)) * 1.5
  np.testing.assert_array_equal(metrics.retrieval_ranks(audio, text), _brute_ranks(audio, text))
  out = metrics.retrieval_recall(audio, text, ks=(1, 10))
  for k in (1, 10):
    assert out[f'recall@{k}/audio_to_text'] == np.mean(_brute_ranks(audio, text) < k)
    assert out[f'recall@{k}/text_to_audio'] == np.mean(_brute_ranks(text, audio) < k)
  assert out['chance@1'] == 1 / 40 and out['chance@10'] == 10 / 40 and out['num_pairs'] == 40
  assert out['recall@1/text_to_audio'] > out['chance@1']
  perfect = metrics.retrieval_recall(audio, audio * 3.0, ks=(1,))
  assert perfect['recall@1/audio_to_text'] == 1.0 and perfect['recall@1/text_to_audio'] == 1.0


def test_identical_captions_do_not_count_against_each_other():
  audio = np.eye(4)
  text = np.asarray([[1.0, 0, 0, 0], [1.0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
  texts = ['a', 'a', 'b', 'c']
  # Clip 1's caption equals clip 0's: both captions tie, and neither is a miss.
  assert metrics.retrieval_ranks(text, audio, texts).tolist() == [0, 0, 0, 0]
  np.testing.assert_array_equal(metrics.retrieval_ranks(text, audio, texts),
                                _brute_ranks(text, audio, texts))
  assert metrics.retrieval_recall(audio, text, (1,), texts)['recall@1/audio_to_text'] == 1.0


def test_zero_shot_accuracy_and_majority_chance():
  prompts = np.eye(3)  # classes piano, flute, violin
  classes = ['piano', 'flute', 'violin']
  audio = np.asarray([[1, .1, 0], [.9, 0, .2], [0, 1, 0], [0, 0, 1], [1, 0, 0.]])
  labels = ['piano', 'piano', 'flute', 'piano', {'violin', 'piano'}]
  out = metrics.zero_shot_accuracy(audio, prompts, classes, labels)
  assert out['accuracy'] == 4 / 5  # clip 3 wrong (violin predicted, piano true); clip 4 right
  assert out['chance'] == 4 / 5   # 'piano' is right for 4 of 5
  # Per class: piano 3 of its 4 clips right, flute 1 of 1, violin 1 of 1.
  assert out['balanced_accuracy'] == pytest.approx((3 / 4 + 1 + 1) / 3)
  assert out['uniform_chance'] == pytest.approx(6 / 5 / 3)  # mean |labels| / C
  assert out['num_classes'] == 3 and out['num_examples'] == 5
  with pytest.raises(ValueError):
    metrics.zero_shot_accuracy(audio, prompts, classes[:2], labels)


def test_attributes_and_zero_shot_with_a_stand_in_text_embedder():
  examples = {'instruments': [[b'flute'], [b'piano', b'cello'], [b'flute']],
              'tempo_bpm': [60.0, 100.0, 160.0], 'drums': [False, True, False]}
  attrs = metrics.embedded_music_attributes(examples)
  assert attrs['instrument'] == [{'flute'}, {'piano', 'cello'}, {'flute'}]
  assert attrs['drums'] == ['no', 'yes', 'no']
  from musiclm_jax.data.embedded_music.captions import tempo_band
  assert attrs['tempo'] == [tempo_band(t) for t in examples['tempo_bpm']]
  prompts = metrics.attribute_prompts(['cello', 'flute', 'piano'])
  assert 'a solo flute' in prompts['instrument']['flute']
  assert 'slow tempo' in prompts['tempo']['slow'] and 'no drums' in prompts['drums']['no']
  vocab = sorted({p for d in prompts.values() for ps in d.values() for p in ps})
  embed_text = lambda texts: np.stack([np.eye(len(vocab))[vocab.index(t)] for t in texts])
  # Audio that points at one prompt of the right class of every attribute.
  audio = np.stack([embed_text([prompts['instrument'][sorted(i)[0]][1]])[0]
                    + embed_text([prompts['tempo'][t][0]])[0]
                    + embed_text([prompts['drums'][d][0]])[0]
                    for i, t, d in zip(attrs['instrument'], attrs['tempo'], attrs['drums'])])
  out = metrics.zero_shot_attributes(audio, embed_text, attrs, prompts)
  assert {k: v['accuracy'] for k, v in out.items()} == {'instrument': 1.0, 'tempo': 1.0,
                                                        'drums': 1.0}
  assert out['drums']['chance'] == 2 / 3 and out['instrument']['chance'] == 2 / 3


def test_class_embeddings_average_the_prompt_ensemble():
  table = {'a': [1.0, 0.0, 0.0], 'b': [0.0, 2.0, 0.0], 'c': [0.0, 0.0, 1.0]}
  embed_text = lambda texts: np.asarray([table[t] for t in texts])
  got = metrics.class_embeddings(embed_text, [('a', 'b'), 'c'])
  np.testing.assert_allclose(got, [[0.5 ** 0.5, 0.5 ** 0.5, 0.0], [0.0, 0.0, 1.0]], atol=1e-12)
  with pytest.raises(ValueError, match='at least one prompt'):
    metrics.class_embeddings(embed_text, [()])


def test_mcc_scores_matched_pairs_above_shuffled_ones():
  rng = np.random.default_rng(0)
  freqs = {f'a tone at {f} hz': f for f in (220, 330, 440, 550, 660, 770, 880, 990)}
  texts = list(freqs)
  t = np.arange(2400) / 24000
  audio = np.stack([np.sin(2 * np.pi * freqs[x] * t) + 0.3 * rng.normal(size=t.shape)
                    for x in texts]).astype(np.float32)
  bins = np.fft.rfftfreq(len(t), 1 / 24000)
  bands = [(f - 50, f + 50) for f in freqs.values()]

  def embed_audio(a):  # energy in each tone's band
    spec = np.abs(np.fft.rfft(a, axis=-1))
    return np.stack([spec[:, (bins >= lo) & (bins < hi)].sum(-1) for lo, hi in bands], -1)

  def embed_text(xs):  # one-hot of the tone
    return np.stack([np.eye(len(texts))[texts.index(x)] for x in xs])

  matched = metrics.mulan_cycle_consistency(texts, audio, embed_text, embed_audio)
  shuffled = metrics.mulan_cycle_consistency(texts, audio[np.roll(np.arange(8), 3)], embed_text,
                                             embed_audio)
  assert matched > 0.5 > shuffled
  np.testing.assert_allclose(
      matched, np.mean([np.dot(u, v) / np.linalg.norm(u) / np.linalg.norm(v)
                        for u, v in zip(embed_text(texts), embed_audio(audio))]), rtol=1e-6)
  with pytest.raises(ValueError):
    metrics.mulan_cycle_consistency(texts[:3], audio, embed_text, embed_audio)


def test_evaluate_split_on_the_tiny_corpus(tiny_corpus_dir):
  rng = np.random.default_rng(0)
  table: dict[str, np.ndarray] = {}

  def embed_text(xs):
    return np.stack([table.setdefault(x, rng.normal(size=8)) for x in xs])

  out = metrics.evaluate_split(lambda a: np.asarray(a)[:, :8] + 1e-3, embed_text,
                               task='embedded_music_tiny', split='train', clip_samples=2400,
                               tfds_data_dir=tiny_corpus_dir)
  n = out['retrieval']['num_pairs']
  assert n > 0 and out['retrieval']['chance@1'] == 1 / n
  assert set(out['zero_shot']) == {'instrument', 'tempo', 'drums'}
  for v in out['zero_shot'].values():
    assert 0.0 <= v['accuracy'] <= 1.0 and 0.0 < v['chance'] <= 1.0 and v['num_examples'] == n


def test_format_report_puts_each_figure_beside_chance():
  result = {'retrieval': metrics.retrieval_recall(np.eye(4), np.eye(4), ks=(1, 10)),
            'zero_shot': {'drums': {'accuracy': 0.75, 'chance': 0.5, 'num_examples': 4.0,
                                    'num_classes': 2.0, 'balanced_accuracy': 0.7,
                                    'uniform_chance': 0.5}}}
  report = metrics.format_report(result)
  assert '| recall@1 text -> audio | 1.000 | 0.250 |' in report
  assert '| recall@10 audio -> text | 1.000 | 1.000 |' in report
  assert '| zero-shot drums (2 classes) | 0.750 | 0.500 |' in report
  assert '| zero-shot drums, balanced | 0.700 | 0.500 |' in report
