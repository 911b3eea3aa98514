"""Multi-host training: two processes on this machine (gloo) train, checkpoint and resume.

Each launch starts two `musiclm-jax train` processes of one CPU device each, joined by
`jax.distributed.initialize` on 127.0.0.1 with gloo collectives, training the toy LM on a
(2, 1, 1) data-parallel mesh that spans both. The first launch trains 4 steps and checkpoints; the
second resumes to step 8. The reference is one uninterrupted single-process run on 2 devices with
the same global batch, seed and schedule. Every process reads the whole global batch
(DatasetConfig.process_input 'full'), so both runs see the same data, and with two devices the
gradient sum a + b is the same whether gloo or XLA adds it: the states agree bit for bit. (With
two devices a process, four in all, gloo and XLA add the four partial gradients in different
orders: measured differences of up to 7e-7 of a leaf's magnitude after 8 steps.)

One device a process: with two simulated devices a process on a busy 2-core machine, the first
collective now and then failed to form its gloo context within the 30 s deadline ("GetKeyValue()
timed out with key cpu:gloo/..."): a limit of the CPU simulation, not of the trainer.
"""
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from musiclm_jax.data.seqio_input import global_batch_spec
from musiclm_jax.train.checkpoints import Checkpointer, abstract_with_shardings
from musiclm_jax.train.partitioning import Partitioner
from musiclm_jax.train.train_state import StepFunctions
from tests.train.toy_setup import REPO, toy_dataset_config, toy_gin, toy_model, train_toy

NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 1
LAUNCH_TIMEOUT_S = 240  # a hung collective fails the test instead of blocking CI
# Both launches and the reference share these; the schedule's decay is pinned to the full run,
# so the 4-step first launch follows the same learning-rate curve as the 8-step reference.
BINDINGS = ('MESH_SHAPE=(2, 1, 1)', 'BATCH_SIZE=8', 'OptimizerConfig.decay_steps=8',
            'train.checkpoint_every_steps=4', 'train.checkpoints_to_keep=None',
            'train.log_every_steps=4')


def _gloo_missing() -> str:
  if 'jax_cpu_collectives_implementation' not in jax.config.values:
    return f'jax {jax.__version__} has no jax_cpu_collectives_implementation (gloo)'
  return ''


pytestmark = pytest.mark.skipif(bool(_gloo_missing()), reason=_gloo_missing() or 'gloo')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _tail(text: str, lines: int = 60) -> str:
  return '\n'.join(text.splitlines()[-lines:])


def _launch(model_dir, train_steps: int, *extra: str) -> list[str]:
  """Runs one two-process `musiclm-jax train`; returns each process's output (stdout + stderr)."""
  address = f'127.0.0.1:{_free_port()}'
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}',
             TF_CPP_MIN_LOG_LEVEL='3', JAX_PLATFORMS='cpu', PYTHONFAULTHANDLER='1')
  cmd = [sys.executable, '-m', 'musiclm_jax.main', 'train', '--gin_file=examples/toy_lm.gin',
         f"--gin.MODEL_DIR='{model_dir}'", f'--gin.TRAIN_STEPS={train_steps}',
         '--gin.train.progress_bar=False', *(f'--gin.{b}' for b in BINDINGS + extra),
         f'--coordinator_address={address}', f'--num_processes={NUM_PROCESSES}']
  procs = [subprocess.Popen(cmd + [f'--process_id={i}'], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(NUM_PROCESSES)]
  deadline = time.monotonic() + LAUNCH_TIMEOUT_S
  outputs, failures = [], []
  for i, proc in enumerate(procs):
    try:
      out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      # A hung process waits on a collective forever. SIGABRT makes Python's faulthandler print
      # every thread's stack into the output shown below; SIGKILL if even that hangs.
      for p in procs:
        if p.poll() is None:
          p.send_signal(signal.SIGABRT)
      try:
        out, _ = proc.communicate(timeout=10)
      except subprocess.TimeoutExpired:
        for p in procs:
          p.kill()
        out, _ = proc.communicate()
      failures.append(f'process {i} timed out after {LAUNCH_TIMEOUT_S} s')
    outputs.append(out)
    if proc.returncode != 0:
      failures.append(f'process {i} exited with {proc.returncode}')
  if failures:
    report = [f'{"; ".join(failures)}\n$ {" ".join(cmd)}']
    report += [f'--- process {i} output (tail) ---\n{_tail(out)}'
               for i, out in enumerate(outputs)]
    pytest.fail('\n'.join(report), pytrace=False)
  return outputs


def _restore(model_dir, step: int):
  """Train state and data position of a checkpoint step, on 2 devices of this process."""
  with toy_gin(*BINDINGS):
    model = toy_model()
    spec = global_batch_spec(toy_dataset_config())
  steps = StepFunctions(model, Partitioner((2, 1, 1)), spec)
  checkpointer = Checkpointer(os.path.join(model_dir, 'checkpoints'))
  restored_step, state, data = checkpointer.restore(
      abstract_with_shardings(steps.abstract_state, steps.state_shardings), step)
  checkpointer.close()
  assert restored_step == step
  return state, data


def _leaves(tree) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(tree))]


def test_two_processes_train_checkpoint_resume_equal_single_process(tmp_path):
  multi = tmp_path / 'multi'
  first = _launch(multi, 4, 'train.eval_every_steps=0')
  assert "{'data': 2, 'fsdp': 1, 'model': 1} (2 devices, 2 processes)" in first[0]
  second = _launch(multi, 8, 'train.eval_every_steps=4', 'train.eval_batches=1')
  assert 'step 4 -> 8' in second[0], _tail(second[0])
  # Process 0 alone reports, writes config.gin and TensorBoard events.
  assert 'Done: step 8' in second[0] and 'eval step 8' in second[0], _tail(second[0])
  assert 'Done: step' not in second[1] and 'eval step' not in second[1], _tail(second[1])
  assert (multi / 'config.gin').exists()
  assert len([f for f in os.listdir(multi / 'train') if 'tfevents' in f]) == 2  # one a launch

  reference = tmp_path / 'reference'
  result = train_toy(reference, 'TRAIN_STEPS=8', 'train.eval_every_steps=0', *BINDINGS)
  assert result.step == 8
  assert Checkpointer(str(multi / 'checkpoints')).all_steps() == [1, 4, 8]
  for step in (4, 8):
    multi_state, multi_data = _restore(multi, step)
    ref_state, ref_data = _restore(reference, step)
    assert multi_data == {**ref_data, 'process_count': 2}
    assert int(multi_state.step) == step
    for a, b in zip(_leaves(multi_state), _leaves(ref_state), strict=True):
      np.testing.assert_array_equal(a, b)  # params, optimizer state, counters: bit for bit
