"""`musiclm-jax demo`: clips, spectrograms and a page from a pipeline folder."""
import json
import os
import re

import numpy as np
import pytest
import soundfile as sf

from musiclm_jax.generate import demo


def test_demo_writes_every_clip_and_a_page_linking_them(tiny_pipeline, tmp_path):
  out = str(tmp_path / 'demo')
  captions = ['a calm piano melody', 'a lively violin tune with drums']
  record = demo.run_demo(tiny_pipeline[0], out, captions=captions, seconds=2.0,
                         story='a calm piano melody:1|a lively violin tune:1', progress=False)
  sections = [item['section'] for item in record['items']]
  # two captions, the hummed tune given, the melody-conditioned clip, the story
  assert sections[:2] == ['Text', 'Text'] and len(sections) == 5
  assert sections[2] == 'Melody given' and sections[3] == 'Text + hummed melody'
  assert sections[4].startswith('Story')
  for item in record['items']:
    audio, rate = sf.read(os.path.join(out, item['wav']))
    assert rate == 24000 and abs(len(audio) / rate - 2.0) < 0.05
    assert np.isfinite(audio).all()
    with open(os.path.join(out, item['png']), 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  page = open(os.path.join(out, 'index.html')).read()
  linked = re.findall(r'src="([^"]+)"', page)
  assert sorted(linked) == sorted([i['wav'] for i in record['items']] +
                                  [i['png'] for i in record['items']])
  assert all(os.path.exists(os.path.join(out, l)) for l in linked)  # relative links resolve
  assert 'a lively violin tune with drums' in page
  saved = json.load(open(os.path.join(out, 'demo.json')))
  assert set(saved['speed']) == {'captions', 'melody', 'story'}
  assert saved['speed']['captions']['audio_seconds'] == pytest.approx(4.0, abs=0.1)


def test_the_hummed_tune_is_a_voiced_pitched_signal():
  tune, title = demo.hummed_tune(3.0)
  assert tune.shape == (72000,) and tune.dtype == np.float32 and title
  assert 0.01 < np.sqrt(np.mean(tune ** 2)) < 1.0
  spectrum = np.abs(np.fft.rfft(tune))
  # a hum: the energy sits in a few harmonics below 2 kHz, not spread like noise
  assert spectrum[:6000].sum() > 0.8 * spectrum.sum()


def test_demo_errors_name_the_bad_argument(tiny_pipeline, tmp_path, capsys):
  assert demo.main(['--checkpoint', str(tmp_path / 'nothing'), '--out_dir', str(tmp_path)]) == 2
  assert f'--checkpoint {tmp_path / "nothing"}: no pipeline folder there' in capsys.readouterr().err
  with pytest.raises(demo.DemoError, match='--melody .*no_tune.wav: no such file'):
    demo.run_demo(tiny_pipeline[0], str(tmp_path), melody=str(tmp_path / 'no_tune.wav'))
  with pytest.raises(ValueError, match='story'):
    demo.run_demo(tiny_pipeline[0], str(tmp_path), story='no seconds here')
