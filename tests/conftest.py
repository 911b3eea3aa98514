"""Test set-up: 8 simulated CPU devices and a persistent compilation cache, before JAX starts."""
import os

_flags = os.environ.get('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in _flags:
  _flags += ' --xla_force_host_platform_device_count=8'
# XLA's CPU collectives abort the process when a device thread waits over 40 s at a rendezvous;
# 8 simulated devices on a loaded 2-core machine can (seen: an abort in MuLan's all-gather while
# another job ran). Ten minutes instead: a slow test stays a slow test, not a crash.
if '--xla_cpu_collective_call_terminate_timeout_seconds' not in _flags:
  _flags += ' --xla_cpu_collective_call_terminate_timeout_seconds=600'
os.environ['XLA_FLAGS'] = _flags.strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('MUSICLM_JAX_COMPILATION_CACHE',
                      os.path.join(os.path.expanduser('~'), '.cache', 'musiclm_jax', 'xla'))

import jax  # noqa: E402  pylint: disable=g-import-not-at-top

from musiclm_jax.main import setup_compilation_cache  # noqa: E402

setup_compilation_cache()
assert jax.device_count() == 8, 'tests need 8 simulated devices: JAX started before conftest'


import pytest  # noqa: E402  pylint: disable=g-import-not-at-top,g-bad-import-order


@pytest.fixture(scope='session')
def tiny_corpus_dir(tmp_path_factory) -> str:
  """A TFDS data directory holding embedded_music/tiny (built once per test session, ~10 s)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from musiclm_jax.data import embedded_music  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  data_dir = str(tmp_path_factory.mktemp('tiny_corpus'))
  tfds.builder('embedded_music/tiny', data_dir=data_dir).download_and_prepare()
  return data_dir
