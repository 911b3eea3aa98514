"""audio_folder builder: crops with a hop, captions files, bad files, a stable held-out split."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import soundfile as sf

from musiclm_jax.audio.io import SkipCounter
from musiclm_jax.data import audio_folder, builder_utils

SR = 24000
# clip 4 s every 3 s, a tail kept from 1.5 s; 30 % of the files held out.
CONFIG = dict(clip_seconds=4.0, hop_seconds=3.0, min_seconds=1.5, validation_fraction=0.3)


def _tone(freq, seconds, rate, amplitude=0.5):
  t = np.arange(int(round(seconds * rate))) / rate
  return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _held_out(rel, fraction):
  """The split rule, written out independently of the library."""
  return int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], 'big') / 2**64 < fraction


def _as_examples(builder):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return {split: {ex['id'].decode(): ex for ex in tfds.as_numpy(builder.as_dataset(split))}
          for split in builder.info.splits}


# --- pure functions -------------------------------------------------------------------------

@pytest.mark.parametrize('duration,expected', [
    (15.0, [(0, 4), (3, 4), (6, 4), (9, 4), (12, 3)]),   # tail 13..15 adds 2 s >= 1.5
    (14.0, [(0, 4), (3, 4), (6, 4), (9, 4)]),            # tail adds 1 s < 1.5: dropped
    (13.0, [(0, 4), (3, 4), (6, 4), (9, 4)]),            # exact fit
    (4.0, [(0, 4)]),
    (2.5, [(0, 2.5)]),                                   # shorter than a clip: one crop
    (1.0, []),                                           # shorter than min_seconds
])
def test_crop_windows(duration, expected):
  got = list(audio_folder.crop_windows(duration, 4.0, 3.0, 1.5))
  assert len(got) == len(expected)
  assert np.allclose(np.reshape(got, (-1, 2)), np.reshape(expected, (-1, 2)))


def test_crop_windows_max_crops_and_no_overlap():
  assert len(list(audio_folder.crop_windows(100.0, 4.0, 3.0, 1.5, max_crops=2))) == 2
  assert list(audio_folder.crop_windows(10.0, 4.0, 4.0, 1.5)) == [(0, 4), (4, 4), (8, 2)]
  # Sparse crops (hop > clip): a tail shorter than min_seconds is not kept.
  assert list(audio_folder.crop_windows(21.0, 4.0, 10.0, 1.5)) == [(0, 4), (10, 4)]
  assert list(audio_folder.crop_windows(22.0, 4.0, 10.0, 1.5)) == [(0, 4), (10, 4), (20, 2)]


@pytest.mark.parametrize('entry,expected', [
    ('a.wav', ('a.wav', None)), ('./sub//b.wav', ('sub/b.wav', None)),
    ('sub\\b.wav', ('sub/b.wav', None)), ('sub/../a.wav', ('a.wav', None)),
    ('../a.wav', (None, 'outside_root')), ('sub/../../a.wav', (None, 'outside_root')),
    ('..', (None, 'outside_root')), ('/etc/passwd', (None, 'outside_root')),
    ('C:\\music\\a.wav', (None, 'outside_root')), ('\\\\server\\a.wav', (None, 'outside_root')),
    ('', (None, 'bad_entry')), ('a\x00.wav', (None, 'bad_entry')), (None, (None, 'bad_entry')),
    (3, (None, 'bad_entry')),
])
def test_caption_entries_cannot_leave_the_root(entry, expected):
  assert audio_folder.normalize_entry(entry) == expected


def test_jsonl_captions(tmp_path):
  for name in ('a.wav', 'b.wav'):
    (tmp_path / name).write_bytes(b'')
  lines = [
      {'file': 'a.wav', 'caption': 'a tune', 'tags': ['x', ' y ']},
      {'file': 'b.wav', 'caption': 'b', 'tags': 'p; q'},
      {'file': 'a.wav', 'caption': 'again'},
      {'file': '../secret.wav', 'caption': 'no'},
      {'file': 'gone.wav'},
      {'file': 'b.wav', 'caption': 5},
      ['not', 'an', 'object'],
  ]
  text = '\n'.join(json.dumps(l) for l in lines) + '\n{broken json\n\n'
  (tmp_path / 'captions.jsonl').write_text(text)
  problems = SkipCounter('captions')
  captions = audio_folder.read_captions(str(tmp_path), {'a.wav', 'b.wav'}, problems)
  assert captions == {'a.wav': audio_folder.Caption('a tune', ('x', 'y')),
                      'b.wav': audio_folder.Caption('b', ('p', 'q'))}
  assert problems.as_dict() == {'bad_entry': 2, 'duplicate_entry': 2, 'not_found': 1,
                                'outside_root': 1}


def test_held_out_rule_is_a_stable_hash():
  names = [f'dir{i}/song{i}.wav' for i in range(200)]
  held = [n for n in names if audio_folder.is_held_out(n, 0.25)]
  assert held == [n for n in names if _held_out(n, 0.25)]
  assert 25 < len(held) < 75
  assert not any(audio_folder.is_held_out(n, 0.0) for n in names)


def test_config_validation():
  with pytest.raises(ValueError):
    audio_folder.AudioFolderConfig(name='x', clip_seconds=0)
  with pytest.raises(ValueError):
    audio_folder.AudioFolderConfig(name='x', validation_fraction=1.0)
  with pytest.raises(ValueError):
    audio_folder.AudioFolderConfig(name='x', clip_seconds=2, min_seconds=3)


# --- one build with the convenience function ------------------------------------------------

@pytest.fixture(scope='module')
def folder_build(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('audio_folder')
  root = tmp / 'music'
  (root / 'nested' / 'deeper').mkdir(parents=True)
  (root / '.cache').mkdir()
  rng = np.random.default_rng(0)
  long_src = (rng.uniform(-0.5, 0.5, 15 * SR) * 32767).astype(np.int16)
  sf.write(root / 'long.wav', long_src, SR, subtype='PCM_16')
  sf.write(root / 'short.flac', _tone(440, 2.5, 44100), 44100)
  sf.write(root / 'tiny.wav', _tone(440, 0.5, SR), SR)
  sf.write(root / 'nested' / 'deeper' / 'song.ogg', _tone(660, 5.0, 32000), 32000)
  sf.write(root / 'gap.wav', np.concatenate([np.zeros(4 * SR, np.float32),
                                             _tone(550, 4.0, SR)]), SR)
  sf.write(root / 'silent.wav', np.zeros(5 * SR, np.float32), SR)
  (root / 'corrupt.wav').write_bytes(b'RIFF\x10\x00\x00\x00WAVEfmt garbage' * 30)
  sf.write(root / '.hidden.wav', _tone(440, 5.0, SR), SR)
  sf.write(root / '.cache' / 'x.wav', _tone(440, 5.0, SR), SR)
  (root / 'notes.txt').write_text('not audio')
  sf.write(tmp / 'outside.wav', _tone(440, 5.0, SR), SR)
  (root / 'captions.csv').write_text(
      'file,caption,tags\n'
      'long.wav,A long noise piece,"rock; punchy, loud"\n'
      'nested/deeper/song.ogg,A nested song,"piano,calm"\n'
      '../outside.wav,escape,x\n'
      f'{tmp / "outside.wav"},absolute,x\n'
      'missing.wav,gone,x\n'
      'long.wav,again,x\n'
      'nested\\deeper\\song.ogg,again with backslashes,x\n')
  builder, report = audio_folder.build_audio_folder(str(root), str(tmp / 'data'), **CONFIG)
  return dict(builder=builder, report=report, examples=_as_examples(builder),
              long_src=long_src, root=root, tmp=tmp)


def test_files_are_split_by_hash_disjointly(folder_build):
  ex = folder_build['examples']
  assert set(ex) == {'train', 'validation'}
  files = {s: {e['file'].decode() for e in v.values()} for s, v in ex.items()}
  assert not files['train'] & files['validation']
  assert files['train'] == {'short.flac'}
  assert files['validation'] == {'long.wav', 'nested/deeper/song.ogg', 'gap.wav'}
  for name in files['validation']:
    assert _held_out(name, CONFIG['validation_fraction'])
  for name in ('short.flac', 'tiny.wav', 'silent.wav', 'corrupt.wav'):
    assert not _held_out(name, CONFIG['validation_fraction'])
  assert folder_build['report']['files'] == {'train': 4, 'validation': 3}


def test_long_file_is_cut_into_exact_windows(folder_build):
  ex = folder_build['examples']['validation']
  crops = sorted((e for e in ex.values() if e['file'] == b'long.wav'),
                 key=lambda e: e['start_s'])
  assert [e['start_s'] for e in crops] == [0, 3, 6, 9, 12]
  assert [e['id'].decode() for e in crops] == [f'long.wav@{s}.000' for s in (0, 3, 6, 9, 12)]
  assert [e['end_s'] for e in crops] == pytest.approx([4, 7, 10, 13, 15])
  src = folder_build['long_src'].astype(np.int32)
  for e in crops:
    start = int(e['start_s']) * SR
    audio = e['audio']
    assert audio.dtype == np.int16
    assert len(audio) == (4 * SR if e['start_s'] < 12 else 3 * SR)
    # Same rate, so the crop is the file's window itself (up to int16 rescaling).
    assert np.abs(audio.astype(np.int32) - src[start:start + len(audio)]).max() <= 1
    assert e['caption'] == b'A long noise piece'
    assert [t.decode() for t in e['aspects']] == ['rock', 'punchy, loud']


def test_short_nested_and_partly_silent_files(folder_build):
  train, val = folder_build['examples']['train'], folder_build['examples']['validation']
  short = train['short.flac@0.000']
  assert len(short['audio']) == int(2.5 * SR) and short['caption'] == b''
  song = val['nested/deeper/song.ogg@0.000']
  assert len(song['audio']) == 4 * SR and song['caption'] == b'A nested song'
  assert [t.decode() for t in song['aspects']] == ['piano', 'calm']
  assert [k for k in val if k.startswith('nested/')] == ['nested/deeper/song.ogg@0.000']
  # gap.wav: the silent first crop is dropped, the crop at 3 s (1 s silence + tone) kept.
  assert [k for k in val if k.startswith('gap.wav')] == ['gap.wav@3.000']


def test_skips_and_caption_problems_are_counted(folder_build):
  report = folder_build['report']
  assert report['skipped']['train'] == {'too_short': 1, 'silent': 1, 'unreadable': 1}
  assert report['skipped']['validation'] == {'silent_crop': 1}
  assert report['skipped']['captions'] == {'outside_root': 2, 'not_found': 1,
                                           'duplicate_entry': 2}
  assert report['warnings']['train'] == {'no_caption': 1}
  assert report['warnings']['validation'] == {'no_caption': 1}
  assert report['examples'] == {'scan': 7, 'captions': 2, 'train': 1, 'validation': 7}
  assert report['empty_splits'] == []
  # Ignored files never became examples.
  all_files = {e['file'].decode() for v in folder_build['examples'].values() for e in v.values()}
  assert not any('outside' in f or f.startswith('.') or '/.' in f for f in all_files)


def test_same_arguments_reuse_the_build(folder_build):
  builder, report = audio_folder.build_audio_folder(
      str(folder_build['root']), str(folder_build['tmp'] / 'data'), **CONFIG)
  assert builder.builder_config.name == folder_build['builder'].builder_config.name
  assert report == folder_build['report']


# --- the plain TFDS route: a config object, no subclass, no manual_dir ----------------------

def test_tfds_builder_with_a_user_config_and_jsonl_captions(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  root = tmp_path / 'corpus'
  root.mkdir()
  sf.write(root / 'a.wav', _tone(440, 3.0, SR), SR)
  sf.write(root / 'b_side-take.wav', _tone(880, 2.0, 16000), 16000)
  (root / 'captions.jsonl').write_text(
      json.dumps({'file': 'a.wav', 'caption': 'hello', 'tags': ['x', 'y']}) + '\n'
      + json.dumps({'file': '../a.wav', 'caption': 'escape'}) + '\n'
      + '{"file": "a.wav", oops\n')
  config = audio_folder.AudioFolderConfig(name='my_corpus', root=str(root), clip_seconds=2.0,
                                          caption_from_filename=True)
  builder = tfds.builder('audio_folder', config=config, data_dir=str(tmp_path / 'data'))
  builder.download_and_prepare()
  ex = _as_examples(builder)['train']
  assert sorted(ex) == ['a.wav@0.000', 'a.wav@2.000', 'b_side-take.wav@0.000']
  assert ex['a.wav@2.000']['audio'].shape == (SR,)        # the 1 s tail (min: half a clip)
  assert ex['b_side-take.wav@0.000']['audio'].shape == (2 * SR,)
  assert ex['b_side-take.wav@0.000']['caption'] == b'b side take'
  assert [t.decode() for t in ex['a.wav@0.000']['aspects']] == ['x', 'y']
  report = builder_utils.skip_report(builder)
  assert report['skipped']['captions'] == {'outside_root': 1, 'bad_entry': 1}
  assert report['warnings']['train'] == {'caption_from_filename': 1}
  assert 'validation' not in builder.info.splits
