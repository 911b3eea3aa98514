"""`musiclm-jax compile`: the trainer's train step compiled ahead of time on a mesh, no data."""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import threading
import time
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from musiclm_jax.data.seqio_input import DatasetConfig
from musiclm_jax.train.checkpoints import abstract_with_shardings
from musiclm_jax.train.models import BaseModel
from musiclm_jax.train.partitioning import (MESH_AXES, LogicalRules, Partitioner,
                                            partition_spec_snapshot)
from musiclm_jax.train.train_state import StepFunctions

_DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'
GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class SliceTarget:
  """A real slice the per-chip memory is projected onto.

  Attributes:
    name: e.g. 'TPU v4-64'.
    chips: accelerator chips (TPU chips, GPUs) in the slice.
    hbm_gib: memory per chip in GiB.
    model_parallelism: size of the `model` (tensor-parallel) mesh axis there; None keeps the
      compiled mesh's. The rest of the chips go to `fsdp` (data = 1): parameters, gradients and
      optimizer state sharded as far as the rules allow.
  """
  name: str
  chips: int
  hbm_gib: float
  model_parallelism: Optional[int] = None


# TPU v4: 32 GiB HBM per chip, a v4-64 has 32 chips (64 TensorCores); v5p: 95 GiB, a v5p-128 has
# 64 chips; H100 SXM: 80 GB.
DEFAULT_TARGETS = (SliceTarget('TPU v4-64', 32, 32.0), SliceTarget('TPU v5p-128', 64, 95.0),
                   SliceTarget('8 x H100', 8, 80.0))


# ------------------------------------------------------------------------------------- batch
def abstract_batch_spec(config: DatasetConfig, batch_size: Optional[int] = None
                        ) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of the global batch `config` describes, without reading any data.

  The same features `seqio_input.get_host_dataset` yields: a token converter's model features
  (lengths from seqio's `get_model_feature_lengths`, int32), or for 'audio' the features named in
  `task_feature_lengths` with the task's output dtypes.

  Args:
    config: the run's training DatasetConfig (train/DatasetConfig in the run files).
    batch_size: the global batch; None: `config.batch_size`.
  """
  import seqio  # pylint: disable=g-import-not-at-top  # pulls TensorFlow
  from musiclm_jax.data import seqio_input  # pylint: disable=g-import-not-at-top
  batch = int(batch_size or config.batch_size)
  lengths = dict(config.task_feature_lengths)
  if config.feature_converter == 'audio':
    if config.module:
      importlib.import_module(config.module)
    try:
      features = seqio.get_mixture_or_task(config.mixture_or_task_name).output_features
    except ValueError as e:
      raise ValueError(f'train/DatasetConfig.mixture_or_task_name='
                       f'{config.mixture_or_task_name!r} is not a registered task (module '
                       f'{config.module!r}): {e}') from e
    missing = [k for k in lengths if k not in features]
    if missing:
      raise ValueError(f'TASK_FEATURE_LENGTHS names {missing}, which task '
                       f'{config.mixture_or_task_name!r} does not output ({sorted(features)})')
    return {k: jax.ShapeDtypeStruct((batch, int(n)), np.dtype(features[k].dtype.as_numpy_dtype))
            for k, n in lengths.items()}
  converter = seqio_input._feature_converter(config)  # pylint: disable=protected-access
  model_lengths = converter.get_model_feature_lengths(lengths)
  dtypes = {k: f.dtype for k, f in converter.MODEL_FEATURES.items()}
  # Packing adds segment ids and positions, int32 like every token feature.
  return {k: jax.ShapeDtypeStruct(
      (batch, int(n)), np.dtype(dtypes[k].as_numpy_dtype) if k in dtypes else np.int32)
          for k, n in model_lengths.items()}


# ----------------------------------------------------------------------------------- devices
def _devices_needed(mesh_shape: Sequence[int]) -> int:
  known = math.prod(int(d) for d in mesh_shape if int(d) != -1)
  if -1 not in tuple(int(d) for d in mesh_shape):
    return known
  return known * max(1, 8 // known)  # "the rest" on 8 simulated devices (or what `known` needs)


def _backends_started() -> bool:
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  return xla_bridge.backends_are_initialized()


def compile_devices(mesh_shape: Sequence[int]) -> list[jax.Device]:
  """Devices for the mesh: the default backend's if it has enough, else simulated CPU devices.

  When JAX has not started a backend yet and XLA_FLAGS does not already simulate devices, this
  sets XLA_FLAGS=--xla_force_host_platform_device_count=N (N what the mesh needs) first.

  Raises:
    ValueError: too few devices (JAX started with fewer simulated devices than the mesh needs).
  """
  needed = _devices_needed(mesh_shape)
  flags = os.environ.get('XLA_FLAGS', '')
  if not _backends_started() and _DEVICE_COUNT_FLAG not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} {_DEVICE_COUNT_FLAG}={needed}'.strip()
  found = {}
  for backend in (None, 'cpu'):
    try:
      found[backend or jax.default_backend()] = jax.devices(backend)
    except RuntimeError:  # JAX_PLATFORMS may exclude the CPU
      continue
  for devices in found.values():
    if len(devices) >= needed:
      return list(devices)
  seen = ', '.join(f'{len(d)} {name}' for name, d in found.items())
  raise ValueError(
      f'MESH_SHAPE {tuple(mesh_shape)} needs {needed} devices, JAX sees {seen}. JAX started '
      f'before the compile command could simulate them: run with XLA_FLAGS='
      f'{_DEVICE_COUNT_FLAG}={needed} (or a smaller --gin.MESH_SHAPE).')


# -------------------------------------------------------------------------- shard arithmetic
def _mesh_axes_of(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def shard_shape(shape: Sequence[int], spec: P, mesh_shape: Mapping[str, int]) -> tuple[int, ...]:
  """The per-device shape of an array of `shape` sharded by `spec` over a mesh of `mesh_shape`.

  An uneven split is rounded up, as XLA pads the last shard.
  """
  entries = tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))
  return tuple(-(-int(d) // math.prod(mesh_shape[a] for a in _mesh_axes_of(e)))
               for d, e in zip(shape, entries))


def tree_bytes(abstract_tree: Any, specs: Any, mesh_shape: Mapping[str, int]) -> dict[str, int]:
  """{'total': bytes of the whole tree, 'per_device': bytes of one device's shards}.

  Args:
    abstract_tree: ShapeDtypeStructs (or arrays).
    specs: a matching tree of mesh PartitionSpecs (or NamedShardings).
    mesh_shape: {mesh axis: size}; may describe a mesh other than the specs' own.
  """
  leaves = jax.tree_util.tree_leaves(abstract_tree)
  spec_leaves = jax.tree_util.tree_leaves(
      specs, is_leaf=lambda x: isinstance(x, (P, jax.sharding.NamedSharding)))
  if len(leaves) != len(spec_leaves):
    raise ValueError(f'{len(leaves)} arrays but {len(spec_leaves)} shardings')
  total = per_device = 0
  for leaf, spec in zip(leaves, spec_leaves):
    spec = getattr(spec, 'spec', spec)
    itemsize = np.dtype(leaf.dtype).itemsize
    total += math.prod(leaf.shape) * itemsize
    per_device += math.prod(shard_shape(leaf.shape, spec, mesh_shape)) * itemsize
  return {'total': int(total), 'per_device': int(per_device)}


def uneven_splits(abstract_tree: Any, specs: Any, mesh_shape: Mapping[str, int]) -> list[str]:
  """Paths of the arrays whose sharded dimensions do not divide by their mesh axes' sizes.

  jit refuses such shardings, so a mesh that gives any needs other sizes (or other rules).
  """
  leaves = jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
  spec_leaves = jax.tree_util.tree_leaves(
      specs, is_leaf=lambda x: isinstance(x, (P, jax.sharding.NamedSharding)))
  bad = []
  for (path, leaf), spec in zip(leaves, spec_leaves):
    entries = tuple(getattr(spec, 'spec', spec))
    if any(int(d) % math.prod(mesh_shape[a] for a in _mesh_axes_of(e))
           for d, e in zip(leaf.shape, entries)):
      bad.append(f'{jax.tree_util.keystr(path)} {tuple(leaf.shape)} {entries}')
  return bad


def largest_arrays(abstract_tree: Any, specs: Any, mesh_shape: Mapping[str, int],
                   count: int = 5) -> list[dict[str, Any]]:
  """The `count` largest arrays: path, shape, mesh PartitionSpec, bytes whole and per device."""
  leaves = jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
  spec_leaves = jax.tree_util.tree_leaves(
      specs, is_leaf=lambda x: isinstance(x, (P, jax.sharding.NamedSharding)))
  rows = []
  for (path, leaf), spec in zip(leaves, spec_leaves):
    spec = getattr(spec, 'spec', spec)
    itemsize = np.dtype(leaf.dtype).itemsize
    rows.append({'path': jax.tree_util.keystr(path), 'shape': list(leaf.shape),
                 'spec': [list(e) if isinstance(e, tuple) else e for e in spec],
                 'total_bytes': int(math.prod(leaf.shape) * itemsize),
                 'per_device_bytes': int(math.prod(shard_shape(leaf.shape, spec, mesh_shape))
                                         * itemsize)})
  return sorted(rows, key=lambda r: -r['total_bytes'])[:count]


def _batch_axes_size(rules: LogicalRules, mesh_shape: Mapping[str, int]) -> int:
  """How many ways the `batch` rule splits the batch on a mesh of `mesh_shape`."""
  axes = _mesh_axes_of(nn.logical_to_mesh_axes(('batch',), rules)[0])
  return math.prod(mesh_shape[a] for a in axes)


# ------------------------------------------------------------------------------ the dry run
def build_step_functions(model: BaseModel, partitioner: Partitioner,
                         batch_spec: Mapping[str, jax.ShapeDtypeStruct],
                         gradient_accumulation_steps: int = 1) -> StepFunctions:
  """The trainer's step functions (abstract state and shardings; nothing is allocated)."""
  return StepFunctions(model, partitioner, batch_spec, gradient_accumulation_steps)


def variable_partition_specs(steps: StepFunctions) -> dict[str, list]:
  """{'params/...' or 'model_state/...': mesh PartitionSpec as a list}: the golden snapshot."""
  return partition_spec_snapshot(steps.variable_mesh_specs)


def abstract_partition_specs(model: BaseModel, partitioner: Partitioner,
                             batch_spec: Mapping[str, jax.ShapeDtypeStruct]) -> dict[str, list]:
  """`variable_partition_specs` for the price of one `jax.eval_shape` of the variables.

  The same steps as `StepFunctions` (abstract boxed variables traced under the partitioner's
  context, then its logical-to-mesh rules), without the optimizer state's second trace.
  """
  with partitioner.context():
    boxed = jax.eval_shape(model.init_variables, jax.random.PRNGKey(0), dict(batch_spec))
  return partition_spec_snapshot(partitioner.mesh_specs_from_boxed(boxed))


class _Heartbeat:
  """Prints the elapsed time every `period` seconds while a long call runs."""

  def __init__(self, what: str, period: float):
    self.what, self.period = what, period
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    start = time.perf_counter()
    while not self._stop.wait(self.period):
      print(f'  ... still {self.what} ({time.perf_counter() - start:.0f} s)', flush=True)

  def __enter__(self):
    if self.period > 0:
      self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()


def _fmt_bytes(n: float) -> str:
  for unit, size in (('GiB', GIB), ('MiB', 1024 ** 2), ('KiB', 1024)):
    if abs(n) >= size:
      return f'{n / size:.2f} {unit}'
  return f'{int(n)} B'


def project(target: SliceTarget, state_parts: Mapping[str, tuple[Any, Any]],
            compiled: Mapping[str, Any], rules: LogicalRules,
            usable_fraction: float = 0.9) -> dict[str, Any]:
  """Per-chip memory of the same train step on `target`, by shard arithmetic.

  State (parameters, optimizer and model state) is re-sharded by the same specs over the
  target's mesh (data 1, fsdp chips / model, model). Temporaries are split in two: one
  gradient-sized buffer (the parameters' shard) and the rest (activations), which is scaled by
  the rows of the batch each chip holds; the global batch (the compiled one unless
  `projection_batch_size` is given) is rounded up to whole rows per batch shard.

  Args:
    target: the slice.
    state_parts: {'params' | 'opt_state' | 'model_state': (abstract tree, mesh specs)}.
    compiled: the compiled run's figures: 'mesh' {axis: size}, 'batch_size', 'params_per_device',
      'temp_per_device', 'batch_bytes', and optionally 'projection_batch_size' (the global batch
      on the target; default the compiled one).
    rules: the logical axis rules (for how the batch is split).
    usable_fraction: the share of HBM a step may fill ('fits' below it).

  Returns:
    A JSON-ready dict: mesh, rows per chip, bytes per part, total, whether it fits, and the
    arrays whose shardings would not divide on that mesh (`uneven_splits`).
  """
  model = target.model_parallelism or compiled['mesh']['model']
  if target.chips % model:
    raise ValueError(f'{target.name}: {target.chips} chips do not split into model axis {model}')
  mesh = {'data': 1, 'fsdp': target.chips // model, 'model': model}
  parts = {name: tree_bytes(tree, specs, mesh)['per_device']
           for name, (tree, specs) in state_parts.items()}
  uneven = [f'{name}{path}' for name, (tree, specs) in state_parts.items()
            for path in uneven_splits(tree, specs, mesh)]
  shards = _batch_axes_size(rules, mesh)
  batch = max(compiled.get('projection_batch_size', compiled['batch_size']), shards)
  batch = -(-batch // shards) * shards
  rows = batch // shards
  compiled_rows = compiled['batch_size'] / _batch_axes_size(rules, compiled['mesh'])
  activations = max(compiled['temp_per_device'] - compiled['params_per_device'], 0)
  temp = activations * rows / compiled_rows + parts['params']
  batch_bytes = compiled['batch_bytes'] * rows / compiled_rows
  total = sum(parts.values()) + temp + batch_bytes
  hbm = target.hbm_gib * GIB
  return {'name': target.name, 'chips': target.chips, 'hbm_bytes': int(hbm),
          'mesh': mesh, 'global_batch': batch, 'rows_per_chip': rows,
          **{f'{k}_bytes': int(v) for k, v in parts.items()},
          'temp_bytes': int(temp), 'total_bytes': int(total),
          'fits': bool(total <= usable_fraction * hbm), 'uneven_splits': uneven}


def format_report(report: Mapping[str, Any]) -> str:
  """The printed tables of a `compile_train_step` report."""
  mesh = report['mesh']
  mesh_str = 'x'.join(str(mesh[a]) for a in MESH_AXES)
  lines = [
      f"{report['model']}: {report['parameters'] / 1e6:.1f}M parameters, global batch "
      f"{report['batch_size']}, mesh (data, fsdp, model) = {mesh_str} on "
      f"{report['devices']}; " + (f"lowered and compiled in {report['compile_seconds']:.1f} s"
                                   if report['compiled'] else 'not compiled'),
      '',
      f'| per device, mesh {mesh_str} | bytes | whole (all devices) |',
      '|---|---:|---:|',
  ]
  for name, label in (('params', 'parameters'), ('opt_state', 'optimizer state'),
                      ('model_state', 'model state'), ('batch', 'batch')):
    part = report['state'][name]
    lines.append(f"| {label} (shard arithmetic) | {_fmt_bytes(part['per_device'])} | "
                 f"{_fmt_bytes(part['total'])} |")
  labels = {'argument_size_in_bytes': 'arguments', 'output_size_in_bytes': 'outputs',
            'alias_size_in_bytes': 'outputs aliased to donated arguments',
            'temp_size_in_bytes': 'temporaries (activations, gradients)',
            'generated_code_size_in_bytes': 'generated code'}
  for key, label in labels.items():
    if key in report['memory_analysis']:
      lines.append(f"| compiled: {label} | {_fmt_bytes(report['memory_analysis'][key])} | |")
  if report['memory_analysis']:
    lines.append(f"| compiled: peak (arguments + outputs - aliased + temporaries) | "
                 f"{_fmt_bytes(report['peak_per_device'])} | |")
  elif report['compiled']:
    lines.append('| compiled: (this backend gives no memory analysis) | | |')
  how = ('activations scaled by rows per chip' if report['compiled'] else
         'not compiled: temporaries are one gradient-sized buffer, no activations')
  lines += ['', f'Projection per chip (state re-sharded by the same rules; {how}):', '',
            '| slice | mesh (data, fsdp, model) | rows/chip (global batch) | parameters | '
            'optimizer | temporaries | total | HBM | fits | uneven splits |',
            '|---|---|---:|---:|---:|---:|---:|---:|---|---:|']
  for p in report['projections']:
    m = p['mesh']
    lines.append(
        f"| {p['name']} ({p['chips']} chips) | {m['data']}x{m['fsdp']}x{m['model']} | "
        f"{p['rows_per_chip']} ({p['global_batch']}) | {_fmt_bytes(p['params_bytes'])} | "
        f"{_fmt_bytes(p['opt_state_bytes'])} | {_fmt_bytes(p['temp_bytes'])} | "
        f"{_fmt_bytes(p['total_bytes'])} | {_fmt_bytes(p['hbm_bytes'])} | "
        f"{'yes' if p['fits'] else 'NO'} | {len(p['uneven_splits'])} |")
  uneven = {p['name']: p['uneven_splits'] for p in report['projections'] if p['uneven_splits']}
  if uneven:
    lines += ['', 'Uneven splits (jit needs each sharded dimension to divide by its mesh axes; '
              'such a slice needs another model axis size or other rules):']
    for name, paths in uneven.items():
      more = f' and {len(paths) - 3} more' if len(paths) > 3 else ''
      lines.append(f"  {name}: {'; '.join(paths[:3])}{more}")
  return '\n'.join(lines)


@gin.configurable
def compile_train_step(*,
                       model: BaseModel = gin.REQUIRED,
                       train_dataset: DatasetConfig = gin.REQUIRED,
                       mesh_shape: Sequence[int] = (2, 2, 2),
                       logical_axis_rules: Optional[LogicalRules] = None,
                       batch_size: Optional[int] = None,
                       gradient_accumulation_steps: int = 1,
                       targets: Sequence[Any] = DEFAULT_TARGETS,
                       projection_batch_size: Optional[int] = None,
                       usable_hbm_fraction: float = 0.9,
                       output_path: Optional[str] = None,
                       compile: bool = True,  # pylint: disable=redefined-builtin
                       progress_every_seconds: float = 30.0,
                       verbose: bool = True) -> dict[str, Any]:
  """Lowers and compiles the trainer's train step on a mesh and reports its memory per device.

  A dry run for a config before it meets a pod slice: `StepFunctions.train_step` (the step
  `musiclm-jax train` runs) is lowered with abstract state and batch (`jax.ShapeDtypeStruct`:
  shapes from `jax.eval_shape` and the feature lengths, so no parameter is allocated and no data
  is read) and compiled on a mesh of real or simulated devices. Printed: per-device bytes of the
  parameters, optimizer and model state by shard arithmetic over their shardings; arguments,
  outputs and temporaries (activations, gradients) from XLA's memory analysis of the compiled
  step; and a per-chip projection onto larger slices (`project`).

    musiclm-jax compile --gin_file=runs/train_coarse_stage.gin --gin_file=models/stages/paper.gin

  The command adds runs/compile.gin after the given files (MODEL_DIR and CACHE_DIR, which a dry
  run does not need, and MESH_SHAPE = (2, 2, 2)); `--gin.MESH_SHAPE=(2,4,2)` and other bindings
  still win. On a CPU host the mesh's devices are simulated (`compile_devices`).

  Args:
    model: the model, as `train.model` (MODEL).
    train_dataset: the run's training DatasetConfig; only its feature lengths, converter and
      batch size are used (no data is read).
    mesh_shape: (data, fsdp, model) sizes (MESH_SHAPE; runs/compile.gin sets (2, 2, 2)).
    logical_axis_rules: as `Partitioner.logical_axis_rules` (None: the standard rules).
    batch_size: the global batch (None: train_dataset.batch_size, i.e. BATCH_SIZE).
    gradient_accumulation_steps: as `train.gradient_accumulation_steps`.
    targets: slices to project onto: SliceTargets or (name, chips, hbm_gib[, model axis]).
    projection_batch_size: the global batch the projections assume (None: the compiled one),
      e.g. the paper stages' 256 while compiling at 16.
    usable_hbm_fraction: a projection "fits" when its total stays below this share of HBM.
    output_path: also write the report as JSON here.
    compile: False stops after the shardings (seconds, even at paper size): the state's bytes
      and partition specs, no memory analysis; projections then count no activations.
    progress_every_seconds: print a line this often while compiling (0: never).
    verbose: print progress and the tables.

  Returns:
    The report: model, mesh, parameter count, per-device bytes of every state part (shard
    arithmetic), XLA's memory analysis, projections, the compile time and every variable's mesh
    PartitionSpec ('partition_specs', the golden snapshot of tests/train/test_compile.py).
  """
  say = (lambda *a: print(*a, flush=True)) if verbose else (lambda *a: None)
  started = time.perf_counter()
  devices = compile_devices(mesh_shape)
  partitioner = Partitioner(mesh_shape, logical_axis_rules, devices=devices)
  mesh = partitioner.mesh_shape
  batch_spec = abstract_batch_spec(train_dataset, batch_size)
  global_batch = next(iter(batch_spec.values())).shape[0]
  if global_batch % partitioner.data_parallel_size:
    raise ValueError(f'global batch {global_batch} (BATCH_SIZE) does not split over the '
                     f'{partitioner.data_parallel_size} batch shards of MESH_SHAPE '
                     f'{tuple(mesh_shape)}')
  say(f'musiclm-jax compile: {type(model).__name__} on mesh {mesh} '
      f'({len(devices)} {devices[0].platform} devices available), batch '
      + ', '.join(f'{k} {tuple(v.shape)} {v.dtype}' for k, v in batch_spec.items()))
  say('  abstract state and shardings (jax.eval_shape) ...')
  steps = build_step_functions(model, partitioner, batch_spec, gradient_accumulation_steps)
  state, shardings = steps.abstract_state, steps.state_shardings
  state_parts = {name: (getattr(state, name), getattr(shardings, name))
                 for name in ('params', 'opt_state', 'model_state')}
  usage = {name: tree_bytes(tree, specs, mesh) for name, (tree, specs) in state_parts.items()}
  usage['batch'] = tree_bytes(batch_spec, steps.batch_shardings, mesh)
  n_params = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(state.params))
  say(f'  {n_params / 1e6:.1f}M parameters; {_fmt_bytes(usage["params"]["per_device"])} of them '
      f'and {_fmt_bytes(usage["opt_state"]["per_device"])} of optimizer state per device')
  memory, compile_seconds = {}, 0.0
  if compile:
    say('  lowering and compiling the train step (minutes for paper sizes) ...')
    t = time.perf_counter()
    with _Heartbeat('compiling', progress_every_seconds if verbose else 0):
      compiled = steps.train_step.compile(
          abstract_with_shardings(state, shardings),
          abstract_with_shardings(batch_spec, steps.batch_shardings))
    compile_seconds = time.perf_counter() - t
    memory = compiled.memory_summary()
  peak = (memory.get('argument_size_in_bytes', 0) + memory.get('output_size_in_bytes', 0)
          - memory.get('alias_size_in_bytes', 0) + memory.get('temp_size_in_bytes', 0))
  figures = {'mesh': mesh, 'batch_size': global_batch,
             'projection_batch_size': int(projection_batch_size or global_batch),
             'params_per_device': usage['params']['per_device'],
             'temp_per_device': memory.get('temp_size_in_bytes', 0),
             'batch_bytes': usage['batch']['per_device']}
  slices = [t if isinstance(t, SliceTarget) else SliceTarget(*t) for t in targets]
  report = {
      'model': type(model).__name__,
      'mesh': mesh,
      'devices': f'{len(devices)} x {devices[0].device_kind} ({devices[0].platform})',
      'batch_size': global_batch,
      'batch_spec': {k: [list(v.shape), str(v.dtype)] for k, v in batch_spec.items()},
      'gradient_accumulation_steps': gradient_accumulation_steps,
      'parameters': int(n_params),
      'state': usage,
      'memory_analysis': memory,
      'peak_per_device': int(peak),
      'projections': [project(s, state_parts, figures, partitioner.rules, usable_hbm_fraction)
                      for s in slices],
      'compiled': bool(compile),
      'compile_seconds': compile_seconds,
      'wall_seconds': time.perf_counter() - started,
      'largest_params': largest_arrays(state.params, shardings.params, mesh),
      'partition_specs': variable_partition_specs(steps),
  }
  say('')
  say(format_report(report))
  if output_path:
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    with open(output_path, 'w', encoding='utf-8') as f:
      json.dump(report, f, indent=1)
      f.write('\n')
    say(f'\nwrote {output_path}')
  return report


# The paper-size training configs: name -> (run file, model file), as given to `--gin_file`.
PAPER_CONFIGS = {
    'codec': ('runs/train_codec.gin', 'models/codec/paper.gin'),
    'w2v_bert': ('runs/train_w2v_bert.gin', 'models/semantic/paper.gin'),
    'mulan': ('runs/train_mulan.gin', 'models/mulan/paper.gin'),
    'melody': ('runs/train_melody.gin', 'models/melody/paper.gin'),
    'semantic_stage': ('runs/train_semantic_stage.gin', 'models/stages/paper.gin'),
    'coarse_stage': ('runs/train_coarse_stage.gin', 'models/stages/paper.gin'),
    'fine_stage': ('runs/train_fine_stage.gin', 'models/stages/paper.gin'),
}
