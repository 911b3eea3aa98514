"""The one checkpoint wrapper: train state and data position saved together, restored resharded.

Also the lock that keeps a second trainer out of a run directory.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Any, Optional

import gin
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

STATE = 'state'
DATA = 'data'
LOCK_FILE = 'train.lock'  # in MODEL_DIR, while a trainer runs there
START_OVER_BINDING = '--gin.train.start_over=True'


class CheckpointError(RuntimeError):
  """A checkpoint directory is in a state a run must not silently work around."""


class CheckpointRestoreError(CheckpointError):
  """Checkpoints exist, but none restores into the state of this run."""


class ModelDirLockedError(RuntimeError):
  """Another trainer holds the run directory's lock."""


def _shorten(text: str, limit: int = 240) -> str:
  text = ' '.join(str(text).split())
  return text if len(text) <= limit else text[:limit - 3] + '...'


def _timestamp() -> str:
  return time.strftime('%Y%m%d-%H%M%S')


def _free_path(path: str) -> str:
  """`path`, or `path-2`, `path-3`, ... whichever does not exist yet."""
  candidate, n = path, 1
  while os.path.exists(candidate):
    n += 1
    candidate = f'{path}-{n}'
  return candidate


def _sync_processes(name: str):
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


@gin.configurable
class Checkpointer:
  """Saves every `save_every_steps` steps and keeps the last `keep`; async by default.

  Orbax also saves the first step a run takes, so a new run has a checkpoint at once.

  Orbax writes each step to a temporary directory and renames it only when complete, so a crash
  or kill during a save leaves the previous step as the latest good checkpoint.

  `restore` (for readers: evaluation, export) returns the latest readable step; a step that is
  present but unreadable is logged, remembered in `unreadable`, and the next older one is tried.
  `resume` (for a training run) goes further, so that retention never deletes a step newer than
  the newest one this run restored or wrote, and nothing is lost silently:
  - unreadable steps newer than the restored one are moved aside to `<directory>.unreadable-
    <time>/<step>` (kept, but no longer listed), so the run saves those step numbers again;
  - when steps exist but none restores, it raises CheckpointRestoreError naming each step and
    why, unless `start_over`: then the whole directory is moved to `<directory>.old-<time>` and
    the run starts fresh.
  `save` refuses a step older than one already listed (orbax's retention keeps the last ones
  saved, so a newer step would be deleted). Nothing here ever deletes a step except orbax's
  `keep` retention of older steps.

  Args:
    directory: where step directories live (usually MODEL_DIR/checkpoints).
    save_every_steps: period K of regular saves (forced saves happen at the end and on signals).
    keep: how many recent checkpoints to keep (None keeps all).
    async_save: write in a background thread while training continues.
  """

  def __init__(self, directory: str, save_every_steps: int = 1000, keep: Optional[int] = 3,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.unreadable: dict[int, str] = {}  # step -> why it did not restore (the last restore)
    self.started_over_to: Optional[str] = None  # where `start_over` moved the old steps
    self._options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(1, int(save_every_steps)), max_to_keep=keep,
        enable_async_checkpointing=async_save, create=True,
        # By default orbax silently skips a due save while the previous one is still being
        # written; a due save here waits for it instead, so the period is really K steps.
        enable_should_save_is_saving_in_progress_check=False)
    self._manager = self._new_manager()

  def _new_manager(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(self.directory, options=self._options,
                                 item_names=(STATE, DATA))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_position: dict[str, Any], force: bool = False) -> bool:
    """Saves if `step` is due (or `force`); returns whether a save started.

    A step that is already saved is not saved again, even with `force` (orbax saves the step of
    a preemption notice by itself, and a signal may arrive on a step that was due anyway).

    Raises:
      CheckpointError: a newer step than `step` is listed (saving would let retention delete it).
    """
    latest = self._manager.latest_step()
    if latest == int(step):
      return False
    if latest is not None and latest > int(step):
      raise CheckpointError(
          f'Not saving step {step} in {self.directory}: it already holds the newer step '
          f'{latest}, which retention (keep the last ones saved) could then delete. Restore the '
          f'latest step with Checkpointer.resume before training on.')
    if jax.process_count() > 1 and (force or self._manager.should_save(int(step))):
      # Orbax opens a save with a barrier that is a collective of its own (an allgather over
      # every device), independent of the step still running; with CPU (gloo) collectives the
      # two ran concurrently and hung now and then. Letting the step finish first costs
      # nothing: the save has to wait for the state anyway.
      jax.block_until_ready(state)
    return self._manager.save(
        int(step), args=ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(state),
            DATA: ocp.args.JsonSave(dict(data_position)),
        }), force=force)

  def restore(self, abstract_state: Any, step: Optional[int] = None
              ) -> tuple[Optional[int], Any, Optional[dict[str, Any]]]:
    """Restores into `abstract_state` (ShapeDtypeStructs carrying shardings).

    The shardings of the target decide where each shard lands, so a checkpoint written on one
    mesh restores onto another. Without `step`, the newest readable step is used; the steps
    that failed (newer ones) and why are left in `self.unreadable`. Nothing is moved or deleted.

    Returns:
      (step, state, data position), or (None, None, None) when there is no readable checkpoint.
    """
    self.unreadable = {}
    steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
    for candidate in steps:
      try:
        restored = self._manager.restore(candidate, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardRestore(abstract_state),
            DATA: ocp.args.JsonRestore(),
        }))
        return candidate, restored[STATE], dict(restored[DATA] or {})
      except Exception as e:  # pylint: disable=broad-except
        if step is not None:
          raise
        self.unreadable[candidate] = f'{type(e).__name__}: {_shorten(e)}'
        logging.error('Checkpoint step %s in %s is unreadable (%s); trying an older one. '
                      'Nothing was deleted.', candidate, self.directory,
                      self.unreadable[candidate])
    return None, None, None

  def resume(self, abstract_state: Any, start_over: bool = False
             ) -> tuple[Optional[int], Any, Optional[dict[str, Any]]]:
    """`restore` for a training run, which will save (and let retention delete) after it.

    Unreadable steps newer than the restored one are moved aside (see the class docstring), so
    the run saves those numbers again. When steps exist but none restores: with `start_over`,
    the directory is moved aside and (None, None, None) returned; otherwise
    CheckpointRestoreError.
    """
    step, state, data = self.restore(abstract_state)
    if state is None and self.unreadable:
      if not start_over:
        raise CheckpointRestoreError(self._restore_error_message())
      self.start_over()
    elif state is not None and self.unreadable:
      self._move_steps_aside(sorted(s for s in self.unreadable if s > step))
    return step, state, data

  def _restore_error_message(self) -> str:
    lines = [f'{self.directory} has checkpoints, but none restores into this run\'s model and '
             f'train state:']
    lines += [f'  step {s}: {why}' for s, why in sorted(self.unreadable.items(), reverse=True)]
    lines.append(
        'Nothing was deleted. If the model changed by mistake, restore its settings (the old '
        'ones are in config.gin next to checkpoints/). To keep these steps but train a new model '
        f'here, rerun with {START_OVER_BINDING}: it moves them to {self.directory}.old-<time> '
        '(still on disk) and starts from step 0; or use another MODEL_DIR.')
    return '\n'.join(lines)

  def start_over(self) -> Optional[str]:
    """Moves the whole directory (every step) to `<directory>.old-<time>` and starts empty.

    Returns:
      Where the steps went, or None when there were none.
    """
    if not self.all_steps():
      return None
    self._manager.close()
    aside = _free_path(f'{self.directory}.old-{_timestamp()}')  # (process 0's name counts)
    _sync_processes('musiclm_jax_checkpoints_start_over_begin')
    if jax.process_index() == 0:
      os.rename(self.directory, aside)
    _sync_processes('musiclm_jax_checkpoints_start_over_end')
    self.started_over_to = aside
    self._manager = self._new_manager()
    logging.warning('Started over: moved the checkpoints of %s to %s (nothing was deleted).',
                    self.directory, aside)
    return aside

  def _move_steps_aside(self, steps: list[int]):
    if not steps:
      return
    aside = _free_path(f'{self.directory}.unreadable-{_timestamp()}')
    self._manager.wait_until_finished()
    _sync_processes('musiclm_jax_checkpoints_set_aside_begin')
    if jax.process_index() == 0:
      os.makedirs(aside)
      for s in steps:
        os.rename(os.path.join(self.directory, str(s)), os.path.join(aside, str(s)))
    _sync_processes('musiclm_jax_checkpoints_set_aside_end')
    self._manager.reload()
    logging.warning('Moved the unreadable steps %s of %s to %s (kept, not deleted): this run '
                    'continues from an older step and writes those step numbers again.',
                    steps, self.directory, aside)

  def wait_until_finished(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


_HELD_LOCKS: set[str] = set()  # the lock files this process holds


def _process_start_time(pid: int) -> Optional[float]:
  """When process `pid` started (Unix time, from /proc), or None where that is unknown."""
  try:
    with open(f'/proc/{pid}/stat', encoding='utf-8') as f:
      ticks = int(f.read().rpartition(')')[2].split()[19])  # field 22, starttime
    with open('/proc/stat', encoding='utf-8') as f:
      boot = next(int(line.split()[1]) for line in f if line.startswith('btime '))
    return boot + ticks / os.sysconf('SC_CLK_TCK')
  except (OSError, ValueError, IndexError, StopIteration):
    return None


class ModelDirLock:
  """MODEL_DIR/train.lock while a trainer runs there, so a second trainer fails at once.

  The file is created atomically (O_CREAT | O_EXCL) and holds the holder's host, pid and start
  time as JSON; it is removed when the run ends, also on errors. A lock whose holder ran on this
  host and is no longer running (killed, or the machine restarted) is stale: it is reported in
  the log and taken over; so is one whose pid now belongs to a process that started after the
  lock was taken (pids are reused, e.g. by a restarted container). A holder on another host
  cannot be checked: the error says to delete the file when no trainer runs there.

  Args:
    model_dir: the run directory.
  """

  def __init__(self, model_dir: str):
    self.path = os.path.join(os.path.abspath(model_dir), LOCK_FILE)
    self._mine: Optional[dict[str, Any]] = None

  def __enter__(self) -> 'ModelDirLock':
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()

  def acquire(self):
    """Takes the lock, or raises ModelDirLockedError naming the holder."""
    me = {'host': socket.gethostname(), 'pid': os.getpid(),
          'started': time.strftime('%Y-%m-%d %H:%M:%S %z'), 'started_unix': time.time()}
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = self._holder()
        stale = self._stale_reason(holder)
        if stale is None:
          raise ModelDirLockedError(self._locked_message(holder)) from None
        logging.warning('Taking over the stale lock %s (%s): %s.', self.path,
                        json.dumps(holder), stale)
        try:
          os.remove(self.path)
        except FileNotFoundError:
          pass
        continue
      with os.fdopen(fd, 'w', encoding='utf-8') as f:
        f.write(json.dumps(me) + '\n')
      self._mine = me
      _HELD_LOCKS.add(self.path)
      return
    raise ModelDirLockedError(f'Could not take {self.path}: other trainers keep taking it.')

  def release(self):
    """Removes the lock file if it is still this holder's."""
    if self._mine is None:
      return
    if self._holder() == self._mine:
      os.remove(self.path)
    _HELD_LOCKS.discard(self.path)
    self._mine = None

  def _holder(self) -> Optional[dict[str, Any]]:
    """The lock file's JSON, None when it is missing, empty or not valid."""
    try:
      with open(self.path, encoding='utf-8') as f:
        holder = json.load(f)
    except (OSError, ValueError):
      return None
    return holder if isinstance(holder, dict) else None

  def _stale_reason(self, holder: Optional[dict[str, Any]]) -> Optional[str]:
    """Why the lock is stale, or None when its holder may still be running."""
    if holder is None or holder.get('host') != socket.gethostname():
      return None
    pid = holder.get('pid')
    if not isinstance(pid, int) or pid <= 0:
      return None
    if pid == os.getpid():
      # This process does not hold it: a run killed before it could let go, whose pid the
      # system gave to this process (common in containers).
      if self.path in _HELD_LOCKS:
        return None
      return f'pid {pid} is this process, which did not take it'
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return f'process {pid} is no longer running'
    except PermissionError:
      pass  # running, as another user
    began, locked = _process_start_time(pid), holder.get('started_unix')
    if began is not None and isinstance(locked, (int, float)) and began > locked + 2:
      return f'process {pid} started after the lock was taken: another process reuses its pid'
    return None

  def _locked_message(self, holder: Optional[dict[str, Any]]) -> str:
    model_dir = os.path.dirname(self.path)
    if holder is None:
      who = f'{self.path} exists but holds no valid holder (a trainer may be starting)'
    else:
      who = (f'another trainer holds {self.path}: pid {holder.get("pid")} on host '
             f'{holder.get("host")}, started {holder.get("started")}')
    return (f'{model_dir} is in use: {who}. Two trainers in one MODEL_DIR would overwrite each '
            f'other\'s checkpoints. Wait for it to finish or stop it; if no trainer is running '
            f'there (e.g. its machine died), delete {self.path} and rerun.')


def abstract_with_shardings(abstract_tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs that carry the target shardings (a restore target)."""
  return jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)
