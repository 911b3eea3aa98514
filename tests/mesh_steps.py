"""Shared by the 'one step on a mesh equals one device' tests of the models."""
from __future__ import annotations

import jax


def one_step(steps, batch):
  """Init from PRNGKey(0), one train step on a host batch: (host state, host metrics)."""
  state = steps.init(jax.random.PRNGKey(0))
  global_batch = steps.partitioner.host_local_batch_to_global(batch, steps.batch_shardings)
  new_state, metrics = steps.train_step(state, global_batch)
  return jax.device_get(new_state), jax.device_get(metrics)
