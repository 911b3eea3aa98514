"""SeqIO audio tasks over the three corpora: the embedded default corpus, MusicCaps, audio folders.

Every task yields `audio` (float32 in [-1, 1), 24 kHz mono), `caption`, `aspects` and `id`, plus
the source's own fields (e.g. `melody_id` and the ground-truth attributes of `embedded_music`).
The clip length is the model's: give `task_feature_lengths={'audio': SAMPLES}` and each example is
randomly cropped (seeded by SeqIO) to that many samples, zero-padded if shorter; without an
`audio` length the whole clip is kept.

Registered on import:
  embedded_music        embedded_music/default (train / validation / test); build it first with
                        `musiclm-jax build_data --gin_file=data/embedded_music.gin`
  embedded_music_tiny   embedded_music/tiny, the test-sized corpus
  musiccaps             musiccaps (train / eval / eval_balanced), from the clips you fetched
                        (`musiclm-jax build_data --gin_file=data/musiccaps.gin`)
  embedded_music_best_rq, embedded_music_tiny_best_rq
                        the same clips tokenized by a frozen BEST-RQ random-projection quantizer
                        (50 Hz, 1024 codes; `best_rq_tokens`), cacheable with `musiclm-jax
                        tokenize --gin_file=examples/tokenize_embedded_music_best_rq.gin`
  embedded_music_mulan, embedded_music_tiny_mulan, musiccaps_mulan
                        MuLan pairs: the audio crop and its caption (or, 30% of the time, its
                        aspect list) as MiniLM WordPiece `text_ids` / `text_mask`
  embedded_music_mulan_sp, embedded_music_tiny_mulan_sp
                        the same pairs tokenized with the packaged SentencePiece caption
                        vocabulary (musiclm_jax/mulan/vocabulary.py; 1,024 ids, carried by the
                        'text_ids' feature), for a text tower trained from scratch
An audio folder gets a task from `register_audio_task(task_name, tfds_name)`, with the TFDS name
that `musiclm-jax build_data --gin_file=data/audio_folder.gin` printed.

Datasets are read from TFDS's data directory: `$TFDS_DATA_DIR` or ~/tensorflow_datasets, or
DatasetConfig.tfds_data_dir.

Tokenized tasks (frozen tokenizer + `seqio.CacheDatasetPlaceholder()`) build on these with the
codec and tokenizer models; see musiclm_jax/data/preprocessors.py for the pattern.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import seqio

# Importing a builder module registers its TFDS dataset name.
from musiclm_jax.data import audio_folder  # noqa: F401  pylint: disable=unused-import
from musiclm_jax.data import embedded_music  # noqa: F401  pylint: disable=unused-import
from musiclm_jax.data import musiccaps  # noqa: F401  pylint: disable=unused-import
from musiclm_jax.data import preprocessors
from musiclm_jax.data.frozen_tokenizer import FrozenTokenizer
from musiclm_jax.nn.random_projection import RandomProjectionQuantizer

AUDIO_PREPROCESSORS = (
    preprocessors.audio_to_float,
    preprocessors.crop_to_sequence_length,
)


def register_audio_task(task_name: str, tfds_name: str,
                        splits: Optional[Sequence[str]] = None,
                        tfds_data_dir: Optional[str] = None,
                        extra_preprocessors: Sequence = (),
                        output_features: Optional[dict] = None) -> seqio.Task:
  """Registers (once) a SeqIO task reading a TFDS audio corpus with the common audio schema.

  Args:
    task_name: the SeqIO task name.
    tfds_name: 'name/config:version' of a prepared builder with the common schema
      (musiclm_jax/data/builder_utils.COMMON_FEATURE_NAMES).
    splits: the splits to expose (None: all the prepared dataset has).
    tfds_data_dir: where the dataset was prepared (None: TFDS's default / DatasetConfig's).
    extra_preprocessors: appended after the crop (e.g. tokenization and a cache placeholder).
    output_features: the task's output features (None: preprocessors.AUDIO_FEATURES).

  Returns:
    The task (the registered one if the name exists already).
  """
  if task_name in seqio.TaskRegistry.names():
    return seqio.TaskRegistry.get(task_name)
  return seqio.TaskRegistry.add(
      task_name,
      source=seqio.TfdsDataSource(tfds_name=tfds_name, tfds_data_dir=tfds_data_dir,
                                  splits=splits),
      preprocessors=list(AUDIO_PREPROCESSORS) + list(extra_preprocessors),
      output_features=output_features or preprocessors.AUDIO_FEATURES)


register_audio_task('embedded_music', 'embedded_music/default:1.1.0',
                    splits=('train', 'validation', 'test'))
register_audio_task('embedded_music_tiny', 'embedded_music/tiny:1.1.0',
                    splits=('train', 'validation', 'test'))
register_audio_task('musiccaps', 'musiccaps/default:1.0.0',
                    splits=('train', 'eval', 'eval_balanced'))


BEST_RQ_FEATURE = 'best_rq_tokens'
BEST_RQ_CODES = 1024


def best_rq_tokenizer(clip_seconds: float, init_seed: int = 0) -> FrozenTokenizer:
  """BEST-RQ tokens of whole clips: a random projection and codebook, never trained (seeded)."""
  return FrozenTokenizer(model=RandomProjectionQuantizer(codebook_size=BEST_RQ_CODES),
                         output_feature=BEST_RQ_FEATURE,
                         input_samples=int(round(clip_seconds * preprocessors.SAMPLE_RATE)),
                         init_seed=init_seed, batch_size=8)


def register_tokenized_task(task_name: str, tfds_name: str, clip_seconds: float,
                            tokenizer: FrozenTokenizer, splits: Optional[Sequence[str]] = None,
                            tfds_data_dir: Optional[str] = None,
                            keep_audio: bool = False) -> seqio.Task:
  """Registers (once) a task whose audio crops are tokenized by a frozen model and cacheable.

  The crop and the tokens are made before the `CacheDatasetPlaceholder`, so `musiclm-jax
  tokenize` stores them; the audio is dropped from the cache unless `keep_audio`.
  """
  if task_name in seqio.TaskRegistry.names():
    return seqio.TaskRegistry.get(task_name)
  vocab = tokenizer.model.codebook_size if hasattr(tokenizer.model, 'codebook_size') else None
  if vocab is None:
    raise ValueError(f'{task_name}: cannot tell the vocabulary size of {tokenizer.model}')
  return seqio.TaskRegistry.add(
      task_name,
      source=seqio.TfdsDataSource(tfds_name=tfds_name, tfds_data_dir=tfds_data_dir,
                                  splits=splits),
      preprocessors=[
          preprocessors.audio_to_float,
          functools.partial(preprocessors.random_crop, clip_seconds=clip_seconds),
          functools.partial(preprocessors.tokenize_audio, tokenizer=tokenizer,
                            keep_input=keep_audio),
          seqio.CacheDatasetPlaceholder(),
      ],
      output_features={**preprocessors.AUDIO_FEATURES,
                       tokenizer.output_feature: preprocessors.token_feature(vocab)})


register_tokenized_task('embedded_music_best_rq', 'embedded_music/default:1.1.0', 10.0,
                        best_rq_tokenizer(10.0), splits=('train', 'validation', 'test'))
register_tokenized_task('embedded_music_tiny_best_rq', 'embedded_music/tiny:1.1.0', 4.0,
                        best_rq_tokenizer(4.0), splits=('train', 'validation', 'test'))


# MuLan: (audio crop, caption or aspect-list text) pairs with text tokens (text_ids,
# text_mask): WordPiece, or a SentencePiece vocabulary; see musiclm_jax/mulan/data.py. Give
# task_feature_lengths={'audio': N, 'text_ids': L, 'text_mask': L} with
# DatasetConfig.feature_converter='audio'.
from musiclm_jax.mulan import data as mulan_data  # noqa: E402  pylint: disable=g-import-not-at-top
from musiclm_jax.mulan import vocabulary as mulan_vocabulary  # noqa: E402  pylint: disable=g-import-not-at-top


def register_mulan_task(task_name: str, tfds_name: str,
                        splits: Optional[Sequence[str]] = None,
                        tfds_data_dir: Optional[str] = None,
                        aspect_prob: float = mulan_data.DEFAULT_ASPECT_PROB,
                        vocabulary: Optional[seqio.Vocabulary] = None) -> seqio.Task:
  """Registers (once) a MuLan pair task: audio crop + caption (or, p = aspect_prob, aspects).

  The text is tokenized with all-MiniLM-L6-v2's WordPiece tokenizer, or, given `vocabulary` (a
  `seqio.SentencePieceVocabulary`), with it; the 'text_ids' output feature then carries it.
  """
  return register_audio_task(
      task_name, tfds_name, splits=splits, tfds_data_dir=tfds_data_dir,
      extra_preprocessors=[
          functools.partial(mulan_data.caption_or_aspects_to_text, aspect_prob=aspect_prob),
          (mulan_data.tokenize_text if vocabulary is None else
           functools.partial(mulan_data.tokenize_text, vocabulary=vocabulary))],
      output_features=mulan_data.mulan_features(vocabulary))


register_mulan_task('embedded_music_mulan', 'embedded_music/default:1.1.0',
                    splits=('train', 'validation', 'test'))
register_mulan_task('embedded_music_tiny_mulan', 'embedded_music/tiny:1.1.0',
                    splits=('train', 'validation', 'test'))
register_mulan_task('musiccaps_mulan', 'musiccaps/default:1.0.0',
                    splits=('train', 'eval', 'eval_balanced'))
# The from-scratch text option: the caption vocabulary fitted on embedded_music/default's train
# split (shipped in the package; `musiclm-jax fit_text_vocab` makes it).
register_mulan_task('embedded_music_mulan_sp', 'embedded_music/default:1.1.0',
                    splits=('train', 'validation', 'test'),
                    vocabulary=mulan_vocabulary.caption_vocabulary())
register_mulan_task('embedded_music_tiny_mulan_sp', 'embedded_music/tiny:1.1.0',
                    splits=('train', 'validation', 'test'),
                    vocabulary=mulan_vocabulary.caption_vocabulary())
