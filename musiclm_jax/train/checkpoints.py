"""The one checkpoint wrapper: train state and data position saved together, restored resharded."""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

import gin
import jax
import orbax.checkpoint as ocp

STATE = 'state'
DATA = 'data'


@gin.configurable
class Checkpointer:
  """Saves every `save_every_steps` steps and keeps the last `keep`; async by default.

  Orbax also saves the first step a run takes, so a new run has a checkpoint at once.

  Orbax writes each step to a temporary directory and renames it only when complete, so a crash
  or kill during a save leaves the previous step as the latest good checkpoint. A step that is
  present but unreadable is reported and the next older one is tried; nothing is deleted.

  Args:
    directory: where step directories live (usually MODEL_DIR/checkpoints).
    save_every_steps: period K of regular saves (forced saves happen at the end and on signals).
    keep: how many recent checkpoints to keep (None keeps all).
    async_save: write in a background thread while training continues.
  """

  def __init__(self, directory: str, save_every_steps: int = 1000, keep: Optional[int] = 3,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(1, int(save_every_steps)), max_to_keep=keep,
        enable_async_checkpointing=async_save, create=True,
        # By default orbax silently skips a due save while the previous one is still being
        # written; a due save here waits for it instead, so the period is really K steps.
        enable_should_save_is_saving_in_progress_check=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=(STATE, DATA))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_position: dict[str, Any], force: bool = False) -> bool:
    """Saves if `step` is due (or `force`); returns whether a save started.

    A step that is already saved is not saved again, even with `force` (orbax saves the step of
    a preemption notice by itself, and a signal may arrive on a step that was due anyway).
    """
    if self._manager.latest_step() == int(step):
      return False
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
    mesh restores onto another.

    Returns:
      (step, state, data position), or (None, None, None) when there is no readable checkpoint.
    """
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
        logging.error('Checkpoint step %s in %s is unreadable (%s: %s); trying an older one. '
                      'Nothing was deleted.', candidate, self.directory, type(e).__name__, e)
    return None, None, None

  def wait_until_finished(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_with_shardings(abstract_tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs that carry the target shardings (a restore target)."""
  return jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)
