"""A directory replace killed between its two renames, and fsync before the rename (issue 21).

Each fault is reproduced as a dead writer leaves it: a child process killed with SIGKILL at a
chosen point of `write_directory_atomically`, or, in this process, a `Killed` exception after which
every rename and delete fails too (so no clean-up handler can repair anything, as after a kill).
The next call that touches the target must then restore the old copy, finish the replace, or keep
both and say how to resolve it.
"""
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import seqio
import tensorflow as tf

from musiclm_jax.data import builder_utils, model_dir, token_cache

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECORD = 'record.json'

# A writer replacing DIR/model with a copy whose record says 'new', which dies (SIGKILL) or stops
# (SIGSTOP) at a point named by argv[2]:
#   second_rename: on renaming its staging folder to the target (the old one is already aside);
#   after_second_rename: on the first rename after that one (the new copy is in place);
#   cleanup: on deleting the old copy.
CHILD = r'''
import json, os, shutil, signal, sys
from musiclm_jax.data import model_dir

out, at, sig = sys.argv[1], sys.argv[2], getattr(signal, sys.argv[3])
real_replace, real_rmtree = os.replace, shutil.rmtree
state = {'in_place': False}

def stop():
  os.kill(os.getpid(), sig)

def replace(src, dst):
  staging = os.path.basename(src).startswith('.model-new-')
  if (at == 'second_rename' and staging) or (at == 'after_second_rename' and state['in_place']):
    stop()
  real_replace(src, dst)
  state['in_place'] = state['in_place'] or staging

def rmtree(path, *args, **kwargs):
  if at == 'cleanup' and 'old' in os.path.basename(path):
    stop()
  real_rmtree(path, *args, **kwargs)

os.replace, shutil.rmtree = replace, rmtree

def write(staging):
  with open(os.path.join(staging, 'record.json'), 'w') as f:
    json.dump({'format': 'test', 'version': 'new'}, f)
  with open(os.path.join(staging, 'weights.bin'), 'wb') as f:
    f.write(b'new weights')

model_dir.write_directory_atomically(out, write, overwrite=True)
'''


def _make_model(out, version='old'):
  os.makedirs(out)
  with open(os.path.join(out, RECORD), 'w') as f:
    json.dump({'format': 'test', 'version': version}, f)
  with open(os.path.join(out, 'weights.bin'), 'wb') as f:
    f.write(f'{version} weights'.encode())


def _read(out):
  record = model_dir.read_model_record(out, RECORD, 'test', 'test model', 'make one')
  with open(os.path.join(out, 'weights.bin'), 'rb') as f:
    return record['version'], f.read()


def _write_new(staging):
  with open(os.path.join(staging, RECORD), 'w') as f:
    json.dump({'format': 'test', 'version': 'newer'}, f)


def _child(out, at, sig='SIGKILL'):
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.Popen([sys.executable, '-c', CHILD, out, at, sig], env=env, cwd=REPO)


def _killed_writer(out, at):
  child = _child(out, at)
  assert child.wait(timeout=120) == -signal.SIGKILL


def test_kill_between_the_renames_restores_the_old_copy(tmp_path, caplog):
  out = str(tmp_path / 'model')
  _make_model(out)
  _killed_writer(out, 'second_rename')
  assert not os.path.exists(out)  # the fault: the old copy is aside, the new one not in place
  with caplog.at_level(logging.WARNING):
    assert _read(out) == ('old', b'old weights')
  assert 'previous copy is back in place' in caplog.text
  assert os.listdir(tmp_path) == ['model']  # no hidden old copy, journal or staging left
  # A writer without overwrite sees the restored copy.
  with pytest.raises(FileExistsError):
    model_dir.write_directory_atomically(out, _write_new)


def test_kill_between_the_renames_is_restored_by_the_next_write(tmp_path):
  out = str(tmp_path / 'model')
  _make_model(out)
  _killed_writer(out, 'second_rename')
  model_dir.write_directory_atomically(out, _write_new, overwrite=True)
  assert model_dir.read_model_record(out, RECORD, 'test', 'm', 'm')['version'] == 'newer'
  assert os.listdir(tmp_path) == ['model']


def test_kill_before_the_old_copy_is_deleted_finishes_the_replace(tmp_path):
  out = str(tmp_path / 'model')
  _make_model(out)
  _killed_writer(out, 'cleanup')
  assert _read(out) == ('new', b'new weights')
  assert os.listdir(tmp_path) == ['model']


def test_both_copies_are_kept_and_reported_when_the_new_one_is_not_known_complete(tmp_path,
                                                                                   caplog):
  out = str(tmp_path / 'model')
  _make_model(out)
  _killed_writer(out, 'after_second_rename')
  with caplog.at_level(logging.WARNING):
    assert _read(out) == ('new', b'new weights')  # reading still works
  assert 'not known that the new' in caplog.text
  assert len(os.listdir(tmp_path)) > 1  # nothing deleted
  with pytest.raises(model_dir.InterruptedReplaceError, match='go back to the old one') as e:
    model_dir.write_directory_atomically(out, _write_new, overwrite=True)
  # The command it gives restores the old copy.
  command = re.search(r'go back to the old one: (.*)$', str(e.value)).group(1)
  subprocess.run(['bash', '-c', command], check=True)
  assert _read(out) == ('old', b'old weights')
  assert os.listdir(tmp_path) == ['model']


def test_a_live_writer_between_the_renames_is_not_disturbed(tmp_path, caplog):
  out = str(tmp_path / 'model')
  _make_model(out)
  child = _child(out, 'second_rename', 'SIGSTOP')
  try:
    _, status = os.waitpid(child.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status)
    with pytest.raises(model_dir.InterruptedReplaceError, match=f'pid {child.pid}'):
      model_dir.write_directory_atomically(out, _write_new, overwrite=True)
    with caplog.at_level(logging.WARNING):
      with pytest.raises(FileNotFoundError):
        _read(out)
    assert f'pid {child.pid}' in caplog.text and 'mv ' in caplog.text
  finally:
    os.kill(child.pid, signal.SIGCONT)
  assert child.wait(timeout=120) == 0
  assert _read(out) == ('new', b'new weights')
  assert os.listdir(tmp_path) == ['model']


def test_files_and_folders_are_fsynced_before_the_rename(tmp_path, monkeypatch):
  out = str(tmp_path / 'model')
  _make_model(out)
  synced, renames = [], []
  real_fsync, real_replace = os.fsync, os.replace

  def fsync(fd):
    synced.append(os.readlink(f'/proc/self/fd/{fd}'))
    real_fsync(fd)

  def replace(src, dst):
    renames.append((os.fspath(src), os.fspath(dst), len(synced)))
    real_replace(src, dst)

  monkeypatch.setattr(os, 'fsync', fsync)
  monkeypatch.setattr(os, 'replace', replace)
  written = []

  def write(staging):
    os.makedirs(os.path.join(staging, 'variables', 'params'))
    for name in (RECORD, 'variables/manifest', 'variables/params/0'):
      with open(os.path.join(staging, name), 'w') as f:
        f.write('{"format": "test", "version": "new"}')
    written.extend(os.path.join(root, n) for root, dirs, names in os.walk(staging)
                   for n in [''] + dirs + names)

  model_dir.write_directory_atomically(out, write, overwrite=True)
  staging = written[0].rstrip('/')
  (before,) = [n for src, dst, n in renames if src == staging and dst == out]
  expected = {os.path.realpath(p) for p in written}
  assert expected <= set(synced[:before]), expected - set(synced[:before])
  assert os.path.realpath(tmp_path) in synced[before:]  # the parent, after the rename
  assert model_dir.read_model_record(out, RECORD, 'test', 'm', 'm')['version'] == 'new'


class Killed(BaseException):
  """The writer's process dies here: nothing after it runs to completion."""


def _die_at(monkeypatch, rename_src=None):
  """From the first rename of `rename_src` (or a call of the returned kill()) on, every rename
  and delete raises Killed, as if the process had been killed there."""
  dead = []

  def kill():
    dead.append(True)
    raise Killed()

  def patch(owner, name, is_rename):
    real = getattr(owner, name)

    def fake(src, *args, **kwargs):
      if dead or (is_rename and rename_src and os.fspath(src) == rename_src):
        kill()
      return real(src, *args, **kwargs)
    monkeypatch.setattr(owner, name, fake)

  for owner, name, is_rename in ((os, 'replace', True), (os, 'rename', True),
                                 (os, 'remove', False), (shutil, 'rmtree', False),
                                 (tf.io.gfile, 'rename', True), (tf.io.gfile, 'rmtree', False),
                                 (tf.io.gfile, 'remove', False)):
    patch(owner, name, is_rename)
  return kill


def _fake_cache(task_dir, version, provenance):
  os.makedirs(task_dir)
  for name, text in (('COMPLETED', ''), ('train.tfrecord-00000-of-00001', version)):
    with open(os.path.join(task_dir, name), 'w') as f:
      f.write(text)
  if provenance:
    with open(os.path.join(task_dir, token_cache.PROVENANCE_FILE), 'w') as f:
      f.write('{}')


CACHED_TASK = 'atomic_replace_cached_task'


def _cached_task():
  if CACHED_TASK not in seqio.TaskRegistry.names():
    seqio.TaskRegistry.add(
        CACHED_TASK, source=seqio.FunctionDataSource(
            lambda split, shuffle_files, seed=None: tf.data.Dataset.range(1), splits=('train',)),
        preprocessors=[seqio.CacheDatasetPlaceholder()], output_features={})
  return CACHED_TASK


@pytest.mark.parametrize('through_gfile', [False, True])
def test_token_cache_replace_killed_between_the_renames_is_rolled_back(
    tmp_path, monkeypatch, caplog, through_gfile):
  if through_gfile:  # the code path of gs:// caches, on a local folder
    monkeypatch.setattr(token_cache, '_cache_files',
                        lambda _: token_cache._RemoteCacheFiles(tf.io.gfile))
  root = str(tmp_path)
  final = token_cache.task_cache_dir(_cached_task(), root)
  _fake_cache(final, 'old tokens', provenance=False)  # the old cache lacks provenance.json
  tmp = f'{final}.incomplete-1'
  _fake_cache(tmp, 'new tokens', provenance=True)
  with monkeypatch.context() as m:
    _die_at(m, rename_src=tmp)
    with pytest.raises(Killed):
      token_cache._install(tmp, final)
  assert not os.path.exists(final)
  # The next check restores the old cache (it fails as the old cache would: no provenance).
  with caplog.at_level(logging.WARNING):
    with pytest.raises(token_cache.StaleCacheError, match='no provenance.json'):
      token_cache.check_cache_provenance(CACHED_TASK, root)
  assert 'previous copy is back in place' in caplog.text
  with open(os.path.join(final, 'train.tfrecord-00000-of-00001')) as f:
    assert f.read() == 'old tokens'
  assert os.listdir(root) == [os.path.basename(final)]  # the dead run's staging is gone too


class FakeBuilder:
  """A TFDS builder's data_dir and download_and_prepare, writing `version`."""

  def __init__(self, data_dir, version, during_prepare=None):
    self.data_dir, self.version, self.during_prepare = data_dir, version, during_prepare

  def download_and_prepare(self, download_config):
    del download_config
    if self.during_prepare:  # while generating (TFDS renames its output into place at the end)
      self.during_prepare()
    os.makedirs(self.data_dir)
    with open(os.path.join(self.data_dir, 'dataset_info.json'), 'w') as f:
      f.write(self.version)


def test_builder_rebuild_killed_half_way_is_rolled_back(tmp_path, monkeypatch, caplog):
  data_dir = str(tmp_path / 'corpus' / '1.0.0')
  builder_utils.prepare(lambda: FakeBuilder(data_dir, 'old'))
  with monkeypatch.context() as m:
    kill = _die_at(m)
    with pytest.raises(Killed):
      builder_utils.prepare(lambda: FakeBuilder(data_dir, 'new', kill), overwrite=True)
  with caplog.at_level(logging.WARNING):
    builder = builder_utils.prepare(lambda: FakeBuilder(data_dir, 'unwanted'))
  with open(os.path.join(builder.data_dir, 'dataset_info.json')) as f:
    assert f.read() == 'old'
  assert 'previous copy is back in place' in caplog.text
  assert os.listdir(tmp_path / 'corpus') == ['1.0.0']
