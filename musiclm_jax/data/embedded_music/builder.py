"""The TFDS builder `embedded_music`: captioned renderings of music21 melodies, made offline."""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from musiclm_jax.data import builder_utils
from musiclm_jax.data.embedded_music import captions as captions_lib
from musiclm_jax.data.embedded_music import melodies as melodies_lib
from musiclm_jax.data.embedded_music import render as render_lib

DATASET_NAME = 'embedded_music'
# Second word of the seed of the melody -> split draw, beyond any melody index.
_SPLIT_STREAM = 1_000_000_002


@dataclasses.dataclass(eq=False)
class EmbeddedMusicConfig(tfds.core.BuilderConfig):
  """Size and mix of an `embedded_music` build; the same config gives the same bytes.

  Attributes:
    num_melodies: distinct melodies (tunes that fail to parse or are degenerate are skipped and
      replaced by the next candidates).
    renderings_per_melody: renderings of each melody; they share its melody_id and split.
    clip_seconds: length of every clip (tunes are looped or excerpted to it).
    sample_rate: audio sample rate.
    seed: every random choice (melodies, splits, renderings, captions) derives from it.
    collections: music21 corpus collections to draw from (melodies.DEFAULT_COLLECTIONS).
    include_essen: also draw from the Essen folk songs (non-commercial use only).
    hum_fraction: share of hummed renderings.
    whistle_fraction: share of whistled renderings.
    drums_fraction: share of instrument renderings with drums.
    two_instruments_fraction: share of instrument renderings with a second instrument.
    validation_fraction: share of melodies (with all their renderings) in 'validation'.
    test_fraction: share of melodies in 'test'.
  """
  num_melodies: int = 200
  renderings_per_melody: int = 3
  clip_seconds: float = 10.0
  sample_rate: int = render_lib.SAMPLE_RATE
  seed: int = 0
  collections: tuple[str, ...] = melodies_lib.DEFAULT_COLLECTIONS
  include_essen: bool = False
  hum_fraction: float = 0.2
  whistle_fraction: float = 0.1
  drums_fraction: float = 0.35
  two_instruments_fraction: float = 0.5
  validation_fraction: float = 0.1
  test_fraction: float = 0.1

  @property
  def num_samples(self) -> int:
    return int(round(self.clip_seconds * self.sample_rate))


TINY = EmbeddedMusicConfig(
    name='tiny', description='8 melodies x 2 renderings x 4 s: for tests (builds in seconds).',
    num_melodies=8, renderings_per_melody=2, clip_seconds=4.0, validation_fraction=0.125,
    test_fraction=0.125)
DEFAULT = EmbeddedMusicConfig(
    name='default', description='300 melodies x 3 renderings x 10 s (2.5 h, 430 MB) from '
    'collections licensed for use: enough to train small models; builds in about 1.5 minutes '
    'on 2 cores.', num_melodies=300)
DEFAULT_WITH_ESSEN = EmbeddedMusicConfig(
    name='default_with_essen', description='As default, but the melodies may also come from the '
    'Essen folk song collection, which is licensed for NON-COMMERCIAL use only.',
    num_melodies=300, include_essen=True)


def rendering_rng(seed: int, melody_index: int, rendering_index: int) -> np.random.Generator:
  """The generator of one rendering: its spec, then its caption's wording, in that order."""
  return np.random.default_rng([seed, melody_index, rendering_index])


def assign_splits(num_melodies: int, seed: int, validation_fraction: float,
                  test_fraction: float) -> list[str]:
  """The split of each melody ('train', 'validation' or 'test'), disjoint by construction.

  Args:
    num_melodies: how many melodies.
    seed: the config seed.
    validation_fraction: share of melodies for validation (at least one when > 0).
    test_fraction: share of melodies for test (at least one when > 0).

  Returns:
    The split name per melody index; all renderings of a melody go to its split.
  """
  def count(fraction: float) -> int:
    return max(1, int(round(num_melodies * fraction))) if fraction > 0 else 0

  num_validation, num_test = count(validation_fraction), count(test_fraction)
  if num_validation + num_test >= num_melodies:
    raise ValueError(f'{num_melodies} melodies leave none for train after {num_validation} '
                     f'validation and {num_test} test')
  names = ['validation'] * num_validation + ['test'] * num_test
  names += ['train'] * (num_melodies - len(names))
  order = np.random.default_rng([seed, _SPLIT_STREAM, 0]).permutation(num_melodies)
  splits = [''] * num_melodies
  for name, index in zip(names, order):
    splits[index] = name
  return splits


def make_example(melody: melodies_lib.Melody, melody_index: int, rendering_index: int,
                 config: EmbeddedMusicConfig) -> dict[str, Any]:
  """One example of the dataset (the features of EmbeddedMusic), without TFDS.

  Args:
    melody: the melody to render.
    melody_index: its position among the build's melodies (seeds the rendering).
    rendering_index: which of its renderings (seeds the rendering).
    config: the build's config.

  Returns:
    The feature dict: int16 audio, caption, aspects, ids and the rendering's attributes.
  """
  rng = rendering_rng(config.seed, melody_index, rendering_index)
  spec = render_lib.sample_render_spec(
      melody, rng, clip_seconds=config.clip_seconds, sample_rate=config.sample_rate,
      hum_fraction=config.hum_fraction, whistle_fraction=config.whistle_fraction,
      drums_fraction=config.drums_fraction,
      two_instruments_fraction=config.two_instruments_fraction)
  audio = render_lib.to_int16(render_lib.render_rendering(melody, spec))
  attributes = render_lib.attributes_of(melody, spec)
  caption, aspects = captions_lib.write_caption(attributes, rng)
  return {
      'audio': audio,
      'caption': caption,
      'aspects': aspects,
      'id': f'{melody.melody_id}/r{rendering_index}',
      'melody_id': melody.melody_id,
      'rendering_index': rendering_index,
      'instruments': list(attributes.instruments),
      'gm_programs': np.asarray(attributes.gm_programs, np.int32),
      'timbre': attributes.timbre,
      'accompaniment': attributes.accompaniment,
      'tempo_bpm': attributes.tempo_bpm,
      'key_tonic': attributes.key_tonic,
      'mode': attributes.mode,
      'time_signature': attributes.time_signature,
      'drums': attributes.drums,
      'dynamics': attributes.dynamics,
      'transposition': attributes.transposition,
      'collection': attributes.collection,
      'title': attributes.title,
      'melody_notes': render_lib.melody_voice_notes(melody, spec),
  }


def attributes_from_example(example: dict[str, Any]) -> captions_lib.RenderingAttributes:
  """The RenderingAttributes of a decoded example (tfds.as_numpy), e.g. to check its caption."""
  def text(value) -> str:
    return value.decode('utf-8') if isinstance(value, bytes) else str(value)

  return captions_lib.RenderingAttributes(
      instruments=tuple(text(x) for x in example['instruments']),
      gm_programs=tuple(int(x) for x in example['gm_programs']),
      timbre=text(example['timbre']), accompaniment=text(example['accompaniment']),
      tempo_bpm=float(example['tempo_bpm']), key_tonic=text(example['key_tonic']),
      mode=text(example['mode']), time_signature=text(example['time_signature']),
      drums=bool(example['drums']), dynamics=text(example['dynamics']),
      transposition=int(example['transposition']), collection=text(example['collection']),
      title=text(example['title']))


PcmAudio = builder_utils.PcmAudio


@contextlib.contextmanager
def deterministic_example_serialization():
  """Within it, TFDS serializes tf.train.Examples with their feature map in key order.

  TFDS calls SerializeToString() without `deterministic`, and protobuf's upb backend then writes
  the map entries in a per-process hash order: the same examples give different bytes in
  different processes. Sorting the map makes a build's shard files depend on its config alone.
  """
  from tensorflow_datasets.core import example_serializer  # pylint: disable=g-import-not-at-top
  serializer_cls = example_serializer.ExampleSerializer
  original = serializer_cls.serialize_example

  def serialize_example(self, example):
    return self.get_tf_example(example).SerializeToString(deterministic=True)

  serializer_cls.serialize_example = serialize_example
  try:
    yield
  finally:
    serializer_cls.serialize_example = original


# Re-executing this module (importlib.reload, or a second import under another module name)
# would register the name twice, which TFDS refuses; the registry has no public lookup that does
# not import every TFDS dataset, hence the private one.
_ALREADY_REGISTERED = DATASET_NAME in getattr(tfds.core.registered, '_DATASET_REGISTRY', {})


class EmbeddedMusic(tfds.core.GeneratorBasedBuilder, skip_registration=_ALREADY_REGISTERED):
  """Captioned audio of real folk and chorale melodies, rendered offline from music21's corpus.

  Each melody of the music21 corpus (O'Neill's 1850, Ryan's Mammoth, Aird's Airs, Bach chorales,
  misc folk; Essen folk songs only with include_essen) is rendered several times at 24 kHz mono:
  with General MIDI instruments (pretty_midi's TimGM6mb soundfont via tinysoundfont), one or two
  at once, sometimes with drums, or hummed / whistled by a numpy voice synth, at varied tempos,
  keys and dynamics. Renderings of one melody share a melody_id and a split. Each example has a
  MusicCaps-style caption and aspect list written from its ground-truth attributes, which are
  stored too, as are the melody's sounding notes (`melody_notes`, for per-frame pitch labels).
  """

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {
      '1.0.0': 'Initial release: music21 corpus melodies rendered with GM instruments, humming '
               'and whistling; captions from attributes.',
      '1.1.0': 'Adds `melody_notes`: float32 [n, 3] (start_seconds, end_seconds, midi_pitch) of '
               'the melody voice as it sounds in the clip (render.melody_voice_notes); the audio '
               'and every other feature are unchanged.',
  }
  BUILDER_CONFIGS = [TINY, DEFAULT, DEFAULT_WITH_ESSEN]
  DEFAULT_CONFIG_NAME = 'default'

  def _info(self) -> tfds.core.DatasetInfo:
    config: EmbeddedMusicConfig = self.builder_config
    features = tfds.features.FeaturesDict({
        # Raw int16 bytes: an unencoded int16 Tensor is stored as int64 varints (up to 10 bytes a
        # sample), and zlib saves under 10% on this audio for a sizeable share of build time.
        'audio': builder_utils.pcm_audio(config.sample_rate, config.num_samples),
        'caption': tfds.features.Text(),
        'aspects': tfds.features.Sequence(tfds.features.Text()),
        'id': tfds.features.Text(),
        'melody_id': tfds.features.Text(),
        'rendering_index': tfds.features.Scalar(np.int32),
        'instruments': tfds.features.Sequence(tfds.features.Text()),
        'gm_programs': tfds.features.Sequence(tfds.features.Scalar(np.int32)),
        'timbre': tfds.features.Text(),
        'accompaniment': tfds.features.Text(),
        'tempo_bpm': tfds.features.Scalar(np.float32),
        'key_tonic': tfds.features.Text(),
        'mode': tfds.features.Text(),
        'time_signature': tfds.features.Text(),
        'drums': tfds.features.Scalar(np.bool_),
        'dynamics': tfds.features.Text(),
        'transposition': tfds.features.Scalar(np.int32),
        'collection': tfds.features.Text(),
        'title': tfds.features.Text(),
        # The melody voice as it sounds: rows (start_seconds, end_seconds, midi_pitch), sorted by
        # start, times within [0, clip_seconds] (render.melody_voice_notes; per-frame labels with
        # notes.frame_pitches).
        'melody_notes': tfds.features.Tensor(shape=(None, 3), dtype=np.float32),
    })
    return self.dataset_info_from_configs(features=features,
                                          metadata=tfds.core.MetadataDict())

  def _download_and_prepare(self, dl_manager, download_config=None):
    with deterministic_example_serialization():
      return super()._download_and_prepare(dl_manager, download_config)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # nothing to download: everything comes from installed packages
    config: EmbeddedMusicConfig = self.builder_config
    tunes = melodies_lib.selection_order(
        melodies_lib.list_tunes(config.collections, config.include_essen), config.seed)
    melodies, skip_counts = melodies_lib.collect_melodies(tunes, config.num_melodies)
    splits = assign_splits(len(melodies), config.seed, config.validation_fraction,
                           config.test_fraction)
    per_split = collections.Counter(splits)
    per_collection = collections.Counter(m.collection for m in melodies)
    self.info.metadata['skip_counts'] = skip_counts
    self.info.metadata['tunes_tried'] = len(melodies) + sum(skip_counts.values())
    self.info.metadata['melodies_per_split'] = dict(sorted(per_split.items()))
    self.info.metadata['melodies_per_collection'] = dict(sorted(per_collection.items()))
    logging.info('embedded_music/%s: %d melodies from %d tunes tried; skipped %s; per split %s',
                 config.name, len(melodies), self.info.metadata['tunes_tried'], skip_counts,
                 dict(per_split))
    return {
        name: self._generate_examples(
            [(i, m) for i, (m, s) in enumerate(zip(melodies, splits)) if s == name])
        for name in ('train', 'validation', 'test') if per_split[name]
    }

  def _generate_examples(self, indexed_melodies: list[tuple[int, melodies_lib.Melody]]
                         ) -> Iterator[tuple[str, dict[str, Any]]]:
    config: EmbeddedMusicConfig = self.builder_config
    for melody_index, melody in indexed_melodies:
      for rendering_index in range(config.renderings_per_melody):
        example = make_example(melody, melody_index, rendering_index, config)
        yield example['id'], example
