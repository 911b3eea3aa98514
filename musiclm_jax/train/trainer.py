"""The gin-configured training and evaluation loops that drive every model."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Optional, Sequence

import gin
import jax
import jax.experimental.multihost_utils  # noqa: F401  pylint: disable=unused-import
import numpy as np
from tqdm import tqdm

from musiclm_jax.common import atomic
from musiclm_jax.data.seqio_input import (DatasetConfig, batch_spec_of, get_host_dataset,
                                          global_batch_spec, numpy_batches, reads_shard)
from musiclm_jax.train.checkpoints import (CheckpointError, Checkpointer, ModelDirLock,
                                           abstract_with_shardings)
from musiclm_jax.train.models import BaseModel
from musiclm_jax.train.partitioning import Partitioner
from musiclm_jax.train.summaries import SummaryWriter
from musiclm_jax.train.train_state import StepFunctions, TrainState

# A step hook is called on the host after each step with (step, host metrics of that step).
StepHook = Callable[[int, dict[str, float]], None]


class NonFiniteTrainingError(RuntimeError):
  """Too many consecutive steps had non-finite losses or gradients."""


@dataclasses.dataclass
class TrainResult:
  """What a finished (or interrupted) run returns."""
  state: TrainState
  step: int
  losses: dict[int, float]            # step -> training loss of that step (this run's steps)
  interrupted: bool = False           # stopped by SIGTERM/SIGINT after a final checkpoint
  steps_per_second: Optional[float] = None
  tokens_per_second: Optional[float] = None
  step_functions: Optional[StepFunctions] = None


def write_text_atomically(model_dir: str, text: str, name: str = 'config.gin'):
  """Writes MODEL_DIR/name on process 0 via a rename, so a crash never leaves half a file.

  The temporary file is named after this host and process, so two writers never share it.
  """
  if jax.process_index() != 0:
    return
  atomic.write_text(os.path.join(model_dir, name), text, durable=True)


class _StopSignals:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps (then save and exit).

  In a multi-process run every process must stop at the same step (a save, like a step, waits
  for all of them), so SIGTERM is left to JAX's preemption service, which
  `jax.distributed.initialize` hooks to it: it tells every process and picks one step at which
  all stop (`multihost_utils.reached_preemption_sync_point`). SIGINT and the time limit join
  that protocol through `notify_all_processes`.
  """

  def __init__(self, multi_process: bool = False):
    self.received: Optional[int] = None
    self.multi_process = multi_process
    self._notified = False
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      signals = (signal.SIGINT,) if self.multi_process else (signal.SIGTERM, signal.SIGINT)
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def notify_all_processes(self):
    """Raises the preemption notice (SIGTERM to this process, caught by JAX), once."""
    if not self._notified:
      self._notified = True
      os.kill(os.getpid(), signal.SIGTERM)

  def _handle(self, signum, frame):
    del frame
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C stops at once
    self.received = signum
    logging.warning('Received signal %d: saving a checkpoint after this step, then exiting.',
                    signum)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _to_host(metrics) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


@contextlib.contextmanager
def _progress(total: int, initial: int, enabled: bool):
  bar = tqdm(total=total, initial=initial, desc='train', unit='step', dynamic_ncols=True,
             mininterval=1.0, disable=not enabled)
  try:
    yield bar
  finally:
    bar.close()


@gin.configurable(denylist=['step_hooks_extra'])
def train(*,
          model: BaseModel = gin.REQUIRED,
          train_dataset: DatasetConfig = gin.REQUIRED,
          model_dir: str = gin.REQUIRED,
          train_steps: int = gin.REQUIRED,
          partitioner: Optional[Partitioner] = None,
          seed: int = 0,
          gradient_accumulation_steps: int = 1,
          checkpoint_every_steps: int = 1000,
          checkpoints_to_keep: Optional[int] = 3,
          async_checkpointing: bool = True,
          start_over: bool = False,
          eval_dataset: Optional[DatasetConfig] = None,
          eval_every_steps: int = 0,
          eval_batches: Optional[int] = None,
          log_every_steps: int = 10,
          max_consecutive_skipped_steps: int = 10,
          progress_bar: bool = True,
          time_limit_seconds: Optional[float] = None,
          step_hooks: Sequence[StepHook] = (),
          step_hooks_extra: Sequence[StepHook] = ()) -> TrainResult:
  """Trains `model` on `train_dataset` to `train_steps`, resuming from MODEL_DIR if it can.

  The newest readable step is restored; unreadable steps newer than it are moved to
  MODEL_DIR/checkpoints.unreadable-<time> (kept) and trained again. MODEL_DIR/train.lock (host,
  pid, start time) keeps a second trainer out while this one runs (process 0 holds it); a lock
  left by a process that is gone is taken over.

  Args:
    model: the model (see `BaseModel`).
    train_dataset: the SeqIO task/mixture and global batch size.
    model_dir: run directory: checkpoints/, TensorBoard events, config.gin.
    train_steps: total steps (a resumed run continues up to this number).
    partitioner: mesh and rules (default: all devices on the data axis).
    seed: initialisation and per-step noise (dropout, quantizer dropout).
    gradient_accumulation_steps: micro-batches per step.
    checkpoint_every_steps: save period; the last step and signals force a save.
    checkpoints_to_keep: recent checkpoints kept (retention never deletes a step newer than the
      one this run restored or last wrote).
    async_checkpointing: write checkpoints in the background.
    start_over: only matters when MODEL_DIR has checkpoints but none restores into this model
      (changed sizes, a different train state): by default the run then stops with
      CheckpointRestoreError naming each step and why; with True it moves them (and
      config.gin) to MODEL_DIR/checkpoints.old-<time> and trains a new model. Nothing is
      deleted either way, and a run that restores ignores it, so a restarted command resumes.
    eval_dataset: evaluated every `eval_every_steps` (0: never) on `eval_batches` batches.
    eval_batches: batches per evaluation (None: the whole split).
    log_every_steps: period of TensorBoard scalars and the printed line.
    max_consecutive_skipped_steps: stop (without saving) when more steps than this in a row had
      non-finite loss or gradients; the last good checkpoint stays.
    progress_bar: show a terminal progress bar with ETA (process 0).
    time_limit_seconds: stop (saving a checkpoint, as on SIGTERM) once this much wall-clock time
      has passed since the loop started; a later run with the same command resumes.
    step_hooks: callables (step, metrics) run on the host after each step.
    step_hooks_extra: more hooks from Python callers (not gin-bindable).

  Returns:
    A TrainResult.

  Raises:
    CheckpointRestoreError: checkpoints exist but none restores (see `start_over`).
    ModelDirLockedError: another trainer runs in MODEL_DIR.
  """
  partitioner = partitioner or Partitioner()
  os.makedirs(model_dir, exist_ok=True)
  is_main = jax.process_index() == 0
  # One trainer per MODEL_DIR; in a multi-process run process 0 holds the lock for all.
  with ModelDirLock(model_dir) if is_main else contextlib.nullcontext():
    # One pipeline: its element spec gives the shapes; after restore it skips what was consumed.
    ds = get_host_dataset(train_dataset, num_epochs=None)
    batch_spec = batch_spec_of(ds, train_dataset.batch_size)
    steps = StepFunctions(model, partitioner, batch_spec, gradient_accumulation_steps)
    checkpointer = Checkpointer(os.path.join(model_dir, 'checkpoints'), checkpoint_every_steps,
                                checkpoints_to_keep, async_checkpointing)
    target = abstract_with_shardings(steps.abstract_state, steps.state_shardings)
    try:
      start_step, state, data_position = checkpointer.resume(target, start_over)
    except BaseException:
      checkpointer.close()
      raise
    config_path = os.path.join(model_dir, 'config.gin')
    if checkpointer.started_over_to and is_main:
      if os.path.exists(config_path):
        os.replace(config_path, os.path.join(checkpointer.started_over_to, 'config.gin'))
      tqdm.write(f'train.start_over: the old checkpoints (and their config.gin) are now in '
                 f'{checkpointer.started_over_to}; training a new model.')
    writer = SummaryWriter(os.path.join(model_dir, 'train'))
    eval_writer = SummaryWriter(os.path.join(model_dir, 'eval')) if eval_dataset else writer
    if state is None:
      start_step = 0
      state = steps.init(jax.random.PRNGKey(seed))
      logging.info('Initialised a new model in %s.', model_dir)
    else:
      _check_data_position(data_position, train_dataset, start_step)
      logging.info('Resumed from step %d in %s.', start_step, checkpointer.directory)
    if is_main:
      tqdm.write(f'musiclm-jax: {model_dir}: step {start_step} -> {train_steps} on mesh '
             f'{partitioner.mesh_shape} ({jax.device_count()} devices, '
             f'{jax.process_count()} processes)')

    # Skipping the batches already consumed replays exactly the stream an uninterrupted run sees.
    batches = numpy_batches(ds.skip(start_step) if start_step else ds)
    # A process reading the whole global batch counts all its tokens; one reading a shard, its
    # share.
    token_scale = jax.process_count() if reads_shard(train_dataset) else 1
    hooks = list(step_hooks) + list(step_hooks_extra)
    losses: dict[int, float] = {}
    step = start_step
    interrupted = False
    window = {'t0': None, 'steps': 0, 'tokens': 0, 'sums': {}}
    rates = {'steps_per_second': None, 'tokens_per_second': None}
    pending = None  # (step number, metrics on device) of the step in flight
    config_written = False

    def finish_pending():
      nonlocal pending
      if pending is None:
        return
      done_step, device_metrics = pending
      pending = None
      m = _to_host(device_metrics)
      losses[done_step] = m.get('loss', float('nan'))
      for k, v in m.items():
        window['sums'][k] = window['sums'].get(k, 0.0) + v
      for hook in hooks:
        hook(done_step, m)
      if m.get('skipped_in_a_row', 0) > max_consecutive_skipped_steps:
        raise NonFiniteTrainingError(
            f'{int(m["skipped_in_a_row"])} consecutive steps up to step {done_step} had non-finite '
            f'loss or gradients (limit train.max_consecutive_skipped_steps='
            f'{max_consecutive_skipped_steps}). Stopped without saving; the last good checkpoint '
            f'in {checkpointer.directory} is step {checkpointer.latest_step()}.')
      if done_step % log_every_steps == 0 or done_step == train_steps:
        log_window(done_step)

    def log_window(at_step):
      n = max(1, window['steps'])
      scalars = {k: v / n for k, v in window['sums'].items()}
      if window['t0'] is not None and window['steps']:
        dt = time.perf_counter() - window['t0']
        rates['steps_per_second'] = window['steps'] / dt
        rates['tokens_per_second'] = window['tokens'] * token_scale / dt
        scalars['perf/steps_per_second'] = rates['steps_per_second']
        scalars['perf/tokens_per_second'] = rates['tokens_per_second']
        scalars['perf/examples_per_second'] = train_dataset.batch_size * window['steps'] / dt
      writer.scalars(at_step, scalars)
      if is_main:
        parts = [f'step {at_step}']
        for key in ('loss', 'accuracy'):
          if key in scalars:
            parts.append(f'{key} {scalars[key]:.4f}')
        if scalars.get('skipped_total'):
          parts.append(f'skipped {int(scalars["skipped_total"])}')
        if 'perf/steps_per_second' in scalars:
          parts.append(f'{scalars["perf/steps_per_second"]:.2f} steps/s '
                       f'{scalars["perf/tokens_per_second"]:.0f} tokens/s')
        tqdm.write(' | '.join(parts))
      window.update(t0=time.perf_counter(), steps=0, tokens=0, sums={})

    loop_start = time.perf_counter()
    multi_process = jax.process_count() > 1
    with _StopSignals(multi_process) as signals, _progress(train_steps, start_step,
                                                           progress_bar and is_main) as bar:
      try:
        while step < train_steps:
          host_batch = next(batches)
          batch = partitioner.host_local_batch_to_global(host_batch, steps.batch_shardings,
                                                         train_dataset.batch_size)
          state, device_metrics = steps.train_step(state, batch)
          step += 1
          # Fetch the previous step's metrics while this one runs: one step stays in flight.
          finish_pending()
          pending = (step, device_metrics)
          if window['t0'] is None:
            if step > start_step + 1:  # the first step includes compilation
              window.update(t0=time.perf_counter(), steps=0, tokens=0, sums={})
          else:
            window['steps'] += 1
            window['tokens'] += model.num_tokens(host_batch)
          if not config_written:
            write_text_atomically(model_dir, gin.operative_config_str())
            config_written = True
          checkpointer.save(step, state, _data_position(train_dataset, step),
                            force=step == train_steps)
          if eval_dataset is not None and eval_every_steps and step % eval_every_steps == 0:
            finish_pending()
            metrics = _evaluate_state(steps, partitioner, state, eval_dataset, eval_batches,
                                      eval_writer, step)
            eval_writer.scalars(step, {f'eval/{k}': v for k, v in metrics.items()})
            if is_main:
              tqdm.write(f'eval step {step}: ' + json.dumps({k: round(v, 5)
                                                             for k, v in metrics.items()}))
          bar.update(1)
          if losses:
            bar.set_postfix(loss=f'{losses[max(losses)]:.4f}', refresh=False)
          out_of_time = (time_limit_seconds is not None and step < train_steps and
                         time.perf_counter() - loop_start > time_limit_seconds)
          stop = out_of_time or signals.received is not None
          if multi_process:
            # Every process calls this every step; it turns True on all of them at the same step.
            if stop:
              signals.notify_all_processes()
            stop = (step < train_steps and
                    jax.experimental.multihost_utils.reached_preemption_sync_point(step))
          if stop and step < train_steps:
            finish_pending()
            checkpointer.save(step, state, _data_position(train_dataset, step), force=True)
            interrupted = True
            if is_main:
              if signals.received is not None:
                tqdm.write(f'Stopped by signal {signals.received} at step {step}; '
                           'checkpoint saved.')
              elif out_of_time:
                tqdm.write(f'Stopped at step {step}: train.time_limit_seconds='
                           f'{time_limit_seconds:g} reached; checkpoint saved.')
              else:
                tqdm.write(f'Stopped at step {step} by a preemption notice (SIGTERM to one of the '
                           f'{jax.process_count()} processes); checkpoint saved.')
            break
        finish_pending()
      finally:
        checkpointer.close()
        writer.close()
        eval_writer.close()
    saved = checkpointer.latest_step()
    if saved != step:
      raise CheckpointError(f'Step {step} was trained but the latest checkpoint in '
                            f'{checkpointer.directory} is step {saved}.')
    if is_main and not interrupted:
      tqdm.write(f'Done: step {step}. Checkpoints: {checkpointer.directory}  '
             f'TensorBoard: tensorboard --logdir {model_dir}')
    return TrainResult(state=state, step=step, losses=losses, interrupted=interrupted,
                       steps_per_second=rates['steps_per_second'],
                       tokens_per_second=rates['tokens_per_second'], step_functions=steps)


def _data_position(config: DatasetConfig, step: int) -> dict[str, Any]:
  return {'batches_consumed': int(step), 'mixture_or_task_name': config.mixture_or_task_name,
          'split': config.split, 'seed': int(config.seed), 'batch_size': int(config.batch_size),
          'process_input': config.process_input, 'process_count': jax.process_count()}


def _check_data_position(position, config: DatasetConfig, step: int):
  if not position:
    return
  for key, now in (('mixture_or_task_name', config.mixture_or_task_name),
                   ('seed', config.seed), ('batch_size', config.batch_size)):
    if key in position and position[key] != now:
      logging.warning('Resuming step %d with %s=%r, but the checkpoint was written with %r: '
                      'the data stream will differ from an uninterrupted run.',
                      step, key, now, position[key])
  # A sharded input's stream depends on how many processes share it.
  was_sharded = position.get('process_input') == 'shard' and position.get('process_count', 1) > 1
  if was_sharded != reads_shard(config) or (
      was_sharded and position['process_count'] != jax.process_count()):
    logging.warning('Resuming step %d with process_input=%r on %d processes, but the checkpoint '
                    'was written with process_input=%r on %s: the data stream will differ from '
                    'an uninterrupted run.', step, config.process_input, jax.process_count(),
                    position.get('process_input', 'full'), position.get('process_count', 1))


def _evaluate_state(steps: StepFunctions, partitioner: Partitioner, state: TrainState,
                    dataset: DatasetConfig, num_batches: Optional[int],
                    writer: Optional[SummaryWriter] = None,
                    step: int = 0) -> dict[str, float]:
  """Runs eval_step over the split; sums numerators and denominators, then divides.

  With a `writer` and a model that has eval summaries (audio, spectrograms), those of the first
  batch are written too.
  """
  ds = get_host_dataset(dataclasses.replace(dataset, shuffle=False), num_epochs=1,
                        drop_remainder=False)
  global_rows = next(iter(steps.batch_spec.values())).shape[0]
  per_host = global_rows // jax.process_count() if reads_shard(dataset) else global_rows
  sums: dict[str, list[float]] = {}
  for i, host_batch in enumerate(numpy_batches(ds)):
    if num_batches is not None and i >= num_batches:
      break
    # Pad a final partial batch with zeros: zero loss weights, so it adds nothing.
    host_batch = {k: _pad_rows(v, per_host) for k, v in host_batch.items()}
    batch = partitioner.host_local_batch_to_global(host_batch, steps.batch_shardings,
                                                   global_rows)
    ratios = jax.device_get(steps.eval_step(state, batch))
    if i == 0 and writer is not None and steps.summary_step is not None:
      _write_summaries(writer, step, jax.device_get(steps.summary_step(state, batch)),
                       steps.model.summary_sample_rate)
    for name, (num, den) in ratios.items():
      acc = sums.setdefault(name, [0.0, 0.0])
      acc[0] += float(num)
      acc[1] += float(den)
  return {k: num / max(den, 1e-12) for k, (num, den) in sums.items()}


def _write_summaries(writer: SummaryWriter, step: int, summaries: dict[str, Any],
                     sample_rate: int):
  for name, value in summaries.items():
    kind, _, tag = name.partition('/')
    if kind == 'audio':
      writer.audio(step, tag, np.asarray(value), sample_rate, max_outputs=len(value))
    elif kind == 'image':
      writer.image(step, tag, np.asarray(value), max_outputs=len(value))
    else:
      raise ValueError(f'eval summary {name!r}: expected an audio/ or image/ prefix')


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  if x.shape[0] == rows:
    return x
  pad = np.zeros((rows - x.shape[0],) + x.shape[1:], x.dtype)
  return np.concatenate([x, pad])


@gin.configurable
def evaluate(*,
             model: BaseModel = gin.REQUIRED,
             eval_dataset: DatasetConfig = gin.REQUIRED,
             model_dir: str = gin.REQUIRED,
             partitioner: Optional[Partitioner] = None,
             checkpoint_step: Optional[int] = None,
             eval_batches: Optional[int] = None) -> dict[str, float]:
  """Evaluates a checkpoint of MODEL_DIR on a split; writes TensorBoard and eval_results.json.

  Args:
    model: the model the checkpoint was trained with.
    eval_dataset: split to evaluate (read once, in order).
    model_dir: run directory holding checkpoints/.
    partitioner: mesh and rules (may differ from training: the checkpoint is resharded).
    checkpoint_step: which step (default: the latest readable).
    eval_batches: limit on batches (default: the whole split).
  """
  partitioner = partitioner or Partitioner()
  steps = StepFunctions(model, partitioner, global_batch_spec(eval_dataset))
  checkpointer = Checkpointer(os.path.join(model_dir, 'checkpoints'))
  target = abstract_with_shardings(steps.abstract_state, steps.state_shardings)
  step, state, _ = checkpointer.restore(target, checkpoint_step)
  checkpointer.close()
  if state is None:
    raise FileNotFoundError(f'No readable checkpoint in {checkpointer.directory}')
  writer = SummaryWriter(os.path.join(model_dir, 'eval'))
  metrics = _evaluate_state(steps, partitioner, state, eval_dataset, eval_batches, writer, step)
  writer.scalars(step, {f'eval/{k}': v for k, v in metrics.items()})
  writer.close()
  result = {'step': step, 'split': eval_dataset.split, **metrics}
  if jax.process_index() == 0:
    write_text_atomically(model_dir, json.dumps(result, indent=2) + '\n', 'eval_results.json')
    tqdm.write(json.dumps(result))
  return metrics
