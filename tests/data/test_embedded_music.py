"""Tests of the embedded default corpus (TFDS `embedded_music`), built once in its `tiny` config."""
from __future__ import annotations

import collections
import dataclasses
import glob
import importlib
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

import musiclm_jax.data.embedded_music as em
from musiclm_jax.data.embedded_music import builder as builder_lib
from musiclm_jax.data.embedded_music import melodies as melodies_lib
from musiclm_jax.data.embedded_music import render as render_lib

SPLITS = ('train', 'validation', 'test')
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _build(data_dir: str, config=None) -> tfds.core.DatasetBuilder:
  if config is None:
    builder = tfds.builder('embedded_music/tiny', data_dir=data_dir)
  else:
    builder = em.EmbeddedMusic(config=config, data_dir=data_dir)
  builder.download_and_prepare()
  return builder


def _shards(builder: tfds.core.DatasetBuilder) -> dict[str, bytes]:
  paths = sorted(glob.glob(os.path.join(builder.data_dir, '*.tfrecord*')))
  assert paths, builder.data_dir
  contents = {}
  for path in paths:
    with open(path, 'rb') as f:
      contents[os.path.basename(path)] = f.read()
  return contents


@pytest.fixture(scope='module')
def tiny(tmp_path_factory) -> tfds.core.DatasetBuilder:
  return _build(str(tmp_path_factory.mktemp('embedded_music_a')))


@pytest.fixture(scope='module')
def examples(tiny) -> dict[str, list[dict]]:
  return {split: list(tfds.as_numpy(tiny.as_dataset(split=split))) for split in SPLITS}


def _text(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def test_builds_splits_with_disjoint_melodies(tiny, examples):
  config = tiny.builder_config
  assert set(tiny.info.splits.keys()) == set(SPLITS)
  melody_ids = {split: [_text(ex['melody_id']) for ex in examples[split]] for split in SPLITS}
  for split in SPLITS:
    assert melody_ids[split], split
  for a in SPLITS:
    for b in SPLITS:
      if a < b:
        assert not set(melody_ids[a]) & set(melody_ids[b]), (a, b)
  counts = collections.Counter(melody_ids['train'])
  assert min(counts.values()) >= 2  # same-melody pairs for a melody embedding
  total = sum(len(v) for v in examples.values())
  assert total == config.num_melodies * config.renderings_per_melody
  ids = [_text(ex['id']) for split in SPLITS for ex in examples[split]]
  assert len(set(ids)) == len(ids)
  # Essen (non-commercial) is out of the default collections, and every melody says its source.
  collections_seen = {_text(ex['collection']) for split in SPLITS for ex in examples[split]}
  assert collections_seen <= set(melodies_lib.DEFAULT_COLLECTIONS)
  # The skip report lands in the dataset's metadata.
  metadata = tiny.info.metadata
  assert metadata['tunes_tried'] == config.num_melodies + sum(metadata['skip_counts'].values())


def test_same_seed_same_bytes_other_seed_other_bytes(tiny, tmp_path_factory):
  # The second build runs in another process: per-process state (hash seeds, protobuf map
  # order) must not reach the bytes either.
  data_dir = str(tmp_path_factory.mktemp('embedded_music_b'))
  code = ('import tensorflow_datasets as tfds, musiclm_jax.data.embedded_music; '
          'tfds.disable_progress_bar(); '
          f'tfds.builder("embedded_music/tiny", data_dir={data_dir!r}).download_and_prepare()')
  subprocess.run([sys.executable, '-c', code], check=True, capture_output=True,
                 cwd=_REPO, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))
  again = tfds.builder('embedded_music/tiny', data_dir=data_dir)
  assert _shards(again) == _shards(tiny)
  other_seed = dataclasses.replace(em.TINY, name='tiny_seed1', seed=1)
  other = _build(str(tmp_path_factory.mktemp('embedded_music_c')), other_seed)
  shards, other_shards = _shards(tiny), _shards(other)
  assert shards.keys() == other_shards.keys()
  assert all(shards[k] != other_shards[k] for k in shards)


def test_captions_agree_with_attributes(examples):
  shapes = set()
  for split in SPLITS:
    for ex in examples[split]:
      attributes = em.attributes_from_example(ex)
      caption = _text(ex['caption'])
      aspects = [_text(a) for a in ex['aspects']]
      assert em.check_consistency(caption, aspects, attributes) == [], caption
      shapes.add(caption.split()[0])
  assert len(shapes) >= 2  # varied sentence shapes


def test_checker_rejects_inconsistent_captions():
  attributes = em.RenderingAttributes(
      instruments=('flute', 'acoustic bass'), gm_programs=(73, 32), timbre='instrument',
      accompaniment='bass', tempo_bpm=70.0, key_tonic='D', mode='major', time_signature='6/8',
      drums=False, dynamics='soft', transposition=2, collection='oneills1850', title='t')
  caption, aspects = em.write_caption(attributes, np.random.default_rng(0))
  assert em.check_consistency(caption, aspects, attributes) == []
  wrong = {
      'tempo': dataclasses.replace(attributes, tempo_bpm=140.0),
      'drums': dataclasses.replace(attributes, drums=True),
      'instrument': dataclasses.replace(attributes, instruments=('violin', 'acoustic bass')),
      'dynamics': dataclasses.replace(attributes, dynamics='loud'),
      'mode': dataclasses.replace(attributes, mode='minor'),
      'timbre': dataclasses.replace(attributes, timbre='hum', instruments=('humming',)),
  }
  for what, attrs in wrong.items():
    assert em.check_consistency(caption, aspects, attrs), what
  bad_caption = caption + ' It is played at a fast tempo with drums in E major.'
  problems = em.check_consistency(bad_caption, aspects, attributes)
  assert any('tempo' in p for p in problems) and any('drums' in p for p in problems)
  assert any('E major' in p for p in problems)


def test_audio_is_int16_clips_of_the_right_length(tiny, examples):
  config = tiny.builder_config
  timbres = set()
  for split in SPLITS:
    for ex in examples[split]:
      audio = ex['audio']
      timbres.add(_text(ex['timbre']))
      assert audio.dtype == np.int16
      assert audio.shape == (int(config.clip_seconds * config.sample_rate),)
      rms = np.sqrt(np.mean(audio.astype(np.float64) ** 2)) / 32768
      assert rms > 0.005, ex['id']  # not silent
      assert np.mean(np.abs(audio.astype(np.int32)) >= 32767) < 1e-3  # not clipped
  assert tiny.info.features['audio'].sample_rate == 24000
  assert 'instrument' in timbres


def _median_midi(audio: np.ndarray, start_s: float, end_s: float) -> float:
  import librosa  # pylint: disable=g-import-not-at-top
  segment = audio[int(start_s * 24000):int(end_s * 24000)]
  f0 = librosa.yin(segment, fmin=60, fmax=3000, sr=24000, frame_length=2048)
  return float(12 * np.log2(np.median(f0) / 440.0) + 69)


@pytest.mark.parametrize('timbre,transposition', [('hum', -5), ('whistle', 24)])
def test_voice_pitch_follows_the_notes(timbre, transposition):
  melody = em.Melody.from_notes([60, 64, 67, 72], [1.0] * 4)
  spec = em.RenderSpec(timbre=timbre, programs=(), tempo_bpm=60.0, transposition=transposition,
                       clip_seconds=4.0, seed=3)
  audio = em.render_rendering(melody, spec)
  assert audio.dtype == np.float32 and np.all(np.isfinite(audio))
  assert np.max(np.abs(audio)) <= 1.0
  for i, pitch in enumerate(melody.pitches):
    # Inside each 1 s note, past the glide: vibrato and drift stay well under a semitone.
    assert abs(_median_midi(audio, i + 0.3, i + 0.8) - (pitch + transposition)) < 0.5


def test_rendered_tempo_and_key_are_the_attributes():
  import librosa  # pylint: disable=g-import-not-at-top
  melody = em.Melody.from_notes([60, 62] * 8, [1.0] * 16)
  spec = em.RenderSpec(timbre='instrument', programs=(0,), tempo_bpm=120.0, transposition=2,
                       clip_seconds=4.0, seed=1)
  audio = em.render_rendering(melody, spec)
  onsets = librosa.onset.onset_detect(y=audio, sr=24000, units='time', hop_length=256)
  assert abs(np.median(np.diff(onsets)) - 60.0 / 120.0) < 0.03
  attributes = em.attributes_of(melody, spec)
  assert (attributes.key_tonic, attributes.mode, attributes.tempo_bpm) == ('D', 'major', 120.0)


def test_melody_notes_feature_is_the_sounding_melody(tiny, examples):
  config = tiny.builder_config
  assert tiny.info.version == '1.1.0' and '1.0.0' in tiny.info.release_notes
  assert tiny.info.features['melody_notes'].shape == (None, 3)
  for split in SPLITS:
    for ex in examples[split]:
      notes = ex['melody_notes']
      assert notes.dtype == np.float32 and notes.ndim == 2 and notes.shape[1] == 3, ex['id']
      assert len(notes) >= 3, ex['id']
      starts, ends, pitches = notes.T
      assert np.all(starts >= 0) and np.all(ends <= config.clip_seconds), ex['id']
      assert np.all(ends > starts) and np.all(np.diff(starts) >= 0), ex['id']
      assert np.all(pitches == np.round(pitches)), ex['id']
      assert np.all((pitches >= 0) & (pitches <= 127)), ex['id']


def test_melody_voice_notes_by_hand():
  melody = em.Melody.from_notes([60, 62, 64, 65], [1.0, 0.5, 0.5, 2.0])  # one 4/4 bar, looped
  # An instrument at 120 BPM (0.5 s a quarter), up a tone: notes held 92% of their length.
  spec = em.RenderSpec(timbre='instrument', programs=(73,), tempo_bpm=120.0, transposition=2,
                       clip_seconds=4.0)
  bar = [[0.0, 0.46, 62], [0.5, 0.73, 64], [0.75, 0.98, 66], [1.0, 1.92, 67]]
  expected = np.asarray(bar + [[s + 2.0, e + 2.0, p] for s, e, p in bar], np.float32)
  notes = em.melody_voice_notes(melody, spec)
  assert notes.dtype == np.float32
  np.testing.assert_allclose(notes, expected, atol=1e-6)
  # The octave doubling is the second instrument's, not the melody's; drums change nothing.
  doubled = dataclasses.replace(spec, programs=(73, 0), accompaniment='octave', drums=True)
  np.testing.assert_array_equal(em.melody_voice_notes(melody, doubled), notes)
  # The renderer plays exactly these notes on the melody channel.
  lead, second, _ = render_lib._instrument_notes(  # pylint: disable=protected-access
      melody, doubled, np.random.default_rng(0))
  np.testing.assert_array_equal(
      np.asarray([(n.start, n.end, n.pitch) for n in lead], np.float32), notes)
  assert [n.pitch for n in second] == [n.pitch - 12 for n in lead]
  # A voice holds notes their full length; the clip starts at quarter 1 and the last note is
  # cut at the clip's end (2.1 s); the register shift is in the transposition.
  for timbre in ('hum', 'whistle'):
    voice = em.RenderSpec(timbre=timbre, programs=(), tempo_bpm=120.0, transposition=-12,
                          start_quarters=1.0, clip_seconds=2.1)
    np.testing.assert_allclose(
        em.melody_voice_notes(melody, voice),
        [[0.0, 0.25, 50], [0.25, 0.5, 52], [0.5, 1.5, 53], [1.5, 2.0, 48], [2.0, 2.1, 50]],
        atol=1e-6)


def test_a_note_starting_on_the_clip_end_is_left_out():
  # 68 BPM, 10 s: the clip is 11.333333333333334 quarters; a note one ulp earlier starts at
  # 9.999999999999998 s, the renderer's sample 240000 (not played), and 10.0 s in float32.
  clip_quarters = 10.0 * 68.0 / 60.0
  last = float(np.nextafter(clip_quarters, 0.0))
  melody = em.Melody.from_notes([60, 62, 64], [1.0, last - 1.0, 2.0])
  spec = em.RenderSpec(programs=(73,), tempo_bpm=68.0, clip_seconds=10.0)
  notes = em.melody_voice_notes(melody, spec)
  assert notes[:, 2].tolist() == [60.0, 62.0] and np.all(notes[:, 1] > notes[:, 0])


def test_frame_pitches_by_hand():
  notes = np.asarray([[1.8, 2.2, 65],  # overlaps the 64 and starts later: wins from 1.8 s
                      [0.0, 0.5, 60], [0.5, 1.0, 62],
                      [1.0, 1.125, 70],  # ends exactly on frame 4's centre: not in it
                      [1.5, 2.0, 64],
                      [2.375, 2.4, 71]],  # starts exactly on frame 9's centre: in it
                     np.float32)
  # 4 frames a second: frame t covers [t / 4, (t + 1) / 4), centre (t + 0.5) / 4.
  labels = em.frame_pitches(notes, 12, 4.0)
  assert labels.dtype == np.int32
  assert labels.tolist() == [60, 60, 62, 62, -1, -1, 64, 65, 65, 71, -1, -1]
  assert em.frame_pitches(np.zeros((0, 3), np.float32), 5, 50.0).tolist() == [-1] * 5
  assert em.frame_pitches(notes, 0, 4.0).shape == (0,)


# Chromatic percussion (celesta ... xylophone) and kalimba: inharmonic, fast-decaying tones whose
# pitch trackers follow partials, not the note.
_MALLETS = set(range(8, 16)) | {108}


def test_melody_notes_match_the_audio_pitch(examples):
  """On solo renderings, the tracked pitch class agrees with frame_pitches on most note frames."""
  import librosa  # pylint: disable=g-import-not-at-top
  hop, sample_rate = 240, 24000
  checked = collections.Counter()
  for split in SPLITS:
    for ex in examples[split]:
      timbre = _text(ex['timbre'])
      solo = (_text(ex['accompaniment']) == 'none' and not ex['drums']
              and not set(ex['gm_programs'].tolist()) & _MALLETS)
      if timbre == 'instrument' and not solo:
        continue
      audio = ex['audio'].astype(np.float32) / 32768.0
      # librosa centres frame t on sample t * hop; dropping half a hop puts it on frame_pitches'
      # centre (t + 0.5) * hop.
      f0 = librosa.yin(audio[hop // 2:], fmin=60, fmax=2500, sr=sample_rate, frame_length=2048,
                       hop_length=hop)
      labels = em.frame_pitches(ex['melody_notes'], len(f0), sample_rate / hop)
      sounding = labels >= 0
      assert sounding.mean() > 0.5, ex['id']
      tracked = np.rint(librosa.hz_to_midi(f0[sounding])).astype(np.int64)
      agreement = np.mean((tracked - labels[sounding]) % 12 == 0)
      assert agreement > 0.6, (ex['id'], timbre, agreement)
      checked['voice' if timbre != 'instrument' else 'instrument'] += 1
  assert checked['voice'] >= 2 and checked['instrument'] >= 2, checked


def test_drum_pattern_fits_the_meter():
  rng = np.random.default_rng(0)
  six_eight = render_lib._drum_pattern('6/8', rng)  # pylint: disable=protected-access
  kicks_and_snares = sorted((p, k) for p, k, _ in six_eight if k in (36, 37, 38, 40))
  assert [p for p, _ in kicks_and_snares] == [0.0, 1.5]  # two dotted-quarter beats
  assert len([p for p, k, _ in six_eight if k not in (36, 37, 38, 40)]) == 6  # eighths
  four_four = render_lib._drum_pattern('4/4', rng)  # pylint: disable=protected-access
  assert sorted(p for p, k, _ in four_four if k == 36) == [0.0, 2.0]


def test_essen_only_with_the_option():
  default = em.list_tunes()
  assert default and all(t.collection != em.ESSEN_COLLECTION for t in default)
  with_essen = em.list_tunes(include_essen=True)
  assert any(t.collection == em.ESSEN_COLLECTION for t in with_essen)
  with pytest.raises(ValueError, match='non-commercial'):
    em.list_tunes(collections=(em.ESSEN_COLLECTION,))
  assert not em.DEFAULT.include_essen and em.DEFAULT_WITH_ESSEN.include_essen
  # The order is a pure function of the seed.
  assert em.selection_order(default, 0)[:5] == em.selection_order(default, 0)[:5]


class _FakeTune(em.CorpusTune):
  """A corpus tune whose parse is given by the test."""

  def __init__(self, key, make_score):
    super().__init__(key=key, source_path=f'fake/{key}.abc', number=None, collection='miscFolk',
                     title=key)
    object.__setattr__(self, '_make_score', make_score)

  def parse(self):
    return self._make_score()


def _score(pitches, time_signature='3/4'):
  """A one-part score of quarter notes; a None pitch is a whole bar of rest."""
  from music21 import meter, note, stream  # pylint: disable=g-import-not-at-top
  part = stream.Part()
  part.append(meter.TimeSignature(time_signature))
  for pitch in pitches:
    part.append(note.Rest(quarterLength=3.0) if pitch is None else
                note.Note(pitch, quarterLength=1.0))
  score = stream.Score()
  score.insert(0, part)
  return score


def test_broken_tunes_are_skipped_and_counted():
  def broken():
    raise ValueError('unparseable abc')

  tunes = [_FakeTune('broken', broken), _FakeTune('empty', lambda: _score([])),
           _FakeTune('fragment', lambda: _score([60, 62, 64])),
           _FakeTune('sparse', lambda: _score([60, 62, 64, 65, None, None] * 4)),
           _FakeTune('good', lambda: _score([60, 62, 64, 65, 67, 69, 71, 72] * 3)),
           _FakeTune('unused', broken)]
  melodies, skips = em.collect_melodies(tunes, 1)
  assert [m.melody_id for m in melodies] == ['good']
  assert skips == {'mostly_rests': 1, 'no_notes': 1, 'parse_error': 1, 'too_few_notes': 1}
  assert melodies[0].time_signature == '3/4' and melodies[0].length_quarters == 24.0
  with pytest.raises(ValueError, match='usable melodies'):
    em.collect_melodies(tunes[:4], 1)


def test_reimport_does_not_register_twice():
  importlib.reload(builder_lib)
  assert tfds.builder_cls('embedded_music').name == 'embedded_music'
