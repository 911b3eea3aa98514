"""A training run is never silently lost: each test is one fault a real MODEL_DIR meets.

A changed model against old checkpoints, a truncated last step, a second trainer in the same
MODEL_DIR, a lock left by a killed trainer, and retention that must not delete newer steps.
"""
import glob
import json
import logging
import os
import shutil
import socket
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from musiclm_jax.data.seqio_input import global_batch_spec
from musiclm_jax.train import trainer
from musiclm_jax.train.checkpoints import (LOCK_FILE, CheckpointError, Checkpointer,
                                           CheckpointRestoreError, ModelDirLock,
                                           ModelDirLockedError, abstract_with_shardings)
from musiclm_jax.train.partitioning import Partitioner
from musiclm_jax.train.train_state import StepFunctions
from tests.train.toy_setup import toy_dataset_config, toy_gin, toy_model, train_toy

# A failed restore leaves orbax's read coroutines un-awaited; Python reports each when collected.
pytestmark = pytest.mark.filterwarnings(
    'ignore:Exception ignored in.*_read_array_index_and_device_put'
    ':pytest.PytestUnraisableExceptionWarning')

# Every run here trains the same 4 steps (so XLA's persistent cache compiles the step once),
# saving synchronously at steps 1 (orbax's first step), 2 and 4.
RUN = ('TRAIN_STEPS=4', 'train.checkpoint_every_steps=2', 'train.async_checkpointing=False',
       'train.eval_every_steps=0', 'train.log_every_steps=4')


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(tree))]


def _steps(directory) -> list[int]:
  return Checkpointer(str(directory)).all_steps()


def _restore(model_dir, step=None):
  with toy_gin():
    model = toy_model()
    spec = global_batch_spec(toy_dataset_config())
  steps = StepFunctions(model, Partitioner(), spec)
  ckpt = Checkpointer(os.path.join(model_dir, 'checkpoints'))
  try:
    return ckpt.restore(abstract_with_shardings(steps.abstract_state, steps.state_shardings), step)
  finally:
    ckpt.close()


def _corrupt(step_dir):
  """Truncates every file of a step's state to half its length (a disk that lost a write)."""
  for path in glob.glob(os.path.join(step_dir, 'state', '**', '*'), recursive=True):
    if os.path.isfile(path):
      with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory):
  """A finished 4-step toy run with steps 1, 2 and 4 (copy it before changing it)."""
  model_dir = tmp_path_factory.mktemp('trained') / 'run'
  train_toy(model_dir, *RUN)
  assert _steps(model_dir / 'checkpoints') == [1, 2, 4]
  return model_dir


def test_changed_model_stops_naming_each_step_and_start_over_moves_them_aside(tmp_path):
  # Steps 2, 4, 6 of an older version of the model (a narrower MLP) sit in MODEL_DIR.
  model_dir = tmp_path / 'run'
  with toy_gin('TransformerConfig.mlp_dim=32'):
    old_model = toy_model()
    spec = global_batch_spec(toy_dataset_config())
  old = StepFunctions(old_model, Partitioner(), spec)
  old_state = old.init(jax.random.PRNGKey(0))
  ckpt = Checkpointer(str(model_dir / 'checkpoints'), keep=None, async_save=False)
  for step in (2, 4, 6):
    ckpt.save(step, old_state, {'batches_consumed': step}, force=True)
  ckpt.close()
  (model_dir / 'config.gin').write_text('# the old run\n')
  old_dirs = [model_dir / 'checkpoints' / str(s) for s in (2, 4, 6)]

  with pytest.raises(CheckpointRestoreError) as raised:
    train_toy(model_dir, *RUN)
  message = str(raised.value)
  for step in (2, 4, 6):
    assert f'step {step}: ValueError' in message  # each step, with why
  assert 'not compatible with the stored shape' in message
  assert '--gin.train.start_over=True' in message and 'Nothing was deleted' in message
  assert all(d.is_dir() for d in old_dirs)
  assert _steps(model_dir / 'checkpoints') == [2, 4, 6]
  assert (model_dir / 'config.gin').read_text() == '# the old run\n'
  assert not (model_dir / LOCK_FILE).exists()  # released on the error too

  result = train_toy(model_dir, *RUN, 'train.start_over=True')
  assert result.step == 4 and sorted(result.losses) == [1, 2, 3, 4]
  moved = glob.glob(str(model_dir / 'checkpoints.old-*'))
  assert len(moved) == 1
  assert _steps(moved[0]) == [2, 4, 6]  # every old step still on disk
  assert open(os.path.join(moved[0], 'config.gin')).read() == '# the old run\n'
  assert _steps(model_dir / 'checkpoints') == [1, 2, 4]
  assert 'train.train_steps' in (model_dir / 'config.gin').read_text()  # the new run's
  assert not (model_dir / LOCK_FILE).exists()

  # The start-over run restores like any other: the same command again resumes, moves nothing.
  again = train_toy(model_dir, *RUN, 'train.start_over=True')
  assert again.step == 4 and not again.losses
  assert len(glob.glob(str(model_dir / 'checkpoints.old-*'))) == 1


def test_truncated_last_step_is_trained_again_and_rewritten(trained_run, tmp_path):
  model_dir = tmp_path / 'run'
  shutil.copytree(trained_run, model_dir)
  _corrupt(model_dir / 'checkpoints' / '4')

  result = train_toy(model_dir, *RUN)
  assert sorted(result.losses) == [3, 4] and result.step == 4  # resumed from 2
  step, state, data = _restore(model_dir)
  assert step == 4 and int(state.step) == 4 and data['batches_consumed'] == 4
  # The rewritten step is the one the uninterrupted run wrote, bit for bit.
  _, reference, _ = _restore(trained_run)
  for a, b in zip(_leaves(reference), _leaves(state), strict=True):
    np.testing.assert_array_equal(a, b)
  # The unreadable step 4 was moved aside, not deleted.
  aside = glob.glob(str(model_dir / 'checkpoints.unreadable-*' / '4'))
  assert len(aside) == 1 and os.path.isdir(os.path.join(aside[0], 'state'))


def _tiny_checkpoints(directory, steps, keep=None):
  state = {'w': jnp.arange(8.0)}
  ckpt = Checkpointer(str(directory), keep=keep, async_save=False)
  for step in steps:
    ckpt.save(step, jax.tree_util.tree_map(lambda x, s=step: x + s, state),
              {'batches_consumed': step}, force=True)
  ckpt.close()
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def test_retention_never_deletes_a_step_newer_than_the_run(tmp_path):
  directory = tmp_path / 'checkpoints'
  target = _tiny_checkpoints(directory, (2, 4, 6))

  # Saving below a newer step: orbax's retention keeps the last ones *saved*, so a forced save of
  # step 3 with keep=2 would delete steps 2 and 4.
  ckpt = Checkpointer(str(directory), keep=2, async_save=False)
  assert ckpt.restore(target, step=2)[0] == 2
  with pytest.raises(CheckpointError, match='newer step 6'):
    ckpt.save(3, {'w': jnp.zeros(8)}, {}, force=True)
  ckpt.close()
  assert _steps(directory) == [2, 4, 6]

  # Steps 4 and 6 unreadable: the run resumes from 2, keeps 4 and 6 aside and writes them again.
  _corrupt(directory / '4')
  _corrupt(directory / '6')
  ckpt = Checkpointer(str(directory), keep=2, async_save=False)
  step, restored, _ = ckpt.resume(target)
  assert step == 2 and float(restored['w'][0]) == 2.0
  for s in (3, 4, 5, 6, 7):
    ckpt.save(s, {'w': jnp.full(8, float(s))}, {'batches_consumed': s}, force=True)
  ckpt.close()
  assert _steps(directory) == [6, 7]
  aside = glob.glob(str(tmp_path / 'checkpoints.unreadable-*'))
  assert len(aside) == 1 and sorted(os.listdir(aside[0])) == ['4', '6']


def test_second_trainer_in_the_same_model_dir_fails_at_once(trained_run, tmp_path):
  model_dir = tmp_path / 'run'
  shutil.copytree(trained_run, model_dir)
  before = sorted(os.listdir(model_dir / 'checkpoints'))
  # Another trainer (here a live process standing in for it) holds the lock.
  other = subprocess.Popen(['sleep', '600'])
  try:
    (model_dir / LOCK_FILE).write_text(json.dumps(
        {'host': socket.gethostname(), 'pid': other.pid, 'started': 'now',
         'started_unix': time.time()}))
    with pytest.raises(ModelDirLockedError, match=f'pid {other.pid} on host '
                                                  f'{socket.gethostname()}'):
      train_toy(model_dir, 'TRAIN_STEPS=8', *RUN[1:])
  finally:
    other.kill()
    other.wait()
  assert json.loads((model_dir / LOCK_FILE).read_text())['pid'] == other.pid  # left alone
  assert sorted(os.listdir(model_dir / 'checkpoints')) == before

  # A second trainer in the same process (e.g. a thread) is kept out the same way.
  (model_dir / LOCK_FILE).unlink()
  with ModelDirLock(str(model_dir)):
    with pytest.raises(ModelDirLockedError, match=f'pid {os.getpid()} '):
      train_toy(model_dir, 'TRAIN_STEPS=8', *RUN[1:])
    assert (model_dir / LOCK_FILE).exists()
  assert not (model_dir / LOCK_FILE).exists()


def test_stale_lock_of_a_dead_trainer_is_reported_and_taken_over(tmp_path, caplog):
  dead = subprocess.Popen(['true'])
  dead.wait()
  lock_path = tmp_path / LOCK_FILE
  lock_path.write_text(json.dumps(
      {'host': socket.gethostname(), 'pid': dead.pid, 'started': 'before the crash'}))
  with caplog.at_level(logging.WARNING):
    with ModelDirLock(str(tmp_path)):
      holder = json.loads(lock_path.read_text())
      assert holder['pid'] == os.getpid() and holder['host'] == socket.gethostname()
      assert holder['started'] != 'before the crash'
  assert f'process {dead.pid} is no longer running' in caplog.text
  assert not lock_path.exists()

  # The dead trainer's pid now belongs to a process that started later (pids are reused).
  later = subprocess.Popen(['sleep', '600'])
  try:
    lock_path.write_text(json.dumps({'host': socket.gethostname(), 'pid': later.pid,
                                     'started': 'long ago', 'started_unix': time.time() - 3600}))
    with caplog.at_level(logging.WARNING), ModelDirLock(str(tmp_path)):
      assert json.loads(lock_path.read_text())['pid'] == os.getpid()
  finally:
    later.kill()
    later.wait()
  assert f'process {later.pid} started after the lock was taken' in caplog.text

  # A lock whose holder runs on another host cannot be checked: it is not taken.
  lock_path.write_text(json.dumps({'host': 'elsewhere', 'pid': dead.pid, 'started': 'x'}))
  with pytest.raises(ModelDirLockedError, match=f'pid {dead.pid} on host elsewhere.*delete'):
    ModelDirLock(str(tmp_path)).acquire()


def test_config_gin_temporary_file_is_per_writer(tmp_path):
  # Another writer's temporary file of the same config.gin is in the middle of being written.
  other = tmp_path / 'config.gin.tmp'
  other.write_text('half of another writer')
  trainer.write_text_atomically(str(tmp_path), 'mine\n')
  assert (tmp_path / 'config.gin').read_text() == 'mine\n'
  assert other.read_text() == 'half of another writer'
  assert sorted(os.listdir(tmp_path)) == ['config.gin', 'config.gin.tmp']
