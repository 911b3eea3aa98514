"""MusicCaps builder: parsing the real CSV, hostile ytids and aspect lists, one tiny build."""
from __future__ import annotations

import csv
import os

import numpy as np
import pytest
import soundfile as sf

from musiclm_jax.audio.io import SkipCounter
from musiclm_jax.data import builder_utils, musiccaps
from musiclm_jax.data.aspects import TagParseError, parse_string_list, split_tags, tags_from_value

CSV_PATH = os.path.join(os.path.dirname(__file__), '..', '..', '..', 'shared', 'data',
                        musiccaps.CSV_NAME)
CSV_PATH = os.environ.get('MUSICCAPS_CSV', os.path.normpath(CSV_PATH))
needs_csv = pytest.mark.skipif(not os.path.isfile(CSV_PATH),
                               reason=f'the MusicCaps CSV is not at {CSV_PATH}')
SR = 24000


def _real_rows():
  return musiccaps.read_csv(CSV_PATH)


def _tone(freqs_and_seconds, rate, channels=1, amplitude=0.5):
  """Concatenated sine tones: [(freq, seconds), ...] -> [samples] or [samples, channels]."""
  parts = []
  for freq, seconds in freqs_and_seconds:
    t = np.arange(int(round(seconds * rate))) / rate
    parts.append(amplitude * np.sin(2 * np.pi * freq * t))
  x = np.concatenate(parts).astype(np.float32)
  return np.stack([x] * channels, axis=1) if channels > 1 else x


def _dominant_hz(audio, rate=SR):
  spectrum = np.abs(np.fft.rfft(audio.astype(np.float64) * np.hanning(len(audio))))
  return np.argmax(spectrum) * rate / len(audio)


# --- parsing, on every row of the real CSV -------------------------------------------------

@needs_csv
def test_every_real_row_parses_with_nonempty_aspects_and_split_counts():
  warnings = SkipCounter('t')
  rows = [musiccaps.parse_row(r, warnings) for r in _real_rows()]
  assert len(rows) == 5521 and not warnings.counts
  for row in rows:
    assert row.aspects and all(isinstance(a, str) and a for a in row.aspects), row.ytid
    assert row.audioset_labels and all(l.startswith('/') for l in row.audioset_labels)
    assert row.end_s - row.start_s == 10.0
    assert musiccaps.is_valid_ytid(row.ytid)
  counts = {s: sum(s in r.splits() for r in rows) for s in musiccaps.SPLITS}
  assert counts == {'train': 2663, 'eval': 2858, 'eval_balanced': 1000}
  # The balanced subset is part of AudioSet eval, and ytids are unique.
  assert all(r.is_audioset_eval for r in rows if r.is_balanced_subset)
  assert len({r.ytid for r in rows}) == 5521


@needs_csv
def test_quotes_inside_aspects_parse_like_python_wrote_them():
  rows = {r['ytid']: r for r in _real_rows()}
  tricky = [r for r in rows.values() if '"' in r['aspect_list']]
  assert tricky  # e.g. ["children's song", ...] and 'punchy "4 on the floor" kick'
  for raw in tricky:
    aspects = parse_string_list(raw['aspect_list'])
    assert any("'" in a or '"' in a for a in aspects), raw['aspect_list']


@pytest.mark.parametrize('text', [
    "__import__('os').system('touch PWNED_BY_ASPECTS')",
    "[__import__('os').system('touch PWNED_BY_ASPECTS')]",
    "['a', __import__('os').getcwd()]",
    "['a'] + ['b']", "['a', 1]", "[['a']]", "{'a'}", "'a'", "[f'{1}']", "[b'a']", "[None]",
    "lambda: 1", "['a'", "", "['a\x00']" + '\x00', "[" * 5000 + "]" * 5000,
    "[" + "'a', " * 60000 + "]",
])
def test_aspect_parser_refuses_anything_but_a_list_of_strings(text, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(TagParseError):
    parse_string_list(text)
  assert not os.listdir(tmp_path)  # nothing was executed


def test_aspect_parser_accepts_lists_and_tuples_of_strings():
  assert parse_string_list("['a', \"b's\", ' c ', '']") == ['a', "b's", 'c']
  assert parse_string_list("('x',)") == ['x']
  assert parse_string_list('[]') == []
  assert split_tags('/m/04rlf,/m/0342h', (',',)) == ['/m/04rlf', '/m/0342h']
  assert split_tags('rock; punchy, loud ;') == ['rock', 'punchy, loud']
  assert split_tags("['a', 'b']") == ['a', 'b']
  assert tags_from_value(['a', ' b ']) == ['a', 'b'] and tags_from_value(None) == []
  with pytest.raises(TagParseError):
    tags_from_value(['a', 3])


@pytest.mark.parametrize('ytid', ['../etc/passwd', 'a/b', '..', '.', '/etc/passwd', 'a\\b', '',
                                  'a\x00b', ' a', 'C:x', 'a.wav', 'x' * 65, None])
def test_path_like_ytids_are_rejected(ytid):
  assert not musiccaps.is_valid_ytid(ytid)
  row = {'ytid': ytid, 'start_s': '0', 'end_s': '10', 'audioset_positive_labels': '',
         'aspect_list': "['a']", 'caption': 'c', 'author_id': '1',
         'is_balanced_subset': 'False', 'is_audioset_eval': 'False'}
  with pytest.raises(musiccaps.RowError) as e:
    musiccaps.parse_row(row)
  assert e.value.reason == 'bad_ytid'


@pytest.mark.parametrize('field,value', [('start_s', 'x'), ('end_s', '0'), ('start_s', 'nan'),
                                         ('author_id', 'a'), ('is_audioset_eval', 'yes')])
def test_malformed_rows_are_rejected(field, value):
  row = {'ytid': 'abc', 'start_s': '0', 'end_s': '10', 'audioset_positive_labels': '',
         'aspect_list': "['a']", 'caption': 'c', 'author_id': '1',
         'is_balanced_subset': 'False', 'is_audioset_eval': 'False', field: value}
  with pytest.raises(musiccaps.RowError) as e:
    musiccaps.parse_row(row)
  assert e.value.reason == 'bad_row'


def test_csv_location_and_no_clip_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='musiccaps-public.csv'):
    musiccaps.find_csv(str(tmp_path))
  other = tmp_path / 'elsewhere.csv'
  other.write_text('x')
  assert musiccaps.find_csv(str(tmp_path), str(other)) == str(other)
  with pytest.raises(ValueError, match='missing columns'):
    musiccaps.read_csv(str(other))


@needs_csv
def test_no_clip_at_all_is_a_clear_error(tmp_path):
  manual = tmp_path / 'manual'
  manual.mkdir()
  (manual / 'unrelated.wav').write_bytes(b'RIFF')
  builder = musiccaps.MusicCaps(
      config=musiccaps.MusicCapsConfig(name='noclip', csv_path=CSV_PATH, max_rows=20),
      data_dir=str(tmp_path / 'data'))
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with pytest.raises(FileNotFoundError, match='No MusicCaps clip found in manual_dir') as e:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  assert str(manual) in str(e.value) and 'clips/' in str(e.value)


# --- one build from synthetic clips ---------------------------------------------------------

def _pick(rows, n, **flags):
  out = []
  for r in rows:
    if all(r[k] == str(v) for k, v in flags.items()) and float(r['end_s']) <= 60:
      out.append(r)
  return out[:n]


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """Builds MusicCaps once from the real CSV (+ hostile rows) and a handful of synthetic clips."""
  if not os.path.isfile(CSV_PATH):
    pytest.skip(f'the MusicCaps CSV is not at {CSV_PATH}')
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tmp = tmp_path_factory.mktemp('musiccaps')
  manual = tmp / 'manual'
  (manual / 'clips').mkdir(parents=True)
  (manual / 'audio').mkdir()
  rows = _real_rows()
  train = _pick(rows, 7, is_audioset_eval=False)
  eval_only = _pick(rows, 2, is_audioset_eval=True, is_balanced_subset=False)
  balanced = _pick(rows, 1, is_audioset_eval=True, is_balanced_subset=True)
  roles = {
      'stereo44k': train[0], 'flac': train[1], 'mp3': train[2], 'track': train[3],
      'corrupt': train[4], 'silent': train[5], 'short': train[6],
      'subfolder': eval_only[0], 'windowed_ogg': eval_only[1], 'balanced': balanced[0],
  }
  y = {role: r['ytid'] for role, r in roles.items()}
  sf.write(manual / f'{y["stereo44k"]}.wav', _tone([(1000, 10)], 44100, channels=2), 44100)
  sf.write(manual / f'{y["flac"]}.flac', _tone([(500, 10.3)], 48000), 48000)
  sf.write(manual / f'{y["mp3"]}.mp3', _tone([(750, 10)], 44100), 44100, format='MP3')
  # A whole track: 440 Hz outside the window, 660 Hz then 990 Hz inside it.
  start = float(roles['track']['start_s'])
  sf.write(manual / f'{y["track"]}.wav',
           _tone([(440, start), (660, 5), (990, 5), (440, 5)], 22050), 22050)
  (manual / f'{y["corrupt"]}.wav').write_bytes(b'RIFF\x00\x00\x00\x00WAVEjunk' * 50)
  sf.write(manual / f'{y["silent"]}.wav', np.zeros(SR * 10, np.float32), SR)
  sf.write(manual / f'{y["short"]}.wav', _tone([(300, 5)], SR), SR)
  sf.write(manual / 'clips' / f'{y["subfolder"]}.wav', _tone([(1200, 10)], 16000), 16000)
  w = roles['windowed_ogg']
  sf.write(manual / 'audio' / f'{w["ytid"]}_{int(float(w["start_s"]) * 1000)}-'
           f'{int(float(w["end_s"]) * 1000)}.ogg', _tone([(880, 10)], 32000), 32000,
           format='OGG')
  sf.write(manual / f'{y["balanced"]}.wav', _tone([(600, 10)], SR), SR)
  # Files where path tricks in a ytid would lead: they must never be opened.
  bait = _tone([(100, 10)], SR)
  sf.write(tmp / 'outside.wav', bait, SR)
  (manual / 'a').mkdir()
  sf.write(manual / 'a' / 'b.wav', bait, SR)
  sf.write(manual / '..wav', bait, SR, format='WAV')

  # The real CSV, one aspect list made hostile, plus hostile and duplicate rows.
  header = list(musiccaps.CSV_COLUMNS)
  out_rows = []
  for r in rows:
    r = dict(r)
    if r['ytid'] == y['balanced']:
      r['aspect_list'] = "__import__('os').system('touch PWNED')"
    out_rows.append(r)
  template = dict(roles['flac'])
  for bad in ('../outside', 'a/b', '..', str(tmp / 'outside')):
    out_rows.append(dict(template, ytid=bad))
  out_rows.append(dict(template))  # a duplicate ytid
  with open(manual / musiccaps.CSV_NAME, 'w', newline='', encoding='utf-8') as f:
    writer = csv.DictWriter(f, header)
    writer.writeheader()
    writer.writerows(out_rows)

  opened = []
  real_info, real_load = musiccaps.audio_info, musiccaps.load_audio

  def spy_info(path, *a, **k):
    opened.append(os.path.abspath(path))
    return real_info(path, *a, **k)

  def spy_load(path, *a, **k):
    opened.append(os.path.abspath(path))
    return real_load(path, *a, **k)

  cwd = os.getcwd()
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(musiccaps, 'audio_info', spy_info)
    mp.setattr(musiccaps, 'load_audio', spy_load)
    mp.chdir(manual)  # a relative '..' would resolve from here
    builder, report = musiccaps.build_musiccaps(str(manual), str(tmp / 'data'), name='test')
  assert os.getcwd() == cwd
  examples = {split: {ex['id'].decode(): ex for ex in tfds.as_numpy(builder.as_dataset(split))}
              for split in builder.info.splits}
  return dict(builder=builder, report=report, examples=examples, y=y, roles=roles,
              opened=opened, tmp=tmp, manual=manual)


def test_splits_hold_the_good_clips(built):
  y, ex = built['y'], built['examples']
  assert set(ex) == {'train', 'eval', 'eval_balanced'}
  assert set(ex['train']) == {y['stereo44k'], y['flac'], y['mp3'], y['track']}
  assert set(ex['eval']) == {y['subfolder'], y['windowed_ogg'], y['balanced']}
  assert set(ex['eval_balanced']) == {y['balanced']}


def test_skips_are_counted_by_reason_and_stored(built):
  report = built['report']
  skipped = report['skipped']
  assert skipped['csv'] == {'bad_ytid': 4, 'duplicate_ytid': 1}
  assert skipped['train'] == {'missing': 2663 - 7, 'unreadable': 1, 'silent': 1,
                              'too_short': 1}
  assert skipped['eval'] == {'missing': 2858 - 3}
  assert skipped['eval_balanced'] == {'missing': 999}
  assert report['examples'] == {'csv': 5521, 'train': 4, 'eval': 3, 'eval_balanced': 1}
  assert report['warnings']['csv'] == {'bad_aspect_list': 1}
  assert built['y']['corrupt'] in report['skipped_examples']['train']['unreadable']
  assert report['empty_splits'] == []
  # The report survives the build: a fresh builder reads it back from metadata.json.
  again = musiccaps.MusicCaps(config=built['builder'].builder_config,
                              data_dir=str(built['tmp'] / 'data'))
  assert builder_utils.skip_report(again)['skipped'] == skipped


def test_hostile_rows_never_reach_the_file_system(built):
  tmp, manual = built['tmp'], built['manual']
  assert built['opened']  # the spies saw the real reads
  assert str(tmp / 'outside.wav') not in built['opened']
  assert str(manual / 'a' / 'b.wav') not in built['opened']
  assert str(manual / '..wav') not in built['opened']
  assert all(p.startswith(str(manual) + os.sep) for p in built['opened'])
  assert not (manual / 'PWNED').exists() and not (tmp / 'PWNED').exists()
  # The hostile aspect list became an empty list; the example is kept.
  ex = built['examples']['eval'][built['y']['balanced']]
  assert list(ex['aspects']) == []


def test_audio_is_mono_int16_of_exact_length_at_24k(built):
  assert built['builder'].info.features['audio'].sample_rate == SR
  for split in built['examples'].values():
    for ex in split.values():
      assert ex['audio'].dtype == np.int16 and ex['audio'].shape == (10 * SR,)
      assert np.abs(ex['audio']).max() > 1000
  ex = built['examples']['train']
  y = built['y']
  assert _dominant_hz(ex[y['stereo44k']]['audio']) == pytest.approx(1000, abs=2)
  assert _dominant_hz(ex[y['flac']]['audio']) == pytest.approx(500, abs=2)
  assert _dominant_hz(ex[y['mp3']]['audio']) == pytest.approx(750, abs=2)
  assert _dominant_hz(built['examples']['eval'][y['windowed_ogg']]['audio']) == pytest.approx(
      880, abs=2)
  # Stereo is averaged, not summed: a 0.5 amplitude tone stays near 0.5 full scale.
  assert np.abs(ex[y['stereo44k']]['audio']).max() == pytest.approx(0.5 * 32767, rel=0.05)


def test_whole_track_is_cut_at_start_s_to_end_s(built):
  audio = built['examples']['train'][built['y']['track']]['audio']
  assert _dominant_hz(audio[int(0.3 * SR):int(4.7 * SR)]) == pytest.approx(660, abs=3)
  assert _dominant_hz(audio[int(5.3 * SR):int(9.7 * SR)]) == pytest.approx(990, abs=3)


def test_fields_match_the_csv(built):
  roles, ex = built['roles'], built['examples']
  row = roles['track']
  got = ex['train'][row['ytid']]
  assert got['ytid'].decode() == row['ytid'] and got['caption'].decode() == row['caption']
  assert got['start_s'] == float(row['start_s']) and got['end_s'] == float(row['end_s'])
  assert [a.decode() for a in got['aspects']] == parse_string_list(row['aspect_list'])
  assert [l.decode() for l in got['audioset_labels']] == row[
      'audioset_positive_labels'].split(',')
  assert got['author_id'] == int(row['author_id'])
  assert not got['is_audioset_eval'] and not got['is_balanced_subset']
  bal = ex['eval_balanced'][roles['balanced']['ytid']]
  assert bal['is_audioset_eval'] and bal['is_balanced_subset']
