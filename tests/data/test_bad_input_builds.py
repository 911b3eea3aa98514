"""Every kind of bad audio file in a corpus: the build finishes and counts each under its reason."""
from __future__ import annotations

import collections
import csv

import numpy as np
import soundfile as sf

from musiclm_jax.audio.io import AudioLimits
from musiclm_jax.data import audio_folder, musiccaps
from tests.audio import bad_files

LIMITS = AudioLimits(max_seconds=3600.0)  # the 2-hour file is far longer than expected


def test_audio_folder_counts_every_bad_file(tmp_path):
  folder = tmp_path / 'music'
  folder.mkdir()
  reasons = bad_files.write_bad_files(str(folder))
  sf.write(folder / 'good.wav', bad_files.sine(10.0), bad_files.SR)
  builder, report = audio_folder.build_audio_folder(folder, tmp_path / 'tfds', name='bad',
                                                    clip_seconds=10.0, limits=LIMITS)
  assert builder.info.splits['train'].num_examples == 1  # good.wav alone
  expected = collections.Counter(reasons.values())
  assert report['skipped']['train'] == dict(expected), report['skipped_examples']
  assert sum(expected.values()) == len(reasons) >= 20


def test_musiccaps_counts_every_bad_clip(tmp_path):
  manual = tmp_path / 'manual'
  manual.mkdir()
  reasons = bad_files.write_bad_files(str(manual), stem_prefix='yt_')
  sf.write(manual / 'yt_good.wav', bad_files.sine(10.0, 330.0), bad_files.SR)
  ytids = sorted(name.rsplit('.', 1)[0] for name in reasons) + ['yt_good', 'yt_fetched_never']
  with open(manual / 'musiccaps-public.csv', 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['ytid', 'start_s', 'end_s', 'audioset_positive_labels', 'aspect_list',
                     'caption', 'author_id', 'is_balanced_subset', 'is_audioset_eval'])
    for ytid in ytids:
      writer.writerow([ytid, '0', '10', '/m/04rlf', "['test', 'sine']", f'{ytid} caption', '1',
                       'False', 'False'])
  builder, report = musiccaps.build_musiccaps(manual, tmp_path / 'tfds', name='bad',
                                              limits=LIMITS)
  examples = list(builder.as_dataset(split='train').as_numpy_iterator())
  assert [ex['ytid'].decode() for ex in examples] == ['yt_good']
  assert np.max(np.abs(examples[0]['audio'])) > 10000
  expected = collections.Counter(reasons.values())
  expected['missing'] += 1  # yt_fetched_never
  assert report['skipped']['train'] == dict(expected), report['skipped_examples']
