"""MuLan pair data: caption / aspect texts, WordPiece tokens, skipped empty captions, batches."""
from __future__ import annotations

import numpy as np
import pytest
import seqio
import tensorflow as tf

from musiclm_jax.data import seqio_input
from musiclm_jax.mulan import data as mulan_data
from musiclm_jax.mulan.text import WordPieceTokenizer

L = 16


def _examples(captions, aspects):
  return tf.data.Dataset.from_generator(
      lambda: ({'caption': c, 'aspects': np.asarray(a, object).astype(bytes) if a else
                np.zeros([0], bytes), 'id': f'ex{i}'} for i, (c, a) in enumerate(
                    zip(captions, aspects))),
      output_signature={'caption': tf.TensorSpec([], tf.string),
                        'aspects': tf.TensorSpec([None], tf.string),
                        'id': tf.TensorSpec([], tf.string)})


def _texts(ds, aspect_prob, seed=0):
  with seqio.utils.map_seed_manager(seed):
    ds = mulan_data.caption_or_aspects_to_text(ds, aspect_prob=aspect_prob)  # pylint: disable=unexpected-keyword-arg
  ds = mulan_data.tokenize_text(ds, {'text_ids': L, 'text_mask': L})
  return list(ds.as_numpy_iterator())


def test_caption_or_aspects_and_tokens():
  captions = [f'a calm piano melody number {i}' for i in range(40)]
  aspects = [['piano', 'calm', 'slow tempo']] * 39 + [[]]
  tok = WordPieceTokenizer()
  only_captions = _texts(_examples(captions, aspects), 0.0)
  assert [ex['text'].decode() for ex in only_captions] == captions
  only_aspects = _texts(_examples(captions, aspects), 1.0)
  # The last example has no aspects: it keeps its caption.
  assert [ex['text'].decode() for ex in only_aspects] == ['piano, calm, slow tempo'] * 39 + [
      captions[-1]]
  for ex in only_aspects:
    ids, mask = tok.encode([ex['text'].decode()], L)
    assert ex['text_ids'].dtype == np.int32 and ex['text_mask'].dtype == np.int32
    np.testing.assert_array_equal(ex['text_ids'], ids[0])
    np.testing.assert_array_equal(ex['text_mask'], mask[0])
  mixed = _texts(_examples(captions, aspects), 0.5, seed=3)
  again = _texts(_examples(captions, aspects), 0.5, seed=3)
  other = _texts(_examples(captions, aspects), 0.5, seed=4)
  texts = [ex['text'] for ex in mixed]
  assert texts == [ex['text'] for ex in again]  # deterministic per seed
  assert texts != [ex['text'] for ex in other]
  n_aspects = sum(t == b'piano, calm, slow tempo' for t in texts)
  assert 8 <= n_aspects <= 32


def test_empty_captions_are_skipped_and_counted():
  mulan_data.reset_skipped_examples()
  captions = ['a song', '', '   ', 'another song', '\x00\x01']
  out = _texts(_examples(captions, [['aspect']] * 5), 0.0)
  assert [ex['id'] for ex in out] == [b'ex0', b'ex3']
  assert mulan_data.skipped_examples() == {'empty_caption': 3}
  # Aspect text instead of an empty caption: still skipped (the caption is what is checked).
  mulan_data.reset_skipped_examples()
  out = _texts(_examples(['', 'x'], [['piano'], ['piano']]), 1.0)
  assert [ex['id'] for ex in out] == [b'ex1']
  assert mulan_data.skipped_examples() == {'empty_caption': 1}


def test_task_batches_are_what_mulan_model_trains_on(tiny_corpus_dir):
  import tasks.audio  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  n = 4800
  config = seqio_input.DatasetConfig(
      'embedded_music_tiny_mulan', {'audio': n, 'text_ids': L, 'text_mask': L}, batch_size=4,
      tfds_data_dir=tiny_corpus_dir, feature_converter='audio', seed=1)
  batch = next(seqio_input.numpy_batches(seqio_input.get_host_dataset(config)))
  assert sorted(batch) == ['audio', 'text_ids', 'text_mask']
  assert batch['audio'].shape == (4, n) and batch['audio'].dtype == np.float32
  assert batch['text_ids'].shape == (4, L) and batch['text_ids'].dtype == np.int32
  assert batch['text_mask'].shape == (4, L) and batch['text_mask'].dtype == np.int32
  assert np.all(batch['text_mask'][:, 0] == 1) and np.all(batch['text_ids'][:, 0] == 101)
  again = next(seqio_input.numpy_batches(seqio_input.get_host_dataset(config)))
  np.testing.assert_array_equal(batch['text_ids'], again['text_ids'])
  with pytest.raises(ValueError, match='differ'):
    mulan_data.tokenize_text(tf.data.Dataset.range(1), {'text_ids': 8, 'text_mask': 9})
