"""`musiclm-jax compile`: shard arithmetic, golden PartitionSpecs of every paper config, a dry run.

The golden files hold every variable's mesh PartitionSpec of each paper-size training config
(gin_configs/models/*/paper.gin with its run file) on a (2, 2, 2) data x fsdp x model mesh,
computed from `jax.eval_shape` and the logical axis rules (nothing is compiled or allocated). A
rules or model change that moves a sharding fails here; if intended, regenerate them with

  UPDATE_GOLDEN=1 nice -n 19 .venv/bin/pytest tests/train/test_compile.py -k golden
"""
import json
import os

import gin
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from musiclm_jax import main
from musiclm_jax.data.seqio_input import DatasetConfig, global_batch_spec
from musiclm_jax.train import compile as compile_lib
from musiclm_jax.train.partitioning import Partitioner, standard_logical_axis_rules
from tests.train.toy_setup import toy_dataset_config, toy_gin

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), 'golden')


def _golden_path(name: str) -> str:
  return os.path.join(GOLDEN_DIR, f'{name}_partition_specs_2x2x2.json')


def test_shard_arithmetic():
  mesh = {'data': 2, 'fsdp': 4, 'model': 2}
  assert compile_lib.shard_shape((1024, 4096), P('fsdp', 'model'), mesh) == (256, 2048)
  assert compile_lib.shard_shape((6, 10), P(('data', 'fsdp')), mesh) == (1, 10)  # 6/8 rounds up
  tree = {'w': jax.ShapeDtypeStruct((1024, 4096), jnp.float32),
          'b': jax.ShapeDtypeStruct((4096,), jnp.bfloat16)}
  specs = {'w': P('fsdp', 'model'), 'b': P()}
  assert compile_lib.tree_bytes(tree, specs, mesh) == {
      'total': 1024 * 4096 * 4 + 4096 * 2, 'per_device': 256 * 2048 * 4 + 4096 * 2}
  assert compile_lib.uneven_splits({'x': jax.ShapeDtypeStruct((6, 8), jnp.float32)},
                                   {'x': P('fsdp', 'model')}, mesh) == [
                                       "['x'] (6, 8) ('fsdp', 'model')"]


def test_projection_reshards_state_and_scales_activations_by_rows():
  w = {'w': jax.ShapeDtypeStruct((1024, 4096), jnp.float32)}
  specs = {'w': P('fsdp', 'model')}
  mib = 1 << 20
  compiled = {'mesh': {'data': 2, 'fsdp': 2, 'model': 2}, 'batch_size': 16,
              'params_per_device': 4 * mib, 'temp_per_device': 44 * mib, 'batch_bytes': 1024,
              'projection_batch_size': 256}
  p = compile_lib.project(compile_lib.SliceTarget('v4-64', 32, 32.0),
                          {'params': (w, specs), 'opt_state': ({}, {}), 'model_state': ({}, {})},
                          compiled, standard_logical_axis_rules())
  assert p['mesh'] == {'data': 1, 'fsdp': 16, 'model': 2} and p['rows_per_chip'] == 16
  assert p['params_bytes'] == 16 * mib // 32
  # 40 MiB of activations for 4 rows per device -> 16 rows; plus one gradient-sized buffer.
  assert p['temp_bytes'] == 160 * mib + p['params_bytes']
  assert p['fits'] and not p['uneven_splits']


def test_abstract_batch_spec_matches_the_input_pipeline():
  with toy_gin():
    config = toy_dataset_config()
    assert compile_lib.abstract_batch_spec(config) == global_batch_spec(config)
    spec = compile_lib.abstract_batch_spec(config, batch_size=4)
    assert spec['decoder_input_tokens'].shape[0] == 4


def test_too_few_devices_names_xla_flags():
  with pytest.raises(ValueError, match='xla_force_host_platform_device_count=16'):
    compile_lib.compile_devices((2, 4, 2))


def _abstract_specs(gin_files, bindings=()) -> dict:
  """Every variable's mesh PartitionSpec on the (2, 2, 2) mesh, from one jax.eval_shape."""
  gin.clear_config(clear_constants=False)
  main.parse_gin(list(gin_files) + ['runs/compile.gin'], list(bindings))
  try:
    # The objects `musiclm-jax compile` gets: MODEL and train/DatasetConfig.
    model = gin.query_parameter('compile_train_step.model').scoped_configurable_fn()
    with gin.config_scope('train'):
      batch_spec = compile_lib.abstract_batch_spec(DatasetConfig())
    partitioner = Partitioner((2, 2, 2), standard_logical_axis_rules())
    return compile_lib.abstract_partition_specs(model, partitioner, batch_spec)
  finally:
    gin.clear_config(clear_constants=False)


@pytest.mark.parametrize('name', sorted(compile_lib.PAPER_CONFIGS))
def test_golden_partition_specs_of_paper_configs(name):
  snapshot = _abstract_specs(compile_lib.PAPER_CONFIGS[name])
  path = _golden_path(name)
  if os.environ.get('UPDATE_GOLDEN'):
    with open(path, 'w') as f:
      json.dump(snapshot, f, indent=1, sort_keys=True)
      f.write('\n')
  with open(path) as f:
    golden = json.load(f)
  changed = sorted(k for k in set(snapshot) | set(golden) if snapshot.get(k) != golden.get(k))
  assert not changed, (f'{name}: partition specs changed for {changed[:5]} ({len(changed)} in '
                       'all); if intended, regenerate with UPDATE_GOLDEN=1 nice -n 19 '
                       '.venv/bin/pytest tests/train/test_compile.py -k golden')
  # Data + FSDP + tensor parallelism all apply, and no large matrix is silently replicated.
  assert any('fsdp' in str(v) for v in snapshot.values())
  assert any('model' in str(v) for v in snapshot.values())


def test_end_to_end_compile_of_a_tiny_stage(tmp_path):
  out = tmp_path / 'report.json'
  gin.clear_config(clear_constants=False)
  rc = main.main(['compile', '--gin_file=runs/train_coarse_stage.gin',
                  '--gin_file=models/stages/tiny.gin', '--gin.CROP_SECONDS=0.4',
                  '--gin.BATCH_SIZE=8', f"--gin.compile_train_step.output_path='{out}'",
                  '--gin.compile_train_step.verbose=False'])
  gin.clear_config(clear_constants=False)
  assert rc == 0
  report = json.loads(out.read_text())
  assert report['mesh'] == {'data': 2, 'fsdp': 2, 'model': 2} and report['compiled']
  memory = report['memory_analysis']
  assert memory['argument_size_in_bytes'] > 0 and memory['temp_size_in_bytes'] > 0
  state = report['state']
  for part in ('params', 'opt_state'):
    assert 0 < state[part]['per_device'] < state[part]['total']
  # The compiled step's arguments are the state and batch shards this device holds (jit drops
  # a batch feature the model does not read).
  held = sum(state[p]['per_device'] for p in ('params', 'opt_state', 'model_state'))
  assert held <= memory['argument_size_in_bytes'] <= held + state['batch']['per_device'] + 64
  # The donated state comes back in place: outputs alias the state arguments.
  assert memory['alias_size_in_bytes'] >= state['params']['per_device']
  # A sharded parameter holds its bytes / (product of its mesh axes) on each device.
  sharded = [r for r in report['largest_params'] if any(r['spec'])]
  assert sharded
  for r in sharded:
    axes = [a for e in r['spec'] if e for a in ([e] if isinstance(e, str) else e)]
    shards = 1
    for a in axes:
      shards *= report['mesh'][a]
    assert r['per_device_bytes'] * shards == r['total_bytes'], r
  assert [p['name'] for p in report['projections']] == ['TPU v4-64', 'TPU v5p-128', '8 x H100']
  for p in report['projections']:
    assert p['fits'] and p['params_bytes'] < state['params']['per_device']
    assert p['mesh']['data'] * p['mesh']['fsdp'] * p['mesh']['model'] == p['chips']


def test_compile_needs_no_run_directory_nor_cache(tmp_path, capsys):
  # runs/compile.gin is added after the given files: MODEL_DIR and CACHE_DIR are not needed.
  out = tmp_path / 'state_only.json'
  gin.clear_config(clear_constants=False)
  rc = main.main(['compile', '--gin_file=runs/train_fine_stage.gin',
                  '--gin_file=models/stages/tiny.gin', '--gin.compile_train_step.compile=False',
                  f"--gin.compile_train_step.output_path='{out}'"])
  gin.clear_config(clear_constants=False)
  assert rc == 0
  printed = capsys.readouterr().out
  assert 'not compiled' in printed and 'TPU v5p-128' in printed
  report = json.loads(out.read_text())
  assert report['memory_analysis'] == {} and report['state']['opt_state']['per_device'] > 0
  # The golden tests' one-eval_shape specs are the trainer's (StepFunctions') specs.
  assert report['partition_specs'] == _abstract_specs(
      ['runs/train_fine_stage.gin', 'models/stages/tiny.gin'])
  # A wrong binding is named.
  rc = main.main(['compile', '--gin_file=runs/train_fine_stage.gin',
                  '--gin_file=models/stages/tiny.gin', '--gin.compile_train_step.no_such=1'])
  gin.clear_config(clear_constants=False)
  assert rc == 2
  assert 'no_such' in capsys.readouterr().err
