"""`musiclm-jax build_data` and the SeqIO audio tasks over a prepared corpus."""
from __future__ import annotations

import os

import gin
import numpy as np
import pytest
import soundfile as sf
import tensorflow_datasets as tfds

from musiclm_jax import main
from musiclm_jax.data import audio_folder, build
from tasks import audio as audio_tasks

SR = 24000


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config(clear_constants=False)
  yield
  gin.clear_config(clear_constants=False)


def _tone(freq, seconds, rate=SR):
  t = np.arange(int(seconds * rate)) / rate
  return (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture(scope='module')
def music_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp('my_music')
  sf.write(root / 'long.wav', _tone(330, 5.0, 44100), 44100)
  sf.write(root / 'short.flac', _tone(440, 2.0), SR)
  (root / 'broken.wav').write_bytes(b'RIFF\x00\x00not really a wave file')
  (root / 'captions.csv').write_text('file,caption,tags\nlong.wav,a long tone,tone;sine\n')
  return root


def _build_cmd(music_folder, data_dir, *extra):
  return ['build_data', '--gin_file=data/audio_folder.gin',
          f"--gin.MANUAL_DIR='{music_folder}'", f"--gin.DATA_DIR='{data_dir}'",
          '--gin.CLIP_SECONDS=2.0', '--gin.HOP_SECONDS=2.0', *extra]


@pytest.fixture(scope='module')
def built(music_folder, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('tfds')
  summary_file = data_dir / 'summary.json'
  gin.clear_config(clear_constants=False)
  rc = main.main(_build_cmd(music_folder, data_dir,
                            f"--gin.build_dataset.summary_file='{summary_file}'"))
  gin.clear_config(clear_constants=False)
  assert rc == 0
  import json  # pylint: disable=g-import-not-at-top
  return data_dir, json.loads(summary_file.read_text())


def test_build_data_reports_examples_hours_and_skips(built, capsys):
  data_dir, summary = built
  # long.wav: crops at 0, 2 s and the 1 s tail (>= half a clip); short.flac: one 2 s crop.
  assert summary['splits']['train']['examples'] == 4
  assert summary['hours'] == pytest.approx((2 + 2 + 1 + 2) / 3600, rel=1e-3)
  assert summary['skipped']['train'] == {'unreadable': 1}
  assert summary['tfds_name'].startswith('audio_folder/')
  assert summary['data_dir'].startswith(str(data_dir))
  assert 'unreadable 1' in build.format_summary(summary)


def test_audio_task_crops_to_the_models_length(built):
  data_dir, summary = built
  task = audio_tasks.register_audio_task('test_my_music_audio', summary['tfds_name'],
                                         tfds_data_dir=str(data_dir))
  crops = list(tfds.as_numpy(task.get_dataset({'audio': 12000}, split='train', shuffle=False,
                                              seed=3)))
  assert len(crops) == 4
  for ex in crops:
    assert ex['audio'].dtype == np.float32 and ex['audio'].shape == (12000,)
    assert np.max(np.abs(ex['audio'])) < 1.0
  # Without an audio length the clips stay whole.
  whole = list(tfds.as_numpy(task.get_dataset({}, split='train', shuffle=False)))
  assert sorted(len(ex['audio']) for ex in whole) == [SR, 2 * SR, 2 * SR, 2 * SR]
  by_id = {ex['id']: ex for ex in whole}
  for ex in crops:  # each crop is a window of its clip
    clip = by_id[ex['id']]['audio']
    starts = [i for i in range(len(clip) - 12000 + 1)
              if np.array_equal(clip[i:i + 12000], ex['audio'])]
    assert starts, ex['id']
  again = list(tfds.as_numpy(task.get_dataset({'audio': 12000}, split='train', shuffle=False,
                                              seed=3)))
  assert all(np.array_equal(a['audio'], b['audio']) for a, b in zip(crops, again))
  captions = {ex['id'].decode().split('@')[0]: ex['caption'].decode() for ex in whole}
  assert captions['long.wav'] == 'a long tone'


def test_failed_rebuild_keeps_the_previous_build(music_folder, tmp_path):
  folder = tmp_path / 'corpus'
  folder.mkdir()
  sf.write(folder / 'a.wav', _tone(220, 2.0), SR)
  builder, _ = audio_folder.build_audio_folder(folder, tmp_path / 'tfds', name='corpus',
                                               clip_seconds=2.0)
  before = builder.info.splits['train'].num_examples
  files = sorted(os.listdir(builder.data_dir))
  (folder / 'a.wav').write_bytes(b'now broken')  # every file bad: the rebuild fails
  with pytest.raises(Exception):
    audio_folder.build_audio_folder(folder, tmp_path / 'tfds', name='corpus', clip_seconds=2.0,
                                    overwrite=True)
  assert sorted(os.listdir(builder.data_dir)) == files
  again, _ = audio_folder.build_audio_folder(folder, tmp_path / 'tfds', name='corpus',
                                             clip_seconds=2.0)
  assert again.info.splits['train'].num_examples == before
  assert len(list(again.as_dataset(split='train'))) == before
  leftovers = [p for p in os.listdir(os.path.dirname(builder.data_dir)) if 'previous' in p]
  assert not leftovers


@pytest.mark.parametrize('bindings,message', [
    (["--gin.build_dataset.name='nonsense'"], 'unknown dataset'),
    (["--gin.MANUAL_DIR='/no/such/folder'"], '/no/such/folder'),
])
def test_build_data_errors_name_the_binding(music_folder, tmp_path, capsys, bindings, message):
  rc = main.main(_build_cmd(music_folder, tmp_path) + bindings)
  assert rc == 2
  assert message in capsys.readouterr().err


def test_embedded_music_tiny_task(tmp_path, capsys):
  rc = main.main(['build_data', '--gin_file=data/embedded_music.gin',
                  "--gin.DATASET='embedded_music/tiny'", f"--gin.DATA_DIR='{tmp_path}'",
                  f"--gin.PREVIEW_DIR='{tmp_path / 'preview'}'"])
  assert rc == 0
  out = capsys.readouterr().out
  assert 'embedded_music/tiny:1.1.0' in out and 'total' in out
  previews = sorted(os.listdir(tmp_path / 'preview'))
  assert 'preview.png' in previews and sum(p.endswith('.wav') for p in previews) >= 2
  assert (tmp_path / 'preview' / 'preview.png').stat().st_size > 10000
  task = audio_tasks.register_audio_task('test_embedded_music_tiny', 'embedded_music/tiny:1.1.0',
                                         tfds_data_dir=str(tmp_path))
  examples = list(tfds.as_numpy(task.get_dataset({'audio': 2 * SR}, split='train',
                                                 shuffle=False)))
  assert examples and all(ex['audio'].shape == (2 * SR,) for ex in examples)
  assert all(ex['caption'] and len(ex['aspects']) and ex['melody_id'] for ex in examples)


def test_tokenize_caches_best_rq_tokens_of_the_embedded_corpus(tmp_path, tiny_corpus_dir):
  """The Beam cache over a real TFDS source: cached tokens equal the task's on-the-fly tokens."""
  import seqio  # pylint: disable=g-import-not-at-top
  data_dir, cache_dir = tiny_corpus_dir, tmp_path / 'cache'
  assert main.main(['tokenize', '--gin_file=examples/tokenize_embedded_music_best_rq.gin',
                    "--gin.TASKS=['embedded_music_tiny_best_rq']", '--gin.MIN_SHARDS=2',
                    "--gin.SPLITS=['validation']", f"--gin.TFDS_DATA_DIR='{data_dir}'",
                    f"--gin.CACHE_DIR='{cache_dir}'"]) == 0
  task = seqio.TaskRegistry.get('embedded_music_tiny_best_rq')
  seqio.set_tfds_data_dir_override(str(data_dir))
  seqio.add_global_cache_dirs([str(cache_dir)])
  assert (cache_dir / task.name / 'COMPLETED').exists()
  cached = {ex['id']: ex for ex in tfds.as_numpy(task.get_dataset(
      None, split='validation', use_cached=True, shuffle=False))}
  fresh = {ex['id']: ex for ex in tfds.as_numpy(task.get_dataset(
      None, split='validation', use_cached=False, shuffle=False))}
  assert cached.keys() == fresh.keys() and cached
  for key, ex in cached.items():
    assert 'audio' not in ex  # only tokens and text are cached
    assert ex['best_rq_tokens'].shape == (4 * 50,)
    np.testing.assert_array_equal(ex['best_rq_tokens'], fresh[key]['best_rq_tokens'])
  # The tokens say something about the audio: not one code repeated everywhere.
  assert len(np.unique(np.concatenate([ex['best_rq_tokens'] for ex in cached.values()]))) > 20
  seqio.set_tfds_data_dir_override(None)
