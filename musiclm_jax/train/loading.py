"""Rebuild a trained model from its run directory: the operative config.gin and its checkpoints."""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional

import gin
import jax


def load_run(model_dir: str, build_model: Callable[[], Any],
             batch_spec: Callable[[Any], Mapping[str, jax.ShapeDtypeStruct]],
             step: Optional[int] = None, partitioner=None, what: str = 'run'):
  """(model, params, model_state, step) of a run directory written by `musiclm-jax train`.

  The model is rebuilt by `build_model()` under the gin scope 'MODEL' after parsing
  MODEL_DIR/config.gin (the run built its model as the macro MODEL = @SomeModel(), so the
  operative config holds the model's bindings under that scope); the train state is restored
  from MODEL_DIR/checkpoints (`step`, default the latest readable) onto `partitioner`'s mesh.

  Args:
    model_dir: the run directory.
    build_model: constructs the model class with gin's bindings, e.g. `CodecModel`.
    batch_spec: model -> a global batch spec (shapes only matter for the state's structure).
    step: the checkpoint step; None: the latest readable.
    partitioner: where to restore (default: a Partitioner over all devices).
    what: the kind of run, for error messages ('codec run', 'w2v-BERT run', ...).
  """
  from musiclm_jax import main  # pylint: disable=g-import-not-at-top
  from musiclm_jax.train.checkpoints import Checkpointer, abstract_with_shardings  # pylint: disable=g-import-not-at-top
  from musiclm_jax.train.partitioning import Partitioner  # pylint: disable=g-import-not-at-top
  from musiclm_jax.train.train_state import StepFunctions  # pylint: disable=g-import-not-at-top
  config = os.path.join(model_dir, 'config.gin')
  if not os.path.exists(config):
    raise FileNotFoundError(f'{config}: not a {what} directory (no operative config)')
  gin.clear_config(clear_constants=False)
  main.parse_gin([config], [])
  with gin.config_scope('MODEL'):
    model = build_model()
  partitioner = partitioner or Partitioner()
  steps = StepFunctions(model, partitioner, dict(batch_spec(model)))
  checkpointer = Checkpointer(os.path.join(model_dir, 'checkpoints'))
  try:
    restored_step, state, _ = checkpointer.restore(
        abstract_with_shardings(steps.abstract_state, steps.state_shardings), step)
  finally:
    checkpointer.close()
  if state is None:
    raise FileNotFoundError(f'no readable checkpoint in {model_dir}/checkpoints')
  return model, state.params, state.model_state, restored_step
