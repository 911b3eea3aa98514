"""musiclm-jax codec_report: every level's reconstruction scored, on any folder of audio."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import soundfile as sf

from musiclm_jax.codec import losses
from musiclm_jax.evaluation import codec_report
from musiclm_jax.generate import export
from tests.generate import tiny_pipeline


def _tone(seconds: float, rate: int, freq: float) -> np.ndarray:
  t = np.arange(int(seconds * rate)) / rate
  return (0.3 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
          ).astype(np.float32)


def test_report_of_a_folder_scores_every_level_against_the_codec_itself(tmp_path, capsys):
  model, variables = tiny_pipeline.codec()
  codec_dir = export.save_codec(str(tmp_path / 'codec'), model, variables)
  folder = tmp_path / 'music'
  (folder / 'deep').mkdir(parents=True)
  sf.write(folder / 'a.wav', _tone(1.5, 24000, 220.0), 24000)
  # 44.1 kHz stereo in a sub-folder: resampled and downmixed.
  stereo = np.stack([_tone(1.5, 44100, 330.0), _tone(1.5, 44100, 440.0)], axis=1)
  sf.write(folder / 'deep' / 'b.flac', stereo, 44100)
  sf.write(folder / 'short.wav', _tone(0.2, 24000, 220.0), 24000)  # under --seconds: skipped
  (folder / 'broken.wav').write_bytes(b'RIFF not really')  # unreadable: skipped
  out = tmp_path / 'report'

  rc = codec_report.main(['--codec', codec_dir, '--audio_dir', str(folder), '--seconds', '1',
                          '--num_clips', '10', '--out_dir', str(out), '--no_progress',
                          '--no_opus'])
  assert rc == 0
  captured = capsys.readouterr()
  assert 'skipped short.wav: shorter than 1 s' in captured.err
  assert 'skipped broken.wav: unreadable' in captured.err
  result = json.loads((out / 'report.json').read_text())
  assert result['num_clips'] == 2 and result['levels'] == model.num_levels
  rows = {r['name']: r for r in result['rows']}
  assert rows['input itself']['mel_distance'] == 0.0
  levels = [r for r in result['rows'] if r['levels'] is not None]
  assert [r['levels'] for r in levels] == list(range(model.num_levels + 1))
  assert [r['kbps'] for r in levels] == [n * model.bitrate(1) / 1000 for n in
                                         range(model.num_levels + 1)]
  for r in levels[2:]:
    assert abs(r['gain'] - (levels[r['levels'] - 1]['mel_distance'] - r['mel_distance'])) < 1e-9
  assert 'latent, no RVQ' in rows and 'latent, time mean' in rows
  assert not any(name.startswith('Opus') for name in rows)

  # The all-levels row is the codec's own encode -> decode, scored independently.
  clips = codec_report.folder_clips(str(folder), 24000, 1.0, 10)
  device_variables = jax.device_put(variables)
  codes = model.apply(device_variables, jnp.asarray(clips), method=type(model).encode)
  recon = model.apply(device_variables, codes, method=type(model).decode)[:, :clips.shape[1]]
  expected = float(np.mean(losses.multi_scale_mel_distance(jnp.asarray(clips), recon)))
  assert abs(rows[f'{model.num_levels} levels']['mel_distance'] - expected) < 1e-4

  assert (out / 'levels.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  table = (out / 'report.md').read_text()
  assert f'| {model.num_levels} | ' in table and '| latent, no RVQ |' in table
  assert table in captured.out


def test_report_refuses_bad_input_in_one_line(tmp_path, capsys):
  rc = codec_report.main(['--codec', str(tmp_path), '--audio_dir', str(tmp_path),
                          '--out_dir', str(tmp_path / 'out')])
  assert rc == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'neither a codec directory' in err[0]
  model, variables = tiny_pipeline.codec()
  codec_dir = export.save_codec(str(tmp_path / 'codec'), model, variables)
  (tmp_path / 'empty').mkdir()
  rc = codec_report.main(['--codec', codec_dir, '--audio_dir', str(tmp_path / 'empty'),
                          '--out_dir', str(tmp_path / 'out')])
  assert rc == 2
  assert 'no readable audio file' in capsys.readouterr().err
  assert not os.path.exists(tmp_path / 'out')
  rc = codec_report.main(['--codec', codec_dir, '--step', '3', '--audio_dir',
                          str(tmp_path / 'empty'), '--out_dir', str(tmp_path / 'out')])
  assert rc == 2
  assert 'is a frozen codec with one set of weights' in capsys.readouterr().err
