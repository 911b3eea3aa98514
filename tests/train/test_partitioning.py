"""Mesh construction, logical-axis rules, unmapped-axis errors and the golden sharding snapshot."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from musiclm_jax.data.seqio_input import global_batch_spec
from musiclm_jax.train import partitioning
from musiclm_jax.train.partitioning import (Partitioner, UnmappedLogicalAxisError,
                                            resolve_mesh_shape, standard_logical_axis_rules)
from musiclm_jax.train.train_state import StepFunctions
from tests.train.toy_setup import toy_dataset_config, toy_gin, toy_model

GOLDEN = os.path.join(os.path.dirname(__file__), 'golden', 'toy_lm_partition_specs_2x1x4.json')


def test_resolve_mesh_shape():
  assert resolve_mesh_shape((2, 1, 4), 8) == (2, 1, 4)
  assert resolve_mesh_shape((-1, 1, 4), 8) == (2, 1, 4)
  assert resolve_mesh_shape((1, -1, 1), 8) == (1, 8, 1)
  for bad in [(3, 1, -1), (-1, -1, 1), (16, 1, 1), (2, 4), (0, 1, 1)]:
    with pytest.raises(ValueError, match='MESH_SHAPE'):
      resolve_mesh_shape(bad, 8)


def test_mesh_axes_and_data_parallel_size():
  p = Partitioner((2, 2, 2))
  assert p.mesh.axis_names == ('data', 'fsdp', 'model')
  assert p.mesh_shape == {'data': 2, 'fsdp': 2, 'model': 2}
  assert p.data_parallel_size == 4


def test_rules_map_params_and_activations():
  rules = standard_logical_axis_rules()
  assert nn.logical_to_mesh_axes(('embed', 'mlp'), rules) == P('fsdp', 'model')
  # In activations, batch takes fsdp first, so embed stays whole.
  assert nn.logical_to_mesh_axes(('batch', 'length', 'embed'), rules) == P(
      ('data', 'fsdp'), None, None)
  extra = standard_logical_axis_rules(additional_rules=[('length', 'model')])
  assert nn.logical_to_mesh_axes(('batch', 'length', 'embed'), extra) == P(
      ('data', 'fsdp'), 'model', None)


class _Odd(nn.Module):
  @nn.compact
  def __call__(self, x):
    w = self.param('w', nn.with_logical_partitioning(nn.initializers.ones, ('embed', 'unknown_ax')),
                   (x.shape[-1], 3))
    return x @ w


def test_unmapped_logical_axis_names_the_parameter():
  p = Partitioner((2, 1, 4))
  abstract = jax.eval_shape(_Odd().init, jax.random.PRNGKey(0), jnp.ones((1, 4)))
  with pytest.raises(UnmappedLogicalAxisError, match=r"params/w.*unknown_ax"):
    p.mesh_specs_from_boxed(abstract)


def test_partition_and_compile_report_memory():
  p = Partitioner((2, 1, 4))
  x_sharding = p.logical_sharding(('batch', 'embed'))
  f = p.partition(lambda x: jnp.tanh(x) * 2, in_shardings=(x_sharding,), out_shardings=x_sharding)
  x = jax.device_put(jnp.ones((8, 16)), x_sharding)
  np.testing.assert_allclose(np.asarray(f(x)), np.tanh(1.0) * 2 * np.ones((8, 16)), rtol=1e-6)
  compiled = f.compile(jax.ShapeDtypeStruct((8, 16), jnp.float32, sharding=x_sharding))
  mem = compiled.memory_summary()
  assert mem['argument_size_in_bytes'] == 8 * 16 * 4 // 2  # batch split 2 ways (data)


def _toy_snapshot():
  with toy_gin():
    model = toy_model()
    spec = global_batch_spec(toy_dataset_config())
  steps = StepFunctions(model, Partitioner((2, 1, 4)), spec)
  return partitioning.partition_spec_snapshot(steps.param_mesh_specs())


def test_golden_partition_specs_of_toy_model():
  snapshot = _toy_snapshot()
  if os.environ.get('UPDATE_GOLDEN'):
    with open(GOLDEN, 'w') as f:
      json.dump(snapshot, f, indent=1, sort_keys=True)
      f.write('\n')
  with open(GOLDEN) as f:
    golden = json.load(f)
  assert snapshot == golden, ('Partition specs changed; if intended, regenerate with '
                              'UPDATE_GOLDEN=1 pytest tests/train/test_partitioning.py')
  # Large matrices must not be silently replicated.
  assert any('model' in str(v) for v in snapshot.values())
  assert any('fsdp' in str(v) for v in snapshot.values())
