"""MuLan training data: (audio crop, text) pairs with int32 `text_ids` / `text_mask`.

MusicLM trains MuLan on clips paired with their caption or with their aspect list. The SeqIO
preprocessor `caption_or_aspects_to_text` picks, per example, the caption or (with probability
`aspect_prob`) the example's aspect strings joined with ', ' ("solo flute, slow tempo, calm");
the choice comes from SeqIO's per-example seed, so a task read with the same seed gives the same
texts. `tokenize_text` then tokenizes the text to int32 [L] `text_ids` and `text_mask`, L being
`task_feature_lengths['text_ids']` (default `DEFAULT_TEXT_LENGTH`), with one of two tokenizers:

  - all-MiniLM-L6-v2's WordPiece tokenizer (`musiclm_jax.mulan.text.WordPieceTokenizer`, the
    default: the pretrained text tower's): [CLS] pieces [SEP], 30,522 ids;
  - a SentencePiece `seqio.SentencePieceVocabulary` (`vocabulary=`; the from-scratch text tower,
    musiclm_jax/mulan/vocabulary.py): pieces then EOS (id 1), the vocabulary's ids.

Either way the mask is 1 on real tokens, padding is id 0, and a text longer than L is truncated
(keeping its end token). Use the same tokenizer at inference (`MuLanConditioner` records its own).

Empty captions. An example whose caption is empty (or normalises to nothing, e.g. only control
characters) is dropped. Each drop is counted in this process's `SKIPPED` counter (read it with
`skipped_examples()`; keyed by reason, 'empty_caption') and logged at WARNING with the example's
id (the first `_LOG_FIRST` of them, then every 1000th). The count is per Python process and counts
every pass over the data (a second epoch counts again). At inference an empty caption is a
`ValueError` instead (the tokenizers' `encode`).

With `DatasetConfig(feature_converter='audio', task_feature_lengths={'audio': N, 'text_ids': L,
'text_mask': L})` the batches are exactly what `MuLanModel` trains on:
{'audio': [B, N] float32, 'text_ids': [B, L] int32, 'text_mask': [B, L] int32}.

Tasks (registered in tasks/audio.py): embedded_music_mulan, embedded_music_tiny_mulan,
musiccaps_mulan (WordPiece); embedded_music_mulan_sp, embedded_music_tiny_mulan_sp (the packaged
SentencePiece caption vocabulary; their 'text_ids' feature carries it).
"""
from __future__ import annotations

import collections
import functools
import logging
import threading
from typing import Optional

import numpy as np
import seqio

from musiclm_jax.data import preprocessors
from musiclm_jax.common.tf_setup import quiet_tensorflow

tf = quiet_tensorflow()
logger = logging.getLogger(__name__)

DEFAULT_TEXT_LENGTH = 64
DEFAULT_ASPECT_PROB = 0.3
ASPECT_SEPARATOR = ', '
TEXT_FEATURES = ('text_ids', 'text_mask')
# Output features of MuLan tasks: the audio features, the chosen text and its tokens.
MULAN_FEATURES = {
    **preprocessors.AUDIO_FEATURES,
    'text': preprocessors._side_feature(tf.string, 0),  # pylint: disable=protected-access
    'text_ids': preprocessors.token_feature(30522),
    'text_mask': preprocessors.token_feature(2),
}


def mulan_features(vocabulary: Optional[seqio.Vocabulary] = None) -> dict[str, seqio.Feature]:
  """Output features of a MuLan task; with `vocabulary`, 'text_ids' carries it.

  The EOS is added by `tokenize_text` itself (and counted in the mask), so the feature does not
  add one.
  """
  if vocabulary is None:
    return dict(MULAN_FEATURES)
  return {**MULAN_FEATURES,
          'text_ids': seqio.Feature(vocabulary, add_eos=False, required=True, dtype=tf.int32,
                                    rank=1)}


SKIPPED: collections.Counter = collections.Counter()
_SKIPPED_LOCK = threading.Lock()
_LOG_FIRST = 10


def skipped_examples() -> dict[str, int]:
  """Examples dropped by `tokenize_text` in this process so far, by reason ('empty_caption')."""
  with _SKIPPED_LOCK:
    return dict(SKIPPED)


def reset_skipped_examples() -> None:
  """Zeroes the `SKIPPED` counter (tests, or before counting one pass)."""
  with _SKIPPED_LOCK:
    SKIPPED.clear()


def _count_skip(reason: str, example_id: str) -> None:
  with _SKIPPED_LOCK:
    SKIPPED[reason] += 1
    n = SKIPPED[reason]
  if n <= _LOG_FIRST or n % 1000 == 0:
    logger.warning('MuLan data: skipped example %r (%s; %d so far in this process)',
                   example_id, reason, n)


@functools.lru_cache(maxsize=None)
def _wordpiece_tokenizer(tokenizer_json: Optional[str]):
  from musiclm_jax.mulan.text import WordPieceTokenizer  # pylint: disable=g-import-not-at-top
  return WordPieceTokenizer(tokenizer_json)


def _text_tokenizer(tokenizer_json: Optional[str], vocabulary: Optional[seqio.Vocabulary]):
  """The (per-process cached) WordPiece or SentencePiece tokenizer `tokenize_text` uses."""
  if vocabulary is None:
    return _wordpiece_tokenizer(tokenizer_json)
  if tokenizer_json is not None:
    raise ValueError('tokenize_text: give tokenizer_json (WordPiece) or vocabulary '
                     '(SentencePiece), not both')
  if not isinstance(vocabulary, seqio.SentencePieceVocabulary):
    raise TypeError(f'tokenize_text: vocabulary must be a seqio.SentencePieceVocabulary, got '
                    f'{vocabulary!r}')
  from musiclm_jax.mulan import vocabulary as vocabulary_lib  # pylint: disable=g-import-not-at-top
  return vocabulary_lib.cached_tokenizer(vocabulary.sentencepiece_model_file)


@seqio.map_over_dataset(num_seeds=1)
def caption_or_aspects_to_text(ex, seed, *, aspect_prob: float = DEFAULT_ASPECT_PROB,
                               separator: str = ASPECT_SEPARATOR):
  """Adds `text`: the caption, or with probability `aspect_prob` the joined aspect list.

  The draw is a stateless uniform on SeqIO's per-example seed (deterministic per task seed).
  An example without aspects (or whose aspects are all empty) keeps its caption.

  Args:
    ex: the example ('caption' string, 'aspects' [n] strings).
    seed: SeqIO's per-example seed (passed by `map_over_dataset`).
    aspect_prob: probability of using the aspect list.
    separator: between aspects.

  Returns:
    The example with a scalar string `text`.
  """
  ex = dict(ex)
  caption = ex['caption']
  aspects = ex.get('aspects')
  if aspects is None or aspect_prob <= 0.0:
    ex['text'] = caption
    return ex
  aspects = tf.strings.strip(aspects)
  aspects = tf.boolean_mask(aspects, tf.strings.length(aspects) > 0)
  joined = tf.strings.reduce_join(aspects, separator=separator)
  use_aspects = tf.logical_and(
      tf.random.stateless_uniform([], seed) < aspect_prob, tf.size(aspects) > 0)
  ex['text'] = tf.where(use_aspects, joined, caption)
  return ex


def tokenize_text(dataset, sequence_length=None, *, text_length: Optional[int] = None,
                  tokenizer_json: Optional[str] = None,
                  vocabulary: Optional[seqio.Vocabulary] = None, feature: str = 'text'):
  """Tokenizes `feature` to int32 [L] `text_ids` / `text_mask`; drops empty captions.

  An example is dropped (and counted, see the module docstring) when its `caption` or its
  `feature` is empty or normalises to no piece at all.

  Args:
    dataset: examples with a string `feature` (from `caption_or_aspects_to_text`), 'caption' and
      'id'.
    sequence_length: SeqIO's task feature lengths; `sequence_length['text_ids']` is L.
    text_length: L when not given by `sequence_length` (default `DEFAULT_TEXT_LENGTH`).
    tokenizer_json: a BERT tokenizer.json (default all-MiniLM-L6-v2's).
    vocabulary: a `seqio.SentencePieceVocabulary` to tokenize with instead of WordPiece
      (pieces + EOS; see musiclm_jax/mulan/vocabulary.SentencePieceTokenizer).
    feature: the string feature to tokenize.

  Returns:
    The dataset with `text_ids` and `text_mask`, both int32 of static shape [L].
  """
  length = (sequence_length or {}).get('text_ids') or text_length or DEFAULT_TEXT_LENGTH
  length = int(length)
  mask_length = (sequence_length or {}).get('text_mask')
  if mask_length is not None and int(mask_length) != length:
    raise ValueError(f"task feature lengths of 'text_ids' ({length}) and 'text_mask' "
                     f'({mask_length}) differ')
  tokenizer = _text_tokenizer(tokenizer_json, vocabulary)  # load (and fail) here, not in tf.data

  def encode(text: bytes, caption: bytes, example_id: bytes):
    text_s = text.decode('utf-8', errors='replace')
    caption_s = caption.decode('utf-8', errors='replace')
    try:
      tokenizer.encode([caption_s], 3)
      ids, mask = tokenizer.encode([text_s], length)
    except ValueError:
      _count_skip('empty_caption', example_id.decode('utf-8', errors='replace'))
      zeros = np.zeros([length], np.int32)
      return zeros, zeros, False
    return ids[0], mask[0], True

  def add_tokens(ex):
    ex = dict(ex)
    example_id = ex['id'] if 'id' in ex else tf.constant('')
    ids, mask, keep = tf.numpy_function(encode, [ex[feature], ex['caption'], example_id],
                                        [tf.int32, tf.int32, tf.bool], stateful=False)
    ex['text_ids'] = tf.ensure_shape(ids, [length])
    ex['text_mask'] = tf.ensure_shape(mask, [length])
    ex['_keep'] = tf.ensure_shape(keep, [])
    return ex

  def drop_flag(ex):
    ex = dict(ex)
    del ex['_keep']
    return ex

  ds = dataset.map(add_tokens, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.filter(lambda ex: ex['_keep']).map(drop_flag)
