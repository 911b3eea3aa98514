"""Sampling settings and the output path are checked before any compute (issue 21, item 6).

Each test is an attack: a NaN, infinite or out-of-range setting, a seed JAX cannot take, an
--out that cannot be written. The library (`StageSampling`, `Pipeline.generate_tokens`) and
`musiclm-jax sample` refuse it with one line naming the setting, before the pipeline loads (the
CLI) or any stage samples (the library).
"""
from __future__ import annotations

import math

import pytest

from musiclm_jax import main
from musiclm_jax.generate import pipeline as pipeline_lib
from musiclm_jax.generate.pipeline import StageSampling

NAN, INF = math.nan, math.inf
HUGE_SEED = 2**70  # 1180591620717411303424: an OverflowError traceback in jax.random.key


def _sampling(**overrides) -> StageSampling:
  values = dict(temperature=1.0, window_seconds=2.0, stride_seconds=1.0)
  values.update(overrides)
  return StageSampling(**values)


# ------------------------------------------------------------------ StageSampling


@pytest.mark.parametrize('field, value', [
    ('temperature', NAN), ('temperature', INF), ('temperature', -0.5),
    ('top_k', -1), ('top_k', 2.5), ('top_k', NAN), ('top_k', 2**40),
    ('top_p', 0.0), ('top_p', NAN), ('top_p', 1.5), ('top_p', -INF),
    ('guidance_scale', NAN), ('guidance_scale', INF), ('guidance_scale', -1.0),
    ('window_seconds', NAN), ('window_seconds', INF),
    ('stride_seconds', NAN), ('stride_seconds', 0.0),
    ('temperature', '1.0'), ('temperature', None), ('guidance_scale', True),
    pytest.param('temperature', 10**400, id='temperature-10**400'),  # too large for a float
])
def test_stage_sampling_refuses_a_bad_value_naming_it(field, value):
  with pytest.raises(ValueError) as error:
    _sampling(**{field: value})
  message = str(error.value)
  assert message.startswith(f'{field} must be ') and '\n' not in message, message


def test_stage_sampling_keeps_valid_values_as_their_types():
  s = _sampling(temperature=0, top_k=40, top_p=1, guidance_scale=0, window_seconds=2)
  assert s == _sampling(temperature=0.0, top_k=40, top_p=1.0, guidance_scale=0.0)
  assert type(s.temperature) is float and type(s.top_k) is int and type(s.top_p) is float
  assert StageSampling.from_json(s.to_json(), 'x') == s
  with pytest.raises(ValueError, match='stride_seconds .* at most window_seconds'):
    _sampling(stride_seconds=3.0)


def test_a_pipeline_record_with_a_nan_setting_is_refused_naming_where():
  entry = _sampling().to_json()
  entry['top_p'] = NAN  # what json.load gives for NaN in a hand-edited pipeline.json
  with pytest.raises(ValueError, match=r'^/p/pipeline.json sampling.fine: top_p must be '):
    StageSampling.from_json(entry, '/p/pipeline.json sampling.fine')


# ------------------------------------------------------------------ Pipeline.generate_tokens


@pytest.fixture
def no_compute(pipeline, monkeypatch):
  """The tiny pipeline, failing the test if it tokenizes a prompt or samples a stage."""
  def computed(*args, **kwargs):
    pytest.fail('the pipeline computed before refusing the settings')
  for method in ('text_tokens', '_run_stage', '_decode_audio'):
    monkeypatch.setattr(pipeline, method, computed)
  return pipeline


@pytest.mark.parametrize('kwargs, message', [
    (dict(guidance_scale=NAN), "guidance_scale: the semantic stage's guidance_scale must be a "
     'finite number >= 0'),
    (dict(guidance_scale={'coarse': -2.0}), "guidance_scale: the coarse stage's guidance_scale"),
    (dict(temperatures=[NAN, NAN, NAN]), "temperatures: the semantic stage's temperature must "
     'be a finite number >= 0'),
    (dict(temperatures=[1.0, 0.95, INF]), "temperatures: the fine stage's temperature"),
    (dict(temperatures='1.0'), 'temperatures: give a number, one per stage'),
    (dict(top_k=-1), "top_k: the semantic stage's top_k must be an int"),
    (dict(top_k={'fine': 2.5}), "top_k: the fine stage's top_k must be an int"),
    (dict(seed=HUGE_SEED), 'seed must be an int in [0, 2**32 - 1 = 4294967295], got '
     '1180591620717411303424'),
    (dict(seed=-1), 'seed must be an int in [0, 2**32 - 1'),
    (dict(seed=2**32), 'seed must be an int in [0, 2**32 - 1'),
    (dict(seed=1.5), 'seed must be an int'),
    (dict(num_samples=0), 'num_samples must be a positive int'),
])
def test_generate_tokens_refuses_bad_settings_before_computing(no_compute, kwargs, message):
  with pytest.raises(ValueError) as error:
    no_compute.generate_tokens('a calm piano melody', 1.0, **kwargs)
  assert str(error.value).startswith(message) and '\n' not in str(error.value), error.value


def test_generate_tokens_refuses_nan_seconds_before_computing(no_compute):
  with pytest.raises(ValueError, match='seconds must be in'):
    no_compute.generate_tokens('a calm piano melody', NAN)


# ------------------------------------------------------------------ musiclm-jax sample


@pytest.fixture
def no_load(monkeypatch):
  """Fails the test if `musiclm-jax sample` loads the pipeline."""
  def load(*args, **kwargs):
    pytest.fail('the pipeline was loaded before the bad input was refused')
  monkeypatch.setattr(pipeline_lib.Pipeline, 'load', load)


def _sample(tmp_path, capsys, *flags, out=None):
  argv = ['sample', '--checkpoint', str(tmp_path / 'pipeline'), '--prompt', 'calm piano',
          '--out', str(out or tmp_path / 'out.wav'), '--no_progress', *flags]
  rc = main.main(argv)
  captured = capsys.readouterr()
  return rc, captured.err


@pytest.mark.parametrize('flags, message', [
    (['--guidance_scale', 'nan'], '--guidance_scale: guidance_scale must be a finite number '
     '>= 0 (0 = unconditional, 1 = plain conditional sampling, > 1 guided), got nan'),
    (['--guidance_scale', 'inf'], '--guidance_scale: guidance_scale must be a finite number'),
    (['--guidance_scale', '-1'], '--guidance_scale: guidance_scale must be a finite number'),
    (['--temperatures', 'nan,nan,nan'], '--temperatures (the semantic stage): temperature must '
     'be a finite number >= 0 (0 = greedy), got nan'),
    (['--temperatures', '1,inf,0.4'], '--temperatures (the coarse stage): temperature must be '
     'a finite number >= 0 (0 = greedy), got inf'),
    (['--temperatures', '1,0.9'], "--temperatures '1,0.9': expected three numbers"),
    (['--top_k', '-1'], '--top_k: top_k must be an int in [0, 2**31)'),
    (['--seed', str(HUGE_SEED)], '--seed must be an int in [0, 2**32 - 1 = 4294967295], got '
     '1180591620717411303424'),
    (['--seed=-1'], '--seed must be an int in [0, 2**32 - 1'),
    (['--seconds', 'nan'], '--seconds nan: seconds must be in (0, 600]'),
    (['--seconds', 'inf'], '--seconds inf: seconds must be in (0, 600]'),
])
def test_sample_refuses_bad_settings_in_one_line_before_loading(tmp_path, capsys, no_load,
                                                                 flags, message):
  rc, err = _sample(tmp_path, capsys, *flags)
  assert rc == 2
  lines = err.splitlines()
  assert len(lines) == 1 and lines[0].startswith(f'musiclm-jax sample: error: {message}'), err
  assert not (tmp_path / 'out.wav').exists()


def test_sample_refuses_an_out_under_a_regular_file_before_loading(tmp_path, capsys, no_load):
  (tmp_path / 'notes.txt').write_text('a file, not a directory')
  out = tmp_path / 'notes.txt' / 'takes' / 'out.wav'
  rc, err = _sample(tmp_path, capsys, out=out)
  assert rc == 2 and 'Traceback' not in err
  assert err.splitlines() == [f'musiclm-jax sample: error: --out {out}: cannot be written: '
                              f'{tmp_path / "notes.txt"} is not a directory']


def test_sample_refuses_a_directory_as_out_before_loading(tmp_path, capsys, no_load):
  out = tmp_path / 'album.wav'
  out.mkdir()
  rc, err = _sample(tmp_path, capsys, out=out)
  assert rc == 2 and 'Traceback' not in err
  assert err.splitlines() == [f'musiclm-jax sample: error: --out {out}: cannot be written: it '
                              'is a directory']
  # The spectrogram beside the wav, and each wav of a batch, are checked too.
  (tmp_path / 'song.png').mkdir()
  rc, err = _sample(tmp_path, capsys, out=tmp_path / 'song.wav')
  assert rc == 2 and f'--out {tmp_path / "song.png"}: cannot be written: it is a directory' in err
  (tmp_path / 'batch-2.wav').mkdir()
  rc, err = _sample(tmp_path, capsys, '--batch', '2', out=tmp_path / 'batch.wav')
  assert rc == 2 and f'--out {tmp_path / "batch-2.wav"}: cannot be written' in err


def test_sample_lets_valid_edge_settings_through_to_the_load(tmp_path, capsys, monkeypatch):
  def load(folder, **kwargs):
    raise ValueError(f'reached the load of {folder}')
  monkeypatch.setattr(pipeline_lib.Pipeline, 'load', load)
  out = tmp_path / 'new' / 'dirs' / 'out.wav'
  rc, err = _sample(tmp_path, capsys, '--guidance_scale', '0', '--temperatures', '0,0,0',
                    '--top_k', '0', '--seed', str(2**32 - 1), '--seconds', '600', out=out)
  assert rc == 2 and err.splitlines() == [
      f'musiclm-jax sample: error: reached the load of {tmp_path / "pipeline"}'], err
  assert not (tmp_path / 'new').exists()  # checking --out creates nothing
