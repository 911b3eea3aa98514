"""`musiclm-jax sample`: a wav and a spectrogram PNG, progress bars, one-line errors."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from musiclm_jax import main


def test_sample_writes_the_wav_and_a_spectrogram_beside_it(tiny_pipeline, tmp_path, capsys):
  folder, _ = tiny_pipeline
  out = tmp_path / 'samples' / 'piano.wav'
  rc = main.main(['sample', '--checkpoint', folder, '--prompt', 'a calm piano melody',
                  '--seconds', '2', '--out', str(out), '--seed', '3'])
  assert rc == 0
  captured = capsys.readouterr()
  for stage in ('semantic', 'coarse', 'fine', 'audio'):
    assert f'{stage}: 100%' in captured.err  # a progress bar per stage
  assert f'wrote {out}' in captured.out
  assert 'speed: semantic ' in captured.out and 'of compute per second of audio' in captured.out
  audio, rate = sf.read(str(out))
  assert rate == 24000 and audio.shape == (48000,) and np.std(audio) > 0
  png = (tmp_path / 'samples' / 'piano.png').read_bytes()
  assert png.startswith(b'\x89PNG') and len(png) > 10_000


def test_sample_story_batch_and_continuation(tiny_pipeline, tmp_path, capsys):
  folder, _ = tiny_pipeline
  out = tmp_path / 'story.wav'
  rc = main.main(['sample', '--checkpoint', folder, '--story', 'calm piano:1|fast drums:1',
                  '--out', str(out), '--batch', '2', '--no_progress'])
  assert rc == 0, capsys.readouterr().err
  for i in (1, 2):
    assert sf.info(str(tmp_path / f'story-{i}.wav')).duration == pytest.approx(2.0)
    assert (tmp_path / f'story-{i}.png').exists()
  cont = tmp_path / 'more.wav'
  rc = main.main(['sample', '--checkpoint', folder, '--continue', str(tmp_path / 'story-1.wav'),
                  '--seconds', '1.2', '--out', str(cont), '--no_progress'])
  assert rc == 0, capsys.readouterr().err
  assert sf.info(str(cont)).duration == pytest.approx(1.2)


@pytest.mark.parametrize('flags, message', [
    (['--prompt', ''], '--prompt is empty'),
    (['--prompt', 'x' * 10240], '--prompt is 10,240 characters long; the limit is 1,000'),
    (['--story', 'calm piano|drums:2'], "story segment 1 'calm piano': expected TEXT:SECONDS"),
    (['--prompt', 'piano', '--story', 'a:1'], 'give --prompt or --story, not both'),
    ([], 'give --prompt'),
    (['--prompt', 'piano', '--melody', 'CORRUPT'], 'melody file CORRUPT cannot be used: '
     'unreadable'),
    (['--prompt', 'piano', '--melody', 'MISSING'], '--melody MISSING: no such file'),
    (['--prompt', 'piano', '--seconds', '-3'], 'seconds must be in'),
    (['--prompt', 'piano', '--checkpoint', 'NOT_A_PIPELINE'], 'not a pipeline folder'),
    (['--prompt', 'piano', '--out', 'x.mp3'], "--out 'x.mp3': give a .wav path"),
])
def test_sample_reports_bad_input_in_one_line(tiny_pipeline, tmp_path, capsys, flags, message):
  folder, _ = tiny_pipeline
  corrupt = tmp_path / 'corrupt.wav'
  corrupt.write_bytes(b'RIFF\x24\x00\x00\x00WAVEfmt not audio at all')
  args = {'--checkpoint': folder, '--out': str(tmp_path / 'out.wav'), '--no_progress': None}
  replace = {'CORRUPT': str(corrupt), 'MISSING': str(tmp_path / 'missing.wav'),
             'NOT_A_PIPELINE': str(tmp_path)}
  flags = [replace.get(f, f) for f in flags]
  message = message.replace('CORRUPT', str(corrupt)).replace('MISSING',
                                                             str(tmp_path / 'missing.wav'))
  argv = ['sample'] + flags
  for key, value in args.items():
    if key not in flags:
      argv += [key] if value is None else [key, value]
  assert main.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith('musiclm-jax sample: error: ') and message in err[-1], err
  assert not (tmp_path / 'out.wav').exists()


def test_assemble_pipeline_command_from_gin(tiny_pipeline, tmp_path):
  import gin  # pylint: disable=g-import-not-at-top
  from musiclm_jax.generate.pipeline import read_pipeline_record  # pylint: disable=g-import-not-at-top
  _, parts = tiny_pipeline
  out = tmp_path / 'assembled'
  names = {'codec_dir': 'CODEC_DIR', 'semantic_tokenizer_dir': 'SEMANTIC_TOKENIZER_DIR',
           'mulan_conditioner_dir': 'MULAN_CONDITIONER_DIR',
           'melody_conditioner_dir': 'MELODY_CONDITIONER_DIR',
           'semantic_stage_dir': 'SEMANTIC_STAGE_DIR', 'coarse_stage_dir': 'COARSE_STAGE_DIR',
           'fine_stage_dir': 'FINE_STAGE_DIR'}
  try:
    rc = main.main(['assemble_pipeline', '--gin_file=runs/assemble_pipeline.gin',
                    f"--gin.OUT_DIR='{out}'", "--gin.PARAMS_DTYPE='bfloat16'",
                    "--gin.SAMPLING={'fine': {'temperature': 0.5}}",
                    *[f"--gin.{names[k]}='{v}'" for k, v in parts.items()]])
    assert rc == 0
    record = read_pipeline_record(str(out))
    assert record['sampling']['fine']['temperature'] == 0.5
    assert record['params_dtype'] == 'bfloat16' and 'melody_conditioner' in record['parts']
    gin.clear_config(clear_constants=False)
    assert main.main(['assemble_pipeline', '--gin_file=runs/assemble_pipeline.gin']) == 2
  finally:
    gin.clear_config(clear_constants=False)
