"""SeqIO tasks for the melody embedder: melody-aligned crops of two renderings of one melody.

Registered on import:
  embedded_music_melody       embedded_music/default (train / validation / test); build it first
                              with `musiclm-jax build_data --gin_file=data/embedded_music.gin`
  embedded_music_tiny_melody  embedded_music/tiny, the test-sized corpus

Each example is a positive pair: `audio` and `positive_audio` (float32 crops of
task_feature_lengths['audio'] samples, centred on the same point of the tune) and `melody_label`
(int32 [1]); see musiclm_jax/melody/data.py. Read them with
`DatasetConfig(module='tasks.melody', feature_converter='audio', task_feature_lengths={'audio':
W, 'positive_audio': W, 'melody_label': 1})`. Another corpus with the embedded_music schema
(melody_id, melody_notes, tempo_bpm, transposition, timbre) gets a task from
`register_melody_task`.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import seqio

from musiclm_jax.data import embedded_music  # noqa: F401  pylint: disable=unused-import
from musiclm_jax.melody import data as melody_data

# Shuffling happens after pairing and cropping (SeqIO shuffles a task's output): a buffer of
# 256 pairs of 4 s float32 crops is 200 MB; SeqIO's default of 1000 would be 770 MB.
SHUFFLE_BUFFER_SIZE = 256


def register_melody_task(task_name: str, tfds_name: str,
                         splits: Optional[Sequence[str]] = None,
                         tfds_data_dir: Optional[str] = None,
                         shuffle_buffer_size: int = SHUFFLE_BUFFER_SIZE,
                         **align_options) -> seqio.Task:
  """Registers (once) a melody pair task over an embedded_music-style TFDS corpus.

  Args:
    task_name: the SeqIO task name.
    tfds_name: 'name/config:version' of the corpus.
    splits: the splits to expose (None: all).
    tfds_data_dir: where the corpus was prepared (None: TFDS's default / DatasetConfig's).
    shuffle_buffer_size: SeqIO's shuffle buffer (pairs).
    **align_options: passed to `melody_data.aligned_crops` (min_matched_notes,
      min_shared_seconds).

  Returns:
    The task (the registered one if the name exists already).
  """
  if task_name in seqio.TaskRegistry.names():
    return seqio.TaskRegistry.get(task_name)
  return seqio.TaskRegistry.add(
      task_name,
      source=seqio.TfdsDataSource(tfds_name=tfds_name, tfds_data_dir=tfds_data_dir,
                                  splits=splits),
      preprocessors=[melody_data.pair_renderings,
                     functools.partial(melody_data.aligned_crops, **align_options)],
      output_features=melody_data.MELODY_FEATURES,
      shuffle_buffer_size=shuffle_buffer_size)


register_melody_task('embedded_music_melody', 'embedded_music/default:1.1.0',
                     splits=('train', 'validation', 'test'))
register_melody_task('embedded_music_tiny_melody', 'embedded_music/tiny:1.1.0',
                     splits=('train', 'validation', 'test'))
