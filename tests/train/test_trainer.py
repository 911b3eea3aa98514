"""End-to-end trainer tests on the toy LM: meshes, exact resume, signals, non-finite steps."""
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from musiclm_jax.data.seqio_input import global_batch_spec
from musiclm_jax.train import trainer
from musiclm_jax.train.checkpoints import Checkpointer, abstract_with_shardings
from musiclm_jax.train.models import DecoderOnlyLM
from musiclm_jax.train.partitioning import Partitioner
from musiclm_jax.train.train_state import StepFunctions
from tests.train.toy_setup import REPO, toy_dataset_config, toy_gin, toy_model, train_toy

QUICK = ('train.eval_every_steps=0', 'train.log_every_steps=5')


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(tree))]


def test_mesh_2x1x4_matches_single_device(tmp_path):
  r8 = train_toy(tmp_path / 'mesh8', 'MESH_SHAPE=(2, 1, 4)', 'TRAIN_STEPS=20', *QUICK)
  r1 = train_toy(tmp_path / 'mesh1', 'MESH_SHAPE=(1, 1, 1)', 'TRAIN_STEPS=20', *QUICK)
  assert sorted(r8.losses) == list(range(1, 21))
  l8 = np.array([r8.losses[s] for s in range(1, 21)])
  l1 = np.array([r1.losses[s] for s in range(1, 21)])
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  assert l8[-3:].mean() < l8[:3].mean() - 0.2, l8  # it learns
  # The (2, 1, 4) run really was sharded: some parameter is split over 'model'.
  specs = jax.tree_util.tree_leaves(
      jax.tree_util.tree_map(lambda x: x.sharding.spec, r8.state.params))
  assert any('model' in tuple(s) for s in specs)
  assert r8.tokens_per_second and r8.tokens_per_second > 0
  config = (tmp_path / 'mesh8' / 'config.gin').read_text()
  assert 'train.train_steps = 20' in config or 'TRAIN_STEPS = 20' in config
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(tmp_path / 'mesh8' / 'train'))


def _cli(model_dir, *extra):
  cmd = [sys.executable, '-m', 'musiclm_jax.main', 'train', '--gin_file=examples/toy_lm.gin',
         f"--gin.MODEL_DIR='{model_dir}'", '--gin.TRAIN_STEPS=24', '--gin.MESH_SHAPE=(2, 1, 4)',
         '--gin.train.checkpoint_every_steps=8', '--gin.train.eval_every_steps=0',
         '--gin.train.progress_bar=False', *extra]
  return subprocess.run(cmd, cwd=REPO, env=dict(os.environ), capture_output=True, text=True,
                        timeout=600)


def _restore(model_dir, mesh_shape, step=None):
  with toy_gin():
    model = toy_model()
    spec = global_batch_spec(toy_dataset_config())
  steps = StepFunctions(model, Partitioner(mesh_shape), spec)
  ckpt = Checkpointer(os.path.join(model_dir, 'checkpoints'))
  restored_step, state, data = ckpt.restore(
      abstract_with_shardings(steps.abstract_state, steps.state_shardings), step)
  ckpt.close()
  return restored_step, state, data


def test_kill9_between_checkpoints_resumes_bit_exact(tmp_path):
  ref = _cli(tmp_path / 'ref')
  assert ref.returncode == 0, ref.stderr[-3000:]
  killed_dir = tmp_path / 'killed'
  killed = _cli(killed_dir, '--module_import=tests.train.toy_hooks',
                '--gin.train.step_hooks=[@signal_at_step()]', '--gin.signal_at_step.step=13')
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  steps_on_disk = Checkpointer(str(killed_dir / 'checkpoints')).all_steps()
  # Orbax saves the first step too. The async save of step 8 may still have been in flight when
  # the kill came: then only its temporary directory exists and step 1 is the last good one.
  assert steps_on_disk in ([1], [1, 8]), steps_on_disk
  again = _cli(killed_dir)
  assert again.returncode == 0, again.stderr[-3000:]
  assert f'step {steps_on_disk[-1]} -> 24' in again.stdout + again.stderr

  step_a, ref_state, ref_data = _restore(tmp_path / 'ref', (2, 1, 4))
  step_b, resumed_state, resumed_data = _restore(killed_dir, (2, 1, 4))
  assert step_a == step_b == 24 and ref_data == resumed_data
  assert int(resumed_state.step) == 24
  for a, b in zip(_leaves(ref_state), _leaves(resumed_state), strict=True):
    np.testing.assert_array_equal(a, b)  # bit for bit

  # A checkpoint written on (2, 1, 4) restores onto another mesh with the same values.
  _, other_mesh_state, _ = _restore(tmp_path / 'ref', (1, 2, 4))
  kernel_specs = {x.sharding.spec for x in jax.tree_util.tree_leaves(other_mesh_state.params)}
  assert any('fsdp' in tuple(s) for s in kernel_specs)
  for a, b in zip(_leaves(ref_state), _leaves(other_mesh_state), strict=True):
    np.testing.assert_array_equal(a, b)


def test_sigterm_saves_and_resume_continues(tmp_path):
  def send_sigterm(step, metrics):
    del metrics
    if step == 5:
      os.kill(os.getpid(), signal.SIGTERM)

  result = train_toy(tmp_path, 'TRAIN_STEPS=12', 'train.checkpoint_every_steps=100', *QUICK,
                     step_hooks_extra=[send_sigterm])
  # Hooks see a step's metrics while the next step runs, so the run stops after step 6.
  assert result.interrupted and result.step == 6
  assert Checkpointer(str(tmp_path / 'checkpoints')).all_steps() == [1, 6]
  resumed = train_toy(tmp_path, 'TRAIN_STEPS=8', 'train.checkpoint_every_steps=100', *QUICK)
  assert sorted(resumed.losses) == [7, 8] and not resumed.interrupted
  assert Checkpointer(str(tmp_path / 'checkpoints')).all_steps() == [1, 6, 8]


def test_truncated_or_corrupt_checkpoint_never_replaces_last_good(tmp_path):
  train_toy(tmp_path, 'TRAIN_STEPS=4', 'train.checkpoint_every_steps=2',
            'train.checkpoints_to_keep=None', *QUICK)
  ckpt_dir = tmp_path / 'checkpoints'
  # A save that died half way: orbax's temporary directory, never renamed.
  partial = ckpt_dir / '6.orbax-checkpoint-tmp-1234567'
  (partial / 'state').mkdir(parents=True)
  (partial / 'state' / 'junk').write_bytes(b'\0' * 10)
  step, state, data = _restore(tmp_path, (2, 1, 4))
  assert step == 4 and data['batches_consumed'] == 4 and int(state.step) == 4
  # A finalised step whose files were damaged afterwards: the older one is used, nothing deleted.
  for root, _, files in os.walk(ckpt_dir / '4' / 'state'):
    for f in files:
      with open(os.path.join(root, f), 'wb') as fh:
        fh.write(b'garbage')
  step, state, _ = _restore(tmp_path, (2, 1, 4))
  assert step == 2 and int(state.step) == 2
  assert (ckpt_dir / '4').exists()


class PoisonedLM(DecoderOnlyLM):
  """The toy LM with a NaN loss: every step must be skipped."""

  def compute_losses(self, params, model_state, batch, rng):
    losses, metrics, ms = super().compute_losses(params, model_state, batch, rng)
    return {k: v * jnp.nan for k, v in losses.items()}, metrics, ms


def test_nonfinite_steps_are_skipped_then_stop_keeps_last_checkpoint(tmp_path):
  train_toy(tmp_path, 'TRAIN_STEPS=3', 'train.checkpoint_every_steps=3', *QUICK)
  _, before, _ = _restore(tmp_path, (2, 1, 4))
  with toy_gin('TRAIN_STEPS=10', 'train.max_consecutive_skipped_steps=2', *QUICK):
    good = toy_model()
    poisoned = PoisonedLM(good.config, good.optimizer)
    seen = []
    with pytest.raises(trainer.NonFiniteTrainingError, match='max_consecutive_skipped_steps=2'):
      trainer.train(model=poisoned, model_dir=str(tmp_path), progress_bar=False,
                    step_hooks_extra=[lambda s, m: seen.append(m)])
  assert [m['skipped_step'] for m in seen] == [1.0, 1.0, 1.0]
  assert [m['skipped_in_a_row'] for m in seen] == [1, 2, 3]
  assert Checkpointer(str(tmp_path / 'checkpoints')).all_steps() == [1, 3]
  _, after, _ = _restore(tmp_path, (2, 1, 4))
  for a, b in zip(_leaves(before), _leaves(after), strict=True):
    np.testing.assert_array_equal(a, b)


def test_skipped_step_leaves_params_and_optimizer_untouched():
  with toy_gin():
    model = toy_model()
    spec = global_batch_spec(toy_dataset_config())
  steps = StepFunctions(model, Partitioner((2, 1, 4)), spec)
  state = steps.init(jax.random.PRNGKey(0))
  batch = {k: jnp.ones(v.shape, v.dtype) for k, v in spec.items()}
  # Poison one weight: loss and gradients become NaN.
  poisoned_params = jax.tree_util.tree_map(lambda x: x, state.params)
  norm = poisoned_params['model']['decoder_norm']
  norm['scale'] = norm['scale'].at[0].set(jnp.nan)
  state = state.replace(params=poisoned_params)
  before = _leaves((state.params, state.opt_state))
  new_state, metrics = steps.train_step(state, batch)
  assert float(metrics['skipped_step']) == 1.0
  assert int(new_state.skipped_in_a_row) == 1 and int(new_state.skipped_total) == 1
  assert int(new_state.step) == 1
  for a, b in zip(before, _leaves((new_state.params, new_state.opt_state)), strict=True):
    np.testing.assert_array_equal(a, b)
